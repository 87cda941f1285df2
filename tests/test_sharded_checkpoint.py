"""Sharded (DCP) training checkpoints: per-rank RNG streams saved and restored, elastic resume across world sizes
(2 processes -> 1 and 1 -> 2, gloo on the CPU), `dbrx export` to the Hugging Face layout tensor by tensor, and bad
checkpoints as one-line errors that change nothing."""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_atomic_training import snapshot, temporaries, tiny_model
from test_distributed import torchrun
from test_trainer import step_records, tiny_train_config, train

from dbrx.cli import main
from dbrx.model import DbrxForCausalLM
from dbrx.parallel import fsdp
from dbrx.train import train_checkpoint as ckpt_lib
from dbrx.train.config import TrainConfig, from_dict
from dbrx.train.data import sha256_file
from dbrx.train.trainer import Trainer, seed_everything

needs_cpu_fsdp = pytest.mark.skipif(fsdp._TORCH < (2, 7), reason="FSDP2 runs on the CPU from torch 2.7")


def elastic_config(root: Path) -> TrainConfig:
    # global batch 4 as micro batches of 2: one per rank with 2 processes, 2 accumulated with 1 (the same sums)
    return tiny_train_config(root, train={"steps": 4, "micro_batch": 2}, checkpoint={"interval": 2, "keep": 2})


def with_run_dir(cfg: TrainConfig, run_dir: Path) -> TrainConfig:
    return from_dict(TrainConfig, {**cfg.to_dict(), "run_dir": str(run_dir)})


def write_config(cfg: TrainConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))  # keep the stream order
    return path


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in step_records(run_dir)}


@torch.no_grad()
def assert_same_model(a: torch.nn.Module, b: torch.nn.Module, atol: float = 1e-5) -> None:
    x = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
    out_a, out_b = a(x), b(x)
    torch.testing.assert_close(getattr(out_a, "logits", out_a), getattr(out_b, "logits", out_b), atol=atol, rtol=0)


# ---- per-rank randomness --------------------------------------------------------------------------------------
def test_each_rank_draws_its_own_reproducible_stream():
    draws = {}
    for rank in (0, 1, 0):
        seed_everything(7, rank)
        draws.setdefault(rank, []).append((torch.rand(4), np.random.rand(), random.random()))
    (a, a2), (b,) = draws[0], draws[1]
    assert torch.equal(a[0], a2[0]) and a[1:] == a2[1:]
    assert not torch.equal(a[0], b[0]) and a[1] != b[1] and a[2] != b[2]
    seed_everything(7, 0, step=2)  # a reseed at a resume: another stream again
    assert not torch.equal(torch.rand(4), a[0])


def test_rng_state_is_restored_by_the_same_world_size_only(tmp_path):
    model, opt = tiny_model(0)
    torch.manual_seed(123)
    path = ckpt_lib.save_checkpoint(tmp_path, 1, model, opt, {"step": 1})
    expected = torch.rand(3)
    ckpt = ckpt_lib.read_checkpoint(path)
    assert ckpt["state"]["world"] == 1
    assert ckpt_lib.restore_rng(ckpt)
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)
    ckpt["state"]["world"] = 2  # written by 2 processes: rank states cannot map 1:1
    state = torch.get_rng_state()
    assert not ckpt_lib.restore_rng(ckpt)
    assert torch.equal(torch.get_rng_state(), state)


# ---- elastic resume -----------------------------------------------------------------------------------------
@needs_cpu_fsdp
def test_two_process_checkpoint_resumes_on_one_and_exports(tmp_path, capsys):
    cfg = elastic_config(tmp_path)
    config = write_config(cfg, tmp_path / "cfg.yaml")
    torchrun(["pretrain", str(config), f"run_dir={tmp_path / 'dist'}", "--no-sample"], tmp_path)
    reference = losses(tmp_path / "dist")
    ckpt = tmp_path / "dist" / "checkpoints" / "step_00000002"
    files = sorted(p.name for p in ckpt.iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp", "rng-00000.safetensors", "rng-00001.safetensors",
                     "state.json"]  # each rank wrote its own shards and its own RNG state
    assert json.loads((ckpt / "state.json").read_text())["world"] == 2
    rng = [load_file(ckpt / f"rng-0000{r}.safetensors")["torch"] for r in (0, 1)]
    assert not torch.equal(*rng)  # two streams

    capsys.readouterr()
    trainer, _ = train(with_run_dir(cfg, tmp_path / "one"), resume=str(ckpt))
    assert "written by 2 process(es), this run has 1: each rank's random state is reseeded" in capsys.readouterr().err
    resumed = losses(tmp_path / "one")
    assert sorted(resumed) == [3, 4]
    assert [resumed[s] for s in (3, 4)] == pytest.approx([reference[3], reference[4]], rel=1e-5, abs=1e-5)
    # the 2-process run's export (rank 0, tensor by tensor from its sharded step-4 checkpoint) is the same model
    assert_same_model(DbrxForCausalLM.from_pretrained(tmp_path / "dist" / "final", dtype=torch.float32).eval(),
                      trainer.model.eval())


@pytest.mark.slow
@needs_cpu_fsdp
def test_one_process_checkpoint_resumes_on_two(tmp_path):
    cfg = elastic_config(tmp_path)
    trainer, _ = train(cfg)
    reference = losses(cfg.run_dir)
    config = write_config(cfg, tmp_path / "cfg.yaml")
    ckpt = Path(cfg.checkpoint_dir) / "step_00000002"
    # checkpoints off: the export still goes through a sharded checkpoint of the last step, removed afterwards
    proc = torchrun(["pretrain", str(config), f"run_dir={tmp_path / 'two'}", "checkpoint.interval=0", "--resume",
                     str(ckpt), "--no-sample"], tmp_path)
    assert "written by 1 process(es), this run has 2" in proc.stderr
    assert ckpt_lib.list_checkpoints(tmp_path / "two" / "checkpoints") == []
    resumed = losses(tmp_path / "two")
    assert sorted(resumed) == [3, 4]
    assert [resumed[s] for s in (3, 4)] == pytest.approx([reference[3], reference[4]], rel=1e-5, abs=1e-5)
    assert_same_model(DbrxForCausalLM.from_pretrained(tmp_path / "two" / "final", dtype=torch.float32).eval(),
                      trainer.model.eval())


# ---- export -------------------------------------------------------------------------------------------------
def test_export_writes_a_transformers_checkpoint_of_any_step(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    cfg = tiny_train_config(tmp_path, train={"steps": 4}, checkpoint={"interval": 2, "keep": 2})
    trainer, _ = train(cfg)
    run, out = Path(cfg.run_dir), tmp_path / "hf"

    assert main(["export", str(run), str(out)]) == 0
    hf = transformers.DbrxForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert_same_model(hf, trainer.model.eval())

    # --step picks an earlier checkpoint (compared with the model a resume loads from it); OUT is replaced whole
    assert main(["export", str(run), "--step", "2", str(out)]) == 0
    at_2 = DbrxForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    step_2 = Trainer(with_run_dir(cfg, tmp_path / "at2"), resume=str(cfg.checkpoint_dir / "step_00000002"))
    step_2.close()
    assert_same_model(at_2, step_2.model.eval())
    with pytest.raises(AssertionError):
        assert_same_model(at_2, trainer.model)
    assert temporaries(tmp_path) == []

    # a step without a checkpoint: one line listing those there are; nothing written
    capsys.readouterr()
    before = snapshot(out)
    assert main(["export", str(run), "--step", "3", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("dbrx export: error: ") and "available steps: 2, 4" in err
    assert snapshot(out) == before
    # a single checkpoint directory works too
    assert main(["export", str(cfg.checkpoint_dir / "step_00000004"), str(tmp_path / "hf4")]) == 0
    assert_same_model(DbrxForCausalLM.from_pretrained(tmp_path / "hf4", dtype=torch.float32).eval(), trainer.model)


# ---- bad checkpoints ----------------------------------------------------------------------------------------
def test_missing_shard_is_a_one_line_error_and_latest_falls_back(tmp_path, capsys):
    cfg = tiny_train_config(tmp_path, train={"steps": 4}, checkpoint={"interval": 2, "keep": 2})
    train(cfg)
    previous, latest = ckpt_lib.list_checkpoints(cfg.checkpoint_dir)
    (latest / "__0_0.distcp").unlink()
    run = Path(cfg.run_dir)
    before = snapshot(run)
    with pytest.raises(ckpt_lib.CheckpointError, match=r"step_00000004/__0_0\.distcp: missing") as e:
        Trainer(cfg, resume=str(latest))
    assert "\n" not in str(e.value)
    capsys.readouterr()
    assert main(["export", str(latest), str(tmp_path / "hf")]) == 2
    assert "__0_0.distcp: missing" in capsys.readouterr().err
    assert snapshot(run) == before and not (tmp_path / "hf").exists()

    with pytest.warns(UserWarning, match="skipping checkpoint step_00000004.*falling back"):
        trainer = Trainer(cfg, resume="latest")
    trainer.close()
    assert trainer.start_step == 2 and trainer.resumed_from == str(previous)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_metadata_pickle_runs_no_code(tmp_path):
    model, opt = tiny_model(0)
    path = ckpt_lib.save_checkpoint(tmp_path, 1, model, opt, {"step": 1})
    (path / ".metadata").write_bytes(pickle.dumps(_Evil()))
    state = json.loads((path / "state.json").read_text())  # a consistent forgery: sizes and checksums updated
    state["files"][".metadata"] = {"bytes": (path / ".metadata").stat().st_size,
                                   "sha256": sha256_file(path / ".metadata")}
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(ckpt_lib.CheckpointError, match=r"\.metadata: unreadable .*refusing to load .*system"):
        ckpt_lib.read_checkpoint(path)


def test_a_world_size_that_cannot_hold_the_batch_is_refused_before_anything_is_built():
    """Resuming on 3 processes a run whose global batch of 8 rows splits into micro batches of 2 per process."""
    from dbrx.train.config import load_config

    cfg = load_config(None, ["train.global_batch=8", "train.micro_batch=2"])
    cfg.validate(world=1)
    cfg.validate(world=2)
    with pytest.raises(ValueError, match=r"train.global_batch \(8\).*world size \(3\)"):
        cfg.validate(world=3)
