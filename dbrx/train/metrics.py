"""Training metrics: JSONL in the run directory (always), TensorBoard / MLflow (when asked), a console line.

Each optimizer step writes one JSON object to `RUN_DIR/metrics.jsonl` with `step`, `loss`, `lm_loss`,
`lb_loss`, `z_loss`, `lr`, `grad_norm`, `tokens_per_s`, `mfu`, `mem_gb`, `lb_per_layer` (each layer's
E * sum_e f_e * P_e, 1.0 = balanced), `expert_load_max` / `expert_load_min` (per layer) and, every few steps,
`expert_load` (the full (L, E) share matrix). Other records carry an `event` key (`start`, `eval`, `resume`,
`nan_skip`, `checkpoint`, `end`).

Each record is one `os.write` of a whole line to an `O_APPEND` descriptor, so a crash leaves at most one partial
last line. A resumed run first trims the file (`trim_metrics`): the partial line goes, and so do the records after
the checkpoint it resumes from, which it is about to write again; each step then appears once.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dbrx.devices import peak_flops
from dbrx.fsutil import fsync_path


def detect_peak_flops(device: torch.device, setting: float | str | None = "auto") -> float | None:
    """FLOP/s used as the MFU denominator: the setting if a number; a known GPU peak; else a measured CPU rate."""
    if setting is None or isinstance(setting, (int, float)):
        return float(setting) if setting else None
    if device.type == "cuda":
        return peak_flops(device)
    return measure_cpu_matmul_flops()


def measure_cpu_matmul_flops(n: int = 512, repeats: int = 5) -> float:
    """Best fp32 FLOP/s of an n x n matmul on this CPU with the current thread count (a nominal peak).

    n = 512 measures what 1024 does (2 cores, AVX2: 90-91 GFLOP/s both) with 3 MB of matrices instead of 12, which
    the trainer's CPU heap would otherwise keep (keep_freed_memory)."""
    g = torch.Generator().manual_seed(0)  # leave the global RNG (dropout, router jitter) untouched
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    a @ b  # warm-up
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def memory_gb(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset; CPU: peak resident set size of this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return rss_kb / 2**20


class MetricsLogger:
    """Writes metrics from rank 0; every method is a no-op on other ranks."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = False,
                 mlflow: bool = False, config: dict[str, Any] | None = None) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.fd = -1  # opened at the first record: a run that fails while being set up leaves no empty file
        self.tb = self.mlflow = None
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if mlflow:
            import mlflow as mlflow_mod

            self.mlflow = mlflow_mod
            mlflow_mod.start_run(run_name=Path(run_dir).name)
            if config:
                mlflow_mod.log_params({k: str(v)[:250] for k, v in _flat(config).items()})

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.fd < 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        line = (json.dumps(record, default=_jsonable) + "\n").encode()
        written = os.write(self.fd, line)  # one write of the whole line: never interleaved, never half buffered
        while written < len(line):  # a short write (a full disk): finish the line or fail
            written += os.write(self.fd, line[written:])
        kind = "train" if "event" not in record else "eval" if record["event"] == "eval" else None
        if kind is None or "step" not in record:
            return
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{kind}/{k}", v, record["step"])
        if self.mlflow is not None:
            self.mlflow.log_metrics({k: float(v) for k, v in scalars.items() if math.isfinite(v)}, step=record["step"])

    def resume_at(self, step: int) -> None:
        """Before a resumed run appends: drop a partial last line and the records after `step` (`trim_metrics`)."""
        if not self.enabled:
            return
        self._close_file()  # trimming replaces the file: the next record opens the new one
        trim_metrics(self.path, step)

    def print(self, line: str) -> None:
        if self.enabled:
            print(line, file=sys.stderr, flush=True)

    def _close_file(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        if not self.enabled:
            return
        self._close_file()
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run()


def progress_line(step: int, steps: int, m: dict[str, Any], elapsed: float, start_step: int = 0) -> str:
    """One console line: a bar, step, loss, lr, grad norm, tokens/s, MFU, memory, ETA.

    `elapsed` is the time since `start_step` (where this process began, e.g. a resumed checkpoint).
    """
    width = 20
    done = int(width * step / steps)
    eta = elapsed / max(step - start_step, 1) * (steps - step)
    mfu = f"{100 * m['mfu']:.1f}%" if m.get("mfu") is not None else "n/a"
    return (f"[{'#' * done}{'.' * (width - done)}] step {step}/{steps} loss {m['loss']:.4f} "
            f"(lm {m['lm_loss']:.4f} lb {m['lb_loss']:.3f}) lr {m['lr']:.2e} gnorm {m['grad_norm']:.2f} "
            f"{m['tokens_per_s']:,.0f} tok/s MFU {mfu} mem {m['mem_gb']:.1f}G "
            f"eta {_hms(eta)}")


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def _jsonable(o: Any) -> Any:
    if hasattr(o, "tolist"):  # tensors, NumPy arrays and scalars
        return o.tolist()
    return str(o)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _parse(line: bytes) -> Any:
    try:
        return json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None


def trim_metrics(path: str | os.PathLike, step: int) -> None:
    """Rewrite a metrics file for a run resumed at `step`: drop a partial last line (cut short by a crash: no newline
    or not JSON) and every record whose `step` is after `step`. The file is replaced atomically, only if it changes.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    lines = data.split(b"\n")[:-1]  # what follows the last newline is a partial line (or nothing)
    if lines and _parse(lines[-1]) is None:
        lines.pop()
    # a bad line in the middle is kept as it is: read_metrics reports it
    kept = [x for x in lines if not (isinstance(r := _parse(x), dict) and isinstance(r.get("step"), int)
                                     and r["step"] > step)]
    new = b"".join(x + b"\n" for x in kept)
    if new == data:
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(new)
            f.flush()
            os.fsync(f.fileno())
        shutil.copymode(path, tmp)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)  # make the rename durable


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of RUN_DIR/metrics.jsonl (FileNotFoundError naming the file when absent).

    A bad line in the middle is a ValueError; a bad last line is skipped: a write cut short by a crash.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (is {run_dir} a training run directory?)")
    lines = path.read_bytes().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    out = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            if (record := _parse(line)) is None:
                if i == len(lines):
                    break
                raise ValueError(f"{path}: line {i}: invalid JSON")
            out.append(record)
    return out


__all__ = ["MetricsLogger", "detect_peak_flops", "measure_cpu_matmul_flops", "memory_gb", "progress_line",
           "read_metrics", "trim_metrics"]
