"""Training metrics: JSONL in the run directory (always), TensorBoard / MLflow (when asked), a console line.

Each optimizer step writes one JSON object to `RUN_DIR/metrics.jsonl` with `step`, `loss`, `lm_loss`,
`lb_loss`, `z_loss`, `lr`, `grad_norm`, `tokens_per_s`, `mfu`, `mem_gb`, `expert_load_max` / `expert_load_min`
(per layer) and, every few steps, `expert_load` (the full (L, E) share matrix). Other records carry an `event`
key (`start`, `eval`, `resume`, `nan_skip`, `checkpoint`, `end`).
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dbrx.devices import peak_flops


def detect_peak_flops(device: torch.device, setting: float | str | None = "auto") -> float | None:
    """FLOP/s used as the MFU denominator: the setting if a number; a known GPU peak; else a measured CPU rate."""
    if setting is None or isinstance(setting, (int, float)):
        return float(setting) if setting else None
    if device.type == "cuda":
        return peak_flops(device)
    return measure_cpu_matmul_flops()


def measure_cpu_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """Best fp32 FLOP/s of an n x n matmul on this CPU with the current thread count (a nominal peak)."""
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
        self.tb = self.mlflow = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a")
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
        self.file.write(json.dumps(record, default=_jsonable) + "\n")
        self.file.flush()
        kind = "train" if "event" not in record else "eval" if record["event"] == "eval" else None
        if kind is None or "step" not in record:
            return
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{kind}/{k}", v, record["step"])
        if self.mlflow is not None:
            self.mlflow.log_metrics({k: float(v) for k, v in scalars.items() if math.isfinite(v)}, step=record["step"])

    def print(self, line: str) -> None:
        if self.enabled:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
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


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of RUN_DIR/metrics.jsonl (FileNotFoundError naming the file when absent)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (is {run_dir} a training run directory?)")
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}: line {i}: invalid JSON") from None
    return out


__all__ = ["MetricsLogger", "detect_peak_flops", "measure_cpu_matmul_flops", "memory_gb", "progress_line",
           "read_metrics"]
