"""FSDP2 on 2 CPU processes (gloo, launched by torchrun): the losses equal a single-process run, and a sharded
checkpoint resumes exactly."""

from __future__ import annotations

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


@pytest.mark.slow
@pytest.mark.skipif(fsdp._TORCH < (2, 7), reason="FSDP2 runs on the CPU from torch 2.7")
def test_two_processes_match_one_and_resume(tmp_path):
    # single process: global batch 4 as 2 micro batches of 2 (the same micro batches the two ranks see)
    cfg = tiny_train_config(tmp_path, train={"steps": 4, "micro_batch": 2}, checkpoint={"interval": 2, "keep": 2})
    train(cfg)
    single = [r["loss"] for r in step_records(cfg.run_dir)]

    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))  # keep the stream order
    proc = torchrun(["pretrain", str(config), f"run_dir={tmp_path / 'dist'}", "--no-sample"], tmp_path)
    assert "2 process(es)" in proc.stderr
    dist = [r["loss"] for r in step_records(tmp_path / "dist")]
    assert dist == pytest.approx(single, rel=1e-5, abs=1e-5)
    assert (tmp_path / "dist" / "final" / "config.json").is_file()

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
