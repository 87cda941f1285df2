"""FSDP2 on 2 CPU processes (gloo, launched by torchrun): the losses equal a single-process run, and a sharded
checkpoint resumes exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_trainer import step_records, tiny_train_config, train

from dbrx.parallel import fsdp

ROOT = Path(__file__).resolve().parents[1]


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dbrx", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def eval_records(run_dir: Path) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == "eval"]


def _icl_tasks(root: Path) -> Path:
    rows = {
        "mc.jsonl": [{"query": f"Is {w} a colour?", "choices": ["yes", "no", "maybe"], "gold": i % 3}
                     for i, w in enumerate(["red", "bread", "blue", "cat"])],
        "qa.jsonl": [{"context": f"Q: {a} plus {b}?", "answer": str(a + b)} for a, b in [(1, 1), (2, 3), (4, 4)]],
        "lm.jsonl": [{"context": f"{x} is", "continuation": f" {y}"} for x, y in [("sky", "blue"), ("one", "two")]],
    }
    for name, items in rows.items():
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in items))
    spec = root / "icl.yaml"
    spec.write_text(
        f"icl_tasks:\n"
        f"- {{label: mc, dataset_uri: {root / 'mc.jsonl'}, icl_task_type: multiple_choice, random_baseline: 0.33,"
        f" category: commonsense_reasoning, num_fewshot: [1]}}\n"
        f"- {{label: qa, dataset_uri: {root / 'qa.jsonl'}, icl_task_type: generation_task_with_answers,"
        f" max_new_tokens: 4, category: symbolic_problem_solving}}\n"
        f"- {{label: lm, dataset_uri: {root / 'lm.jsonl'}, icl_task_type: language_modeling,"
        f" category: language_understanding}}\n")
    return spec


@pytest.mark.slow
@pytest.mark.skipif(fsdp._TORCH < (2, 7), reason="FSDP2 runs on the CPU from torch 2.7")
def test_two_processes_match_one_and_resume(tmp_path):
    # single process: global batch 4 as 2 micro batches of 2 (the same micro batches the two ranks see)
    # with ICL tasks (multiple choice, generation, language modelling) scored at each evaluation
    icl_tasks = _icl_tasks(tmp_path)
    cfg = tiny_train_config(tmp_path, train={"steps": 4, "micro_batch": 2}, checkpoint={"interval": 2, "keep": 2},
                            eval={"interval": 2, "icl_tasks": str(icl_tasks), "fraction": 0.2, "batches": 1})
    train(cfg)
    single = [r["loss"] for r in step_records(cfg.run_dir)]
    single_evals = eval_records(cfg.run_dir)

    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))  # keep the stream order
    proc = torchrun(["pretrain", str(config), f"run_dir={tmp_path / 'dist'}", "--no-sample"], tmp_path)
    assert "2 process(es)" in proc.stderr
    dist = [r["loss"] for r in step_records(tmp_path / "dist")]
    assert dist == pytest.approx(single, rel=1e-5, abs=1e-5)
    assert (tmp_path / "dist" / "final" / "config.json").is_file()
    # the sharded model scores the ICL tasks as the single process does (only rank 0 writes them)
    dist_evals = eval_records(tmp_path / "dist")
    assert [e["step"] for e in dist_evals] == [e["step"] for e in single_evals] == [2, 4]
    for d, s in zip(dist_evals, single_evals):
        icl_keys = sorted(k for k in s if k.startswith("icl/"))
        assert len(icl_keys) == 3 + 3 + 1 and sorted(k for k in d if k.startswith("icl/")) == icl_keys
        assert {k: d[k] for k in icl_keys} == pytest.approx({k: s[k] for k in icl_keys}, abs=1e-9)
        # held-out loss ran too (its windows are eval.batches x micro_batch x world rows, so they differ here); the
        # step-2 checkpoint after both evaluations saved and resumes below
        assert {"eval_loss_text", "eval_loss_code"} <= d.keys()

    # resume the sharded run from its step-2 checkpoint in a new run directory: steps 3 and 4 come out the same
    ckpt = tmp_path / "dist" / "checkpoints" / "step_00000002"
    torchrun(["pretrain", str(config), f"run_dir={tmp_path / 'resumed'}", "--resume", str(ckpt), "--no-sample"],
             tmp_path)
    resumed = [(r["step"], r["loss"]) for r in step_records(tmp_path / "resumed")]
    assert [s for s, _ in resumed] == [3, 4]
    assert [x for _, x in resumed] == pytest.approx(single[2:], rel=1e-5, abs=1e-5)


def test_old_torch_refuses_cpu_sharding_clearly(monkeypatch):
    monkeypatch.setattr(fsdp, "_TORCH", (2, 6))
    with pytest.raises(ValueError, match="torch >= 2.7"):
        fsdp.shard_model(torch.nn.Linear(2, 2))
