"""The training loop: metrics, export, plots, keep-K checkpoints, gradient accumulation, NaN skipping."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dbrx.model import DbrxForCausalLM
from dbrx.train import train_checkpoint as ckpt_lib
from dbrx.train.config import TrainConfig, from_dict
from dbrx.train.plot import plot_run
from dbrx.train.trainer import Trainer, TrainingError

SENTENCES = [
    "the quick brown fox jumps over the lazy dog.",
    "to be or not to be, that is the question.",
    "all the world's a stage, and all the men and women merely players.",
    "def add(a, b):\n    return a + b\n",
]


def write_corpus(root: Path) -> dict[str, Path]:
    """Two tiny streams of repetitive documents (files), so a tiny model's loss falls within a few steps."""
    dirs = {"text": root / "corpus" / "text", "code": root / "corpus" / "code"}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    for i in range(6):
        (dirs["text"] / f"doc{i}.txt").write_text(" ".join(SENTENCES[(i + j) % 3] for j in range(40)))
        (dirs["code"] / f"mod{i}.txt").write_text("\n".join(SENTENCES[3].replace("add", f"add{j}") for j in range(30)))
    return dirs


def tiny_train_config(root: Path, **sections) -> TrainConfig:
    """A tiny run on the corpus of `write_corpus` (one thread, so runs in any process give identical numbers)."""
    dirs = write_corpus(root)
    d = {
        "run_dir": str(root / "run"),
        "model": {"preset": "dbrx-tiny", "overrides": {"d_model": 32, "ffn_hidden_size": 64}},
        "data": {"streams": {"text": {"paths": [str(dirs["text"])]}, "code": {"paths": [str(dirs["code"])]}},
                 "schedule": [{"until": 0.5, "weights": {"text": 0.75, "code": 0.25}},
                              {"until": 1.0, "weights": {"text": 0.25, "code": 0.75}}],
                 "cache_dir": str(root / "cache"), "workers": 1},
        "train": {"steps": 8, "global_batch": 4, "micro_batch": 4, "seq_len": 32, "num_threads": 1},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "log": {"interval": 4, "expert_load_interval": 4, "peak_flops": 1e10},
        "checkpoint": {"interval": 0, "keep": 2},
        "sample": {"max_new_tokens": 4},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            d.setdefault(section, {}).update(values)
        else:
            d[section] = values
    return from_dict(TrainConfig, d)


def step_records(run_dir: Path) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "event" not in r]


def train(cfg: TrainConfig, **kwargs) -> tuple[Trainer, dict]:
    trainer = Trainer(cfg, **kwargs)
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    return trainer, summary


def test_pretrain_metrics_export_plots_and_keep_k(tmp_path):
    cfg = tiny_train_config(tmp_path, train={"steps": 12}, checkpoint={"interval": 3, "keep": 2},
                            eval={"fraction": 0.2, "interval": 6, "batches": 1})
    trainer, summary = train(cfg)
    recs = step_records(cfg.run_dir)
    assert [r["step"] for r in recs] == list(range(1, 13))
    for key in ("loss", "lm_loss", "lb_loss", "z_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_gb",
                "expert_load_max", "expert_load_min"):
        assert key in recs[0], key
    assert recs[-1]["lm_loss"] < recs[0]["lm_loss"] - 1.0  # it learns
    assert all(math.isclose(r["loss"], r["lm_loss"] + 0.05 * r["lb_loss"], rel_tol=1e-6) for r in recs)
    assert recs[0]["mfu"] > 0 and len(recs[0]["expert_load_max"]) == 2
    load = recs[3]["expert_load"]  # full (L, E) matrix every expert_load_interval steps
    assert len(load) == 2 and len(load[0]) == 8 and abs(sum(load[0]) - 1) < 1e-5
    # the realised mix follows the curriculum: 75% text in the first half
    assert recs[3]["mix"]["text"] == pytest.approx(0.75, abs=0.1)
    events = [json.loads(x) for x in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "eval"] == [6, 12]
    # keep the last 2 checkpoints
    assert [p.name for p in ckpt_lib.list_checkpoints(cfg.checkpoint_dir)] == ["step_00000009", "step_00000012"]
    # the exported model is the trained one
    out = trainer.export()
    loaded = DbrxForCausalLM.from_pretrained(out, dtype=torch.float32)
    x = torch.randint(0, 1000, (1, 8))
    torch.testing.assert_close(loaded(x), trainer.model(x), rtol=0, atol=0)
    assert isinstance(trainer.sample(), str)
    assert {p.name for p in plot_run(cfg.run_dir)} == {"loss.png", "expert_load.png"}


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    # the load-balancing loss is not a sum over micro batches: switch it off to compare the LM gradient alone
    model = {"preset": "dbrx-tiny", "overrides": {"d_model": 32, "ffn_hidden_size": 64, "moe_loss_weight": 0.0}}
    losses = []
    for micro in (4, 1):
        cfg = tiny_train_config(tmp_path / f"m{micro}", train={"steps": 4, "micro_batch": micro}, model=model)
        train(cfg)
        losses.append([r["lm_loss"] for r in step_records(cfg.run_dir)])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_existing_run_needs_resume_or_overwrite(tmp_path):
    cfg = tiny_train_config(tmp_path, train={"steps": 2}, checkpoint={"interval": 2})
    train(cfg)
    with pytest.raises(ValueError, match="--resume"):
        Trainer(cfg)
    _, summary = train(cfg, overwrite=True)
    assert summary["step"] == 2


def test_nan_step_is_skipped_and_training_continues(tmp_path):
    cfg = tiny_train_config(tmp_path, train={"steps": 5, "debug_nan_steps": [3]})
    trainer, _ = train(cfg)
    events = [json.loads(x) for x in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "nan_skip"] == [3]
    recs = step_records(cfg.run_dir)
    assert recs[2]["skipped"] and not recs[3]["skipped"] and math.isfinite(recs[4]["loss"])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_too_many_nans_stop_with_last_good_checkpoint(tmp_path):
    cfg = tiny_train_config(tmp_path, train={"steps": 10, "debug_nan_steps": [4, 5, 6], "max_nan_skips": 3},
                            checkpoint={"interval": 2, "keep": 3})
    trainer = Trainer(cfg)
    with pytest.raises(TrainingError, match="3 non-finite steps in a row.*step_00000002"):
        trainer.fit()
    trainer.close()
    # step 4 was skipped: no checkpoint after it was written with poisoned weights; the last one loads cleanly
    assert [p.name for p in ckpt_lib.list_checkpoints(cfg.checkpoint_dir)] == ["step_00000002"]
    ckpt = ckpt_lib.load_latest(cfg.checkpoint_dir)
    assert ckpt["state"]["step"] == 2
    names = [k for k in ckpt["metadata"].state_dict_metadata if k.startswith("model/")]
    assert names and all(torch.isfinite(ckpt_lib.load_tensor(ckpt, k)).all() for k in names)


def test_resume_from_an_earlier_checkpoint_drops_the_later_ones(tmp_path):
    # checkpoints at 4 and 6; resuming from 4 starts a new history, so the old step 6 must not count as the newest
    cfg = tiny_train_config(tmp_path, train={"steps": 6}, checkpoint={"interval": 2, "keep": 2})
    train(cfg)
    cfg.train.steps, cfg.checkpoint.interval, cfg.checkpoint.keep = 5, 1, 1
    train(cfg, resume=str(Path(cfg.checkpoint_dir) / "step_00000004"))
    assert [p.name for p in ckpt_lib.list_checkpoints(cfg.checkpoint_dir)] == ["step_00000005"]
    assert ckpt_lib.load_latest(cfg.checkpoint_dir)["state"]["step"] == 5


def test_bf16_autocast_path(tmp_path):
    # the single-device bf16 path (autocast, fp32 master weights) on the CPU
    cfg = tiny_train_config(tmp_path, train={"steps": 4, "precision": "bf16"})
    trainer, _ = train(cfg)
    assert trainer.bf16
    recs = step_records(cfg.run_dir)
    assert all(math.isfinite(r["loss"]) and not r["skipped"] for r in recs)
    assert recs[-1]["lm_loss"] < recs[0]["lm_loss"]
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_metrics_logger_sends_train_and_eval_scalars(tmp_path):
    from dbrx.train.metrics import MetricsLogger, measure_cpu_matmul_flops, progress_line

    class Sink:
        def __init__(self):
            self.calls = []

        def log_metrics(self, values, step):
            self.calls.append((step, values))

        def end_run(self):
            pass

    log = MetricsLogger(tmp_path)
    log.mlflow = Sink()
    log.log({"step": 1, "loss": 2.0, "lr": 1e-3, "mfu": None})
    log.log({"event": "eval", "step": 1, "eval_loss_text": 2.5})
    log.log({"event": "checkpoint", "step": 1, "path": "x"})
    log.close()
    assert log.mlflow.calls == [(1, {"loss": 2.0, "lr": 1e-3}), (1, {"eval_loss_text": 2.5})]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    # the ETA counts only the steps run since a resume
    m = {"loss": 1.0, "lm_loss": 1.0, "lb_loss": 1.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1.0, "mem_gb": 1.0}
    assert progress_line(60, 100, m, elapsed=10.0, start_step=50).endswith("eta 0:40")
    # measuring the CPU's matmul rate leaves the global RNG (dropout, router jitter) alone
    state = torch.get_rng_state()
    measure_cpu_matmul_flops(n=32, repeats=1)
    assert torch.equal(state, torch.get_rng_state())
