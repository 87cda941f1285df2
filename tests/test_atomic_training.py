"""Training output is written atomically and by one writer at a time: a failed checkpoint save keeps the previous
checkpoint, a resume into another model or optimizer is a one-line error, one run directory and one prepared-data
directory have one writer, a fresh run never mixes with an earlier one, metrics.jsonl keeps one whole record per
line and step, and a failed `prepare` leaves the old data as it was."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_trainer import tiny_train_config, train

from dbrx import fsutil
from dbrx.cli import main
from dbrx.train import data as data_mod
from dbrx.train import metrics as metrics_mod
from dbrx.train import train_checkpoint as ckpt_lib
from dbrx.train.config import TrainConfig, from_dict
from dbrx.train.data import TokenDataset, prepare
from dbrx.train.metrics import MetricsLogger, read_metrics, trim_metrics
from dbrx.train.trainer import LionW, Trainer

FSUTIL = Path(fsutil.__file__)

# holds a lock in another process until its stdin closes (fsutil loaded by path: no torch import, a fast start)
HOLDER = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("fsutil", {str(FSUTIL)!r})
fsutil = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fsutil)
lock = fsutil.lock_dir(sys.argv[1], "held by the test", inside=sys.argv[2] == "inside")
print("locked", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def lock_held_elsewhere(path: Path, inside: bool):
    """Yield the pid of a live process holding `lock_dir(path, inside=inside)`."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), "inside" if inside else "beside"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc.pid
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
        proc.stdout.close()


def one_line(pattern: str) -> str:
    """A `match` pattern for a whole one-line message. (No `pytest.raises(...) as e` for LockedError: a traceback
    kept alive in a reference cycle keeps the failed DirLock too, whose late __del__ would close a reused fd.)"""
    return rf"\A[^\n]*{pattern}[^\n]*\Z"


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def temporaries(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if fsutil.is_temporary(p)]


def write_config(cfg: TrainConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


def with_changes(cfg: TrainConfig, **sections) -> TrainConfig:
    d = cfg.to_dict()
    for section, values in sections.items():
        d[section] = {**d[section], **values}
    return from_dict(TrainConfig, d)


# ---- training checkpoints ---------------------------------------------------------------------------------------
def tiny_model(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model and an AdamW that has taken one step (so it has state to save)."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def save(root: Path, step: int, model, opt) -> Path:
    return ckpt_lib.save_checkpoint(root, step, model, opt, {"step": step}, keep=5)


def saved_weight(path: Path) -> torch.Tensor:
    return ckpt_lib.load_tensor(ckpt_lib.read_checkpoint(path), "model/weight")


class FailAt:
    """Calls `real`, except the `n`-th call (1-based; 0 = never), which raises ENOSPC."""

    def __init__(self, real, n: int) -> None:
        self.real, self.n, self.calls = real, n, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return self.real(*args, **kwargs)


@pytest.mark.parametrize("where", ["save_file", "json.dump", "os.fsync"])
def test_failed_checkpoint_save_keeps_the_previous_one(tmp_path, monkeypatch, where):
    owner, name = {"save_file": (ckpt_lib, "save_file"), "json.dump": (json, "dump"),
                   "os.fsync": (os, "fsync")}[where]
    real = getattr(owner, name)
    root = tmp_path / "ckpt"
    model_a, opt_a = tiny_model(0)
    model_b, opt_b = tiny_model(1)
    save(root, 2, model_a, opt_a)

    counter = FailAt(real, 0)  # how many calls one save makes
    monkeypatch.setattr(owner, name, counter)
    save(tmp_path / "count", 2, model_a, opt_a)
    assert counter.calls >= 1

    for n in range(1, counter.calls + 1):
        # the last fsync is of the parent directory, after the rename: the new checkpoint is then complete
        after_rename = where == "os.fsync" and n == counter.calls
        for step in (4, 2):  # a new step, and the same step again (replaced whole or not at all)
            monkeypatch.setattr(owner, name, FailAt(real, n))
            with pytest.raises(OSError, match="injected"):
                save(root, step, model_b, opt_b)
            monkeypatch.setattr(owner, name, real)
            assert temporaries(root) == []
            expected = model_b.weight if after_rename and step == 2 else model_a.weight
            torch.testing.assert_close(saved_weight(root / "step_00000002"), expected.detach())
            new = root / "step_00000004"
            assert not new.exists() or after_rename
            if new.exists():
                torch.testing.assert_close(saved_weight(new), model_b.weight.detach())
                shutil.rmtree(new)
            if after_rename:
                save(root, 2, model_a, opt_a)
        assert ckpt_lib.load_latest(root)["state"]["step"] == 2

    # re-saving the same step without a fault replaces it whole
    save(root, 2, model_b, opt_b)
    torch.testing.assert_close(saved_weight(root / "step_00000002"), model_b.weight.detach())
    assert [p.name for p in root.iterdir()] == ["step_00000002"]


def test_killed_writers_temporary_checkpoint_is_ignored_then_removed(tmp_path):
    root = tmp_path / "ckpt"
    model, opt = tiny_model(0)
    save(root, 5, model, opt)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    stale = root / f".step_00000010.tmp-{dead_pid}-x1y2z3"  # a newer step, complete-looking, of a killed writer
    shutil.copytree(root / "step_00000005", stale)
    live = root / f".step_00000010.tmp-{os.getpid()}-a1b2c3"  # a writer still at work: not touched
    live.mkdir()

    assert ckpt_lib.list_checkpoints(root) == [root / "step_00000005"]
    assert ckpt_lib.load_latest(root)["state"]["step"] == 5
    save(root, 6, model, opt)  # another step: still clears the dead writer's leftovers
    assert not stale.exists() and live.is_dir()
    assert [p.name for p in ckpt_lib.list_checkpoints(root)] == ["step_00000005", "step_00000006"]


# ---- resume into another model or optimizer ---------------------------------------------------------------------
def test_resume_with_another_model_or_optimizer_is_a_one_line_error(tmp_path, capsys):
    cfg = tiny_train_config(tmp_path, train={"steps": 2}, checkpoint={"interval": 2})
    train(cfg)
    run = Path(cfg.run_dir)
    before = snapshot(run)
    model = cfg.to_dict()["model"]
    cases = [
        ({"model": {"overrides": {**model["overrides"], "n_layers": 1}}},
         r"written for another model: tensor transformer\.blocks\.1\.\S+ is not in this run's model"),
        ({"model": {"overrides": {**model["overrides"], "n_layers": 3}}},
         r"written for another model: tensor transformer\.blocks\.2\.\S+ of this run is not there"),
        ({"model": {"overrides": {**model["overrides"], "ffn_hidden_size": 32}}},
         r"written for another model: tensor \S+ has shape \[8, 64, 32\] there, \[8, 32, 32\] in this run"),
        ({"optim": {"name": "lionw"}}, r"written with optimizer adamw, this run uses lionw \(optim\.name\)"),
    ]
    for changes, match in cases:
        with pytest.raises(ckpt_lib.CheckpointError, match=match) as e:
            Trainer(with_changes(cfg, **changes), resume="latest")
        assert "\n" not in str(e.value) and "step_00000002" in str(e.value)
    assert snapshot(run) == before  # the run directory is untouched (and unlocked again)

    config = write_config(cfg, tmp_path / "cfg.yaml")
    capsys.readouterr()
    assert main(["pretrain", str(config), "model.overrides.n_layers=1", "--no-sample", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0])
    assert errors[0].startswith("dbrx pretrain: error: checkpoint ") and "another model" in errors[0]


def test_optimizer_state_names_are_compared_without_a_stored_config(tmp_path):
    model, opt = tiny_model(0)
    path = save(tmp_path / "ckpt", 1, model, opt)  # no extra config: only the state names tell
    lion = LionW(model.parameters(), lr=0.1)
    with pytest.raises(ckpt_lib.CheckpointError, match=r"another optimizer \(LionW here\): optimizer state "
                                                      r"state/bias/exp_avg_sq is not in this run"):
        ckpt_lib.apply_checkpoint(ckpt_lib.read_checkpoint(path), model, lion, optim_name="lionw")


# ---- one writer per run directory, fresh runs ---------------------------------------------------------------------
def test_one_trainer_per_run_directory_and_per_data_cache(tmp_path):
    cfg = tiny_train_config(tmp_path, train={"steps": 1})
    run = Path(cfg.run_dir)
    with lock_held_elsewhere(run, inside=True) as pid:
        with pytest.raises(fsutil.LockedError, match=one_line(rf"run directory .* \(pid {pid}, lock .*\.lock\)")):
            Trainer(cfg)
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing else touched
        assert not (tmp_path / "cache").exists()

    trainer = Trainer(cfg)  # the holder is gone: the lock is free
    try:
        # the trainer holds it for its whole life, also against this same process
        with pytest.raises(fsutil.LockedError, match=rf"pid {os.getpid()}\b"):
            Trainer(cfg)
    finally:
        trainer.close()

    # two first runs sharing the prepared-data cache: the second is told who is preparing it
    prepared = sorted(p for p in (tmp_path / "cache").iterdir() if p.is_dir())
    assert len(prepared) == 2
    for p in prepared:
        shutil.rmtree(p)
    other = from_dict(TrainConfig, {**cfg.to_dict(), "run_dir": str(tmp_path / "run2")})
    with lock_held_elsewhere(prepared[0], inside=False) as pid:
        with pytest.raises(fsutil.LockedError, match=rf"prepared data .*pid {pid}\b"):
            Trainer(other)
    Trainer(other).close()


@pytest.mark.parametrize("leftover", ["metrics.jsonl", "final"])
def test_fresh_run_over_earlier_output_needs_overwrite(tmp_path, leftover):
    cfg = tiny_train_config(tmp_path, train={"steps": 1})
    run = Path(cfg.run_dir)
    run.mkdir(parents=True)
    if leftover == "metrics.jsonl":
        (run / "metrics.jsonl").write_text('{"step": 1, "loss": 99.0}\n')
    else:
        (run / "final").mkdir()
        (run / "final" / "config.json").write_text("{}")
    (run / "loss.png").write_bytes(b"old picture")
    with pytest.raises(ValueError, match=rf"earlier run \(.*{leftover}\); pass --resume .* --overwrite") as e:
        Trainer(cfg)
    assert "\n" not in str(e.value)
    assert (run / leftover).exists() and (run / "loss.png").exists()

    trainer = Trainer(cfg, overwrite=True)
    try:
        assert not (run / leftover).exists() and not (run / "loss.png").exists()
        trainer.fit()
    finally:
        trainer.close()
    assert [r["step"] for r in read_metrics(run) if "event" not in r] == [1]
    assert all(r.get("loss") != 99.0 for r in read_metrics(run))


# ---- metrics.jsonl ---------------------------------------------------------------------------------------------
def test_each_metrics_record_is_one_write_of_a_whole_line(tmp_path, monkeypatch):
    log = MetricsLogger(tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()  # created by the first record
    writes = []
    real = os.write

    def spy(fd, data):
        if fd == log.fd:
            writes.append(bytes(data))
        return real(fd, data)

    monkeypatch.setattr(metrics_mod.os, "write", spy)
    log.log({"step": 1, "loss": 2.0, "expert_load": [[0.5] * 8] * 40})
    log.log({"event": "checkpoint", "step": 1, "path": "x"})
    log.close()
    assert len(writes) == 2 and all(w.endswith(b"\n") and w.count(b"\n") == 1 for w in writes)
    assert (tmp_path / "metrics.jsonl").read_bytes() == b"".join(writes)


def test_read_metrics_skips_a_partial_last_line_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2: invalid JSON"):
        read_metrics(tmp_path)


def test_trim_metrics_keeps_each_step_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "start", "step": 0}\n{"step": 1}\nnot json\n{"step": 2}\n{"step": 3}\n'
                    '{"event": "checkpoint", "step": 3}\n{"step": 4, "lo')
    path.chmod(0o640)
    trim_metrics(path, 2)
    # the bad line in the middle stays for read_metrics to report; the partial line and steps 3, 4 go
    assert path.read_text() == '{"event": "start", "step": 0}\n{"step": 1}\nnot json\n{"step": 2}\n'
    assert path.stat().st_mode & 0o777 == 0o640 and temporaries(tmp_path) == []
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_resume_after_a_crash_mid_record_writes_each_step_once(tmp_path, capsys):
    cfg = tiny_train_config(tmp_path, train={"steps": 4}, checkpoint={"interval": 2, "keep": 2})
    train(cfg)
    run = Path(cfg.run_dir)
    # as if killed while writing step 5's record, after step 4's but before its checkpoint
    shutil.rmtree(cfg.checkpoint_dir / "step_00000004")
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 5, "loss": 1.')
    assert [r["step"] for r in read_metrics(run) if "event" not in r] == [1, 2, 3, 4]

    config = write_config(cfg, tmp_path / "cfg.yaml")
    assert main(["pretrain", str(config), "--no-sample", "--resume"]) == 0, capsys.readouterr().err[-2000:]
    text = (run / "metrics.jsonl").read_text()
    assert text.endswith("\n")
    records = [json.loads(line) for line in text.splitlines()]  # every line parses
    assert [r["step"] for r in records if "event" not in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if r.get("event") == "resume"] == [2]
    assert [r["step"] for r in records if r.get("event") == "end"] == [4]
    assert (run / "loss.png").is_file()


# ---- prepared data ---------------------------------------------------------------------------------------------
def jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture
def two_inputs(tmp_path) -> list[Path]:
    a = jsonl(tmp_path / "a.jsonl", [f"document {i} of the first file, with some words" for i in range(12)])
    b = jsonl(tmp_path / "b.jsonl", [f"document {i} of the second file" for i in range(8)])
    return [a, b]


def test_failed_prepare_leaves_the_old_directory_as_it_was(tmp_path, two_inputs, monkeypatch):
    out = tmp_path / "out"
    prepare(two_inputs, out, workers=1, shard_tokens=40)
    before = snapshot(out)
    assert len(TokenDataset(out).index["shards"]) > 2

    two_inputs[1].write_text('{"text": "fine"}\n{"text": broken\n')  # a bad line in the second file
    for dest in (out, tmp_path / "fresh"):
        with pytest.raises(ValueError, match=r"b\.jsonl: line 2: invalid JSON"):
            prepare(two_inputs, dest, workers=1, shard_tokens=40)
    assert snapshot(out) == before and not (tmp_path / "fresh").exists()
    assert temporaries(tmp_path) == []

    jsonl(two_inputs[1], ["changed second file"] * 5)
    real_flush = data_mod._ShardWriter.flush
    for dest in (out, tmp_path / "fresh"):
        fail = FailAt(real_flush, 2)  # the disk fills after a shard is written
        monkeypatch.setattr(data_mod._ShardWriter, "flush", lambda self, fail=fail: fail(self))
        with pytest.raises(OSError, match="injected"):
            prepare(two_inputs, dest, workers=1, shard_tokens=40)
        assert fail.calls == 2
    monkeypatch.setattr(data_mod._ShardWriter, "flush", real_flush)
    assert snapshot(out) == before and not (tmp_path / "fresh").exists()
    assert temporaries(tmp_path) == []
    TokenDataset(out, verify=True)


def test_readers_see_the_old_data_until_the_new_is_complete(tmp_path, two_inputs):
    out = tmp_path / "out"
    old = prepare(two_inputs, out, workers=1, shard_tokens=40)["tokens"]
    jsonl(two_inputs[1], ["a longer second file than before, " * 20] * 5)
    seen = []
    new = prepare(two_inputs, out, workers=1, shard_tokens=40,
                  progress=lambda *_: seen.append(TokenDataset(out, verify=True).num_tokens))
    assert seen and set(seen) == {old}
    assert TokenDataset(out, verify=True).num_tokens == new["tokens"] != old


def test_second_prepare_into_one_out_is_refused(tmp_path, two_inputs):
    out = tmp_path / "out"
    prepare(two_inputs, out, workers=1)
    before = snapshot(out)
    jsonl(two_inputs[1], ["changed"])  # so that a prepare would rewrite it
    with lock_held_elsewhere(out, inside=False) as pid:
        message = one_line(rf"prepared data .*{out.name} is in use .*\(pid {pid}\b")
        with pytest.raises(fsutil.LockedError, match=message):
            prepare(two_inputs, out, workers=1)
    assert snapshot(out) == before and temporaries(tmp_path) == []
    assert prepare(two_inputs, out, workers=1)["status"] == "written"  # free once the holder is gone


def test_prepare_refuses_a_directory_that_is_not_prepared_data(tmp_path, two_inputs):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty and holds no prepared data"):
        prepare(two_inputs, out, workers=1)
    assert snapshot(out) == {"todo.txt": b"keep me"} and temporaries(tmp_path) == []
