"""Training checkpoints: atomic, keep the last K, exact resume, fall back past a corrupt one.

A checkpoint is a directory `CKPT_DIR/step_00000100/` holding

    model.safetensors   full (unsharded) model state
    optim.safetensors   optimizer state tensors, keys `state/<param fqn>/<name>`
    rng.safetensors     torch CPU (and CUDA) generator states
    state.json          step, optimizer param groups, data loader state, Python and NumPy RNG states, any extra
                        JSON, and the size and sha256 of each file above (written last)

Nothing is pickled: tensors go to safetensors, everything else to JSON. The directory is written into a fresh
temporary directory and swapped in whole when complete (`fsutil.atomic_dir`), so a crash never leaves a half-written
`step_*` and re-saving a step never leaves a moment without it. Loading checks sizes and checksums before touching
the model, then that the checkpoint fits the model and optimizer of this run; a bad checkpoint is skipped with a
warning in favour of the one before. With FSDP every rank takes part in gathering the state (collectives); rank 0
writes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from dbrx import fsutil

from .data import sha256_file

STEP_RE = re.compile(r"^step_(\d{8})$")
STATE_NAME = "state.json"
FILES = ("model.safetensors", "optim.safetensors", "rng.safetensors")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, truncated, checksum mismatch)."""


# ---- RNG --------------------------------------------------------------------------------------------------
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, JSON) capturing the torch, CUDA, NumPy and Python generators."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, pstate, pgauss = random.getstate()
    meta = {"numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(pstate), pgauss]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    kind, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, pstate, pgauss = meta["python"]
    random.setstate((version, tuple(pstate), pgauss))


# ---- helpers ----------------------------------------------------------------------------------------------
def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, (np.ndarray, torch.Tensor)):
        return o.tolist()
    if isinstance(o, (tuple, set)):
        return list(o)
    raise TypeError(f"cannot store {type(o).__name__} in a checkpoint's state.json")


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories (those with a state.json), oldest first; temporary ones are skipped."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir()
             if not fsutil.is_temporary(p) and (m := STEP_RE.match(p.name)) and (p / STATE_NAME).is_file()]
    return [p for _, p in sorted(found)]


def _flatten_optim(osd: dict[str, Any], copy: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, other = {}, {}
    for fqn, state in osd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{fqn}/{name}"] = value.detach().cpu().contiguous() if copy else value
            else:
                other.setdefault(fqn, {})[name] = value
    return tensors, {"param_groups": osd["param_groups"], "other_state": other}


def _unflatten_optim(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        _, rest = key.split("/", 1)
        fqn, name = rest.rsplit("/", 1)
        state.setdefault(fqn, {})[name] = t
    for fqn, extra in meta["other_state"].items():
        state.setdefault(fqn, {}).update(extra)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---- save -------------------------------------------------------------------------------------------------
def save_checkpoint(
    ckpt_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader_state: dict[str, Any],
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` atomically, then keep only it and the `keep` - 1 before it; returns its directory.

    Must be called on every rank (gathering the sharded state is collective); only rank 0 writes.
    """
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    root = Path(ckpt_dir)
    final = root / f"step_{step:08d}"
    if _is_main():
        _remove_stale_temporaries(root)
        otensors, ometa = _flatten_optim(osd)
        rtensors, rmeta = rng_state()
        # atomic_dir fsyncs every file and swaps the directory in with one rename: an existing `final` (re-saving
        # a step after a resume) stays whole until the new one is complete
        with fsutil.atomic_dir(final) as tmp:
            save_file({k: v.contiguous() for k, v in msd.items()}, tmp / "model.safetensors")
            save_file(otensors, tmp / "optim.safetensors")
            save_file(rtensors, tmp / "rng.safetensors")
            files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
                     for name in FILES}
            state = {"step": step, "optim": ometa, "loader": loader_state, "rng": rmeta, "extra": extra or {},
                     "files": files}
            with open(tmp / STATE_NAME, "w") as f:
                json.dump(state, f, default=_json_default)
        _prune(root, step, keep)
    if dist.is_initialized():
        dist.barrier()
    return final


def _remove_stale_temporaries(root: Path) -> None:
    """Remove temporary directories of any step left by a killed writer (atomic_dir only clears those of the step
    it writes, and a resumed run rarely saves that same step again)."""
    if root.is_dir():
        names = {p.name[1:].split(".tmp-", 1)[0] for p in root.iterdir() if fsutil.is_temporary(p)}
        for name in names:
            fsutil.remove_stale_temporaries(root / name)


def _prune(root: Path, step: int, keep: int) -> None:
    """Keep the newest `keep` checkpoints up to `step`. Later ones are from a run that was resumed from an earlier
    checkpoint: left in place they would be taken for the newest (by `--resume` and by this pruning)."""
    found = list_checkpoints(root)
    newer = [p for p in found if int(STEP_RE.match(p.name).group(1)) > step]
    upto = [p for p in found if p not in newer]
    for old in newer + upto[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ---- load -------------------------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Verify and read one checkpoint into memory: {'state': json, 'model', 'optim', 'rng': tensors}."""
    path = Path(path)
    try:
        state = json.loads((path / STATE_NAME).read_text())
        expected = {name: (state["files"][name]["bytes"], state["files"][name]["sha256"]) for name in FILES}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {STATE_NAME} (not a complete checkpoint)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / STATE_NAME}: unreadable ({type(e).__name__}: {e})") from None
    for name, (size, digest) in expected.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, expected {size} (truncated?)")
        if sha256_file(f) != digest:
            raise CheckpointError(f"{f}: checksum mismatch (corrupt)")
    try:
        tensors = {name.split(".")[0]: load_file(path / name) for name in FILES}
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: cannot read tensors ({e})") from None
    return {"path": path, "state": state, **tensors}


def load_latest(ckpt_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The newest readable checkpoint in `ckpt_dir` (warning about any skipped), or None when there is none."""
    candidates = list_checkpoints(ckpt_dir)
    for path in reversed(candidates):
        try:
            return read_checkpoint(path)
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint {path.name}: {e}; falling back to the previous one", stacklevel=2)
    if candidates:
        raise CheckpointError(f"{ckpt_dir}: no usable checkpoint (all {len(candidates)} are corrupt)")
    return None


def resolve_resume(resume: str, ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """`latest` (the newest usable checkpoint in ckpt_dir) or a checkpoint directory -> its read contents."""
    if resume == "latest":
        ckpt = load_latest(ckpt_dir)
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {ckpt_dir}")
        return ckpt
    p = Path(resume)
    if not p.is_dir():
        raise FileNotFoundError(f"--resume: checkpoint directory {p} not found")
    if not (p / STATE_NAME).is_file() and list_checkpoints(p):
        ckpt = load_latest(p)
        assert ckpt is not None
        return ckpt
    return read_checkpoint(p)


def check_compatible(ckpt: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                     optim_name: str | None = None) -> None:
    """CheckpointError naming the first difference when `ckpt` was written for another model or optimizer.

    Checked before loading: torch would otherwise fail half-way through with a long RuntimeError. `optim_name` is
    this run's `optim.name`, compared with the one in the checkpoint's stored config (when it has one).
    """
    where = f"checkpoint {ckpt['path']}"
    # sharded state (no gathering): DTensors report the full shapes
    here = {k: tuple(v.shape) for k, v in get_model_state_dict(model).items()}
    there = {k: tuple(v.shape) for k, v in ckpt["model"].items()}
    for name, shape in here.items():
        if name not in there:
            raise CheckpointError(f"{where} was written for another model: tensor {name} of this run is not there")
        if there[name] != shape:
            raise CheckpointError(f"{where} was written for another model: tensor {name} has shape "
                                  f"{list(there[name])} there, {list(shape)} in this run")
    if extra := sorted(set(there) - set(here)):
        raise CheckpointError(f"{where} was written for another model: tensor {extra[0]} is not in this run's model")

    config = ckpt["state"].get("extra", {}).get("config") or {}
    saved = (config.get("optim") or {}).get("name")
    if optim_name is not None and saved is not None and saved != optim_name:
        raise CheckpointError(f"{where} was written with optimizer {saved}, this run uses {optim_name} (optim.name)")
    if not ckpt["optim"]:
        return  # no optimizer step was taken before the save: nothing to compare
    tensors, _ = _flatten_optim(get_optimizer_state_dict(model, optimizer), copy=False)
    for ours, theirs, missing in ((tensors, ckpt["optim"], "not there"), (ckpt["optim"], tensors, "not in this run")):
        if diff := sorted(set(ours) - set(theirs)):
            raise CheckpointError(f"{where} was written for another optimizer ({type(optimizer).__name__} here): "
                                  f"optimizer state {diff[0]} is {missing}")


def apply_checkpoint(ckpt: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                     optim_name: str | None = None) -> dict[str, Any]:
    """Load model, optimizer and RNG states (every rank; FSDP shards are taken from the full tensors).

    Raises CheckpointError (before changing anything) when the checkpoint does not fit the model or optimizer.
    Returns the JSON state (step, loader, extra).
    """
    check_compatible(ckpt, model, optimizer, optim_name)
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, ckpt["model"], options=opts)
    osd = _unflatten_optim(ckpt["optim"], ckpt["state"]["optim"])
    set_optimizer_state_dict(model, optimizer, osd, options=opts)
    set_rng_state(ckpt["rng"], ckpt["state"]["rng"])
    return ckpt["state"]


__all__ = ["save_checkpoint", "read_checkpoint", "load_latest", "resolve_resume", "apply_checkpoint",
           "check_compatible", "list_checkpoints", "CheckpointError", "rng_state", "set_rng_state"]
