"""Exact resume after SIGKILL, fallback past a corrupt checkpoint, Ctrl-C saves a checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_trainer import step_records, tiny_train_config, train

from dbrx.train import train_checkpoint as ckpt_lib
from dbrx.train.config import from_dict
from dbrx.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def launch(config: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dbrx", "pretrain", str(config), "--no-sample", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("timed out waiting for the training subprocess")
        time.sleep(0.01)


def write_config(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))  # keep the stream order
    return path


def by_step_after_last_resume(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = max(i for i, r in enumerate(lines) if r.get("event") == "resume")
    return {r["step"]: r["loss"] for r in lines[last:] if "event" not in r}


@pytest.mark.slow
def test_sigkill_then_resume_continues_exactly(tmp_path):
    steps = 24
    ref = tiny_train_config(tmp_path / "ref", train={"steps": steps}, checkpoint={"interval": 3, "keep": 2})
    train(ref)
    reference = {r["step"]: r["loss"] for r in step_records(ref.run_dir)}

    cfg = tiny_train_config(tmp_path / "killed", train={"steps": steps}, checkpoint={"interval": 3, "keep": 2})
    proc = launch(write_config(cfg, tmp_path / "cfg.yaml"))
    wait_for(lambda: ckpt_lib.list_checkpoints(cfg.checkpoint_dir), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    saved = ckpt_lib.list_checkpoints(cfg.checkpoint_dir)
    at = int(saved[-1].name.split("_")[1])
    assert at < steps  # killed mid-way

    _, summary = train(cfg, resume="latest")
    resumed = by_step_after_last_resume(Path(cfg.run_dir))
    assert sorted(resumed) == list(range(at + 1, steps + 1))
    assert resumed == {s: reference[s] for s in resumed}  # bit-for-bit the uninterrupted run
    assert summary["step"] == steps


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path):
    steps = 8
    ref = tiny_train_config(tmp_path, train={"steps": steps}, checkpoint={"interval": 2, "keep": 2})
    train(ref)
    reference = {r["step"]: r["loss"] for r in step_records(ref.run_dir)}
    latest, previous = ckpt_lib.list_checkpoints(ref.checkpoint_dir)[::-1]
    model_file = latest / "__0_0.distcp"  # the DCP shard file of rank 0 (model and optimizer state)
    with open(model_file, "r+b") as f:
        f.truncate(model_file.stat().st_size // 2)
    with pytest.warns(UserWarning, match="step_00000008.*truncated"):
        ckpt = ckpt_lib.load_latest(ref.checkpoint_dir)
    assert ckpt["path"] == previous and ckpt["state"]["step"] == 6

    # resuming picks the previous checkpoint and still reproduces the run
    with pytest.warns(UserWarning, match="falling back"):
        trainer = Trainer(from_dict(type(ref), ref.to_dict()), resume="latest")
    assert trainer.start_step == 6
    trainer.fit()
    trainer.close()
    resumed = by_step_after_last_resume(Path(ref.run_dir))
    assert resumed == {7: reference[7], 8: reference[8]}


def test_checksum_mismatch_is_detected(tmp_path):
    cfg = tiny_train_config(tmp_path, train={"steps": 2}, checkpoint={"interval": 2})
    train(cfg)
    (path,) = ckpt_lib.list_checkpoints(cfg.checkpoint_dir)
    data = bytearray((path / "__0_0.distcp").read_bytes())
    data[-1] ^= 0xFF  # same size, one flipped byte
    (path / "__0_0.distcp").write_bytes(bytes(data))
    with pytest.raises(ckpt_lib.CheckpointError, match="checksum"):
        ckpt_lib.read_checkpoint(path)
    with pytest.raises(ckpt_lib.CheckpointError, match="no usable checkpoint"), pytest.warns(UserWarning):
        ckpt_lib.load_latest(cfg.checkpoint_dir)


def test_ctrl_c_saves_a_checkpoint_then_exits(tmp_path):
    cfg = tiny_train_config(tmp_path, train={"steps": 10_000}, checkpoint={"interval": 0})
    proc = launch(write_config(cfg, tmp_path / "cfg.yaml"))
    metrics = Path(cfg.run_dir) / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(step_records(cfg.run_dir)) >= 2, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "checkpoint saved" in err
    events = [json.loads(x) for x in metrics.read_text().splitlines()]
    stopped = [e for e in events if e.get("event") == "interrupted"]
    assert len(stopped) == 1 and 2 <= stopped[0]["step"] < 10_000
    ckpt = ckpt_lib.load_latest(cfg.checkpoint_dir)
    assert ckpt["state"]["step"] == stopped[0]["step"]
    assert ckpt["state"]["loader"]["step"] == stopped[0]["step"]


def test_state_json_without_a_file_entry_is_a_checkpoint_error(tmp_path):
    cfg = tiny_train_config(tmp_path, train={"steps": 2}, checkpoint={"interval": 1, "keep": 2})
    train(cfg)
    first, latest = ckpt_lib.list_checkpoints(cfg.checkpoint_dir)
    state = json.loads((latest / "state.json").read_text())
    del state["files"]["rng-00000.safetensors"]
    (latest / "state.json").write_text(json.dumps(state))
    with pytest.raises(ckpt_lib.CheckpointError, match="unreadable"):
        ckpt_lib.read_checkpoint(latest)
    with pytest.warns(UserWarning, match="falling back"):
        assert ckpt_lib.load_latest(cfg.checkpoint_dir)["path"] == first
