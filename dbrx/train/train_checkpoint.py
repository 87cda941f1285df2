"""Training checkpoints: sharded (torch.distributed.checkpoint), atomic, keep the last K, exact and elastic resume,
fall back past a corrupt one, export to the Hugging Face layout tensor by tensor.

A checkpoint is a directory `CKPT_DIR/step_00000100/` holding

    .metadata, __R_0.distcp   a DCP checkpoint of the model's trained tensors (keys `model/<fqn>`; with LoRA the
                              adapters only, the frozen base is not stored) and the optimizer state tensors
                              (`optim/state/<fqn>/<name>`): each rank writes only its own shards (`__R_0.distcp`),
                              nothing is gathered to one rank; `.metadata` records every tensor's global shape and
                              where its pieces are
    rng-0000R.safetensors     rank R's torch CPU (and CUDA) generator states; its NumPy and Python states as JSON in
                              the safetensors header
    state.json                step, world size, optimizer param groups, data loader state, any extra JSON, and the
                              size and sha256 of every file above (written last)

DCP reshards on load, so a checkpoint written by N processes resumes with M (one process included: the same format
without a process group). The RNG states map 1:1 only when M == N (`restore_rng`); otherwise the caller reseeds.
Tensor data is read with `torch.load(weights_only=True)`; DCP's `.metadata` is a pickle, read with an allowlist of
DCP's own record types, torch sizes and dtypes (nothing that runs code). All ranks write into one temporary
directory that rank 0 makes with `fsutil.atomic_dir` and swaps in whole once state.json is written, so a crash
never leaves a half-written `step_*`; an error on any rank is raised on every rank and leaves the old checkpoints
as they were. Loading checks sizes and checksums (the ranks share the work) before touching the model, then that
the checkpoint fits the model and optimizer of this run; a bad checkpoint is skipped with a warning in favour of
the one before. The ranks must see one shared file system.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from dbrx import fsutil, hf_checkpoint
from dbrx.config import DbrxConfig
from dbrx.model import DbrxForCausalLM

from .config import resolve_path
from .data import sha256_file

STEP_RE = re.compile(r"^step_(\d{8})$")
STATE_NAME = "state.json"
METADATA_NAME = ".metadata"
MODEL, OPTIM = "model/", "optim/"  # key prefixes inside the DCP checkpoint
# the model part holds what trains: everything in full training, the adapters only with a frozen (LoRA) base
_TRAINED = StateDictOptions(ignore_frozen_params=True)
# loading: the frozen tensors are absent (not an error); check_compatible has matched the trained ones by name
_LOAD_TRAINED = StateDictOptions(ignore_frozen_params=True, strict=False)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, truncated, checksum mismatch, another model)."""


# ---- ranks ------------------------------------------------------------------------------------------------
def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _is_main() -> bool:
    return _rank_world()[0] == 0


def everywhere(fn: Callable[[], Any], collective: bool = True) -> list[Any]:
    """Run `fn` on every rank (call on every rank) and return every rank's result. An error on any rank is raised on
    every rank (the lowest rank's), so that no rank waits in a collective for one that gave up, and all take the same
    branch. Without `collective` (or a process group) just `[fn()]`."""
    out, err = None, None
    try:
        out = fn()
    except Exception as e:
        err = e
    world = _rank_world()[1]
    if not collective or world == 1:
        if err is not None:
            raise err
        return [out]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (out, err))
    errors = [e for _, e in gathered if e is not None]
    if err is not None:
        raise err
    if errors:
        raise errors[0]
    return [o for o, _ in gathered]


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


def _rng_name(rank: int) -> str:
    return f"rng-{rank:05d}.safetensors"


def _save_rng(path: Path) -> None:
    tensors, meta = rng_state()
    save_file(tensors, path, metadata={"rng": json.dumps(meta)})


def restore_rng(ckpt: dict[str, Any]) -> bool:
    """Restore this rank's generators from the same rank's saved states. False (nothing changed) when the checkpoint
    was written by another number of processes: rank states cannot map 1:1, the caller reseeds."""
    rank, world = _rank_world()
    if int(ckpt["state"].get("world", 1)) != world:
        return False
    with safe_open(str(ckpt["path"] / _rng_name(rank)), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["rng"])
    set_rng_state(tensors, meta)
    return True


# ---- DCP --------------------------------------------------------------------------------------------------
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "pathlib._local": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if not dtype and name not in _METADATA_CLASSES.get(module, ()):
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not part of DCP's metadata)")
        return super().find_class(module, name)


class _Reader(dcp.FileSystemReader):
    """DCP's file reader with its `.metadata` read once, through the allowlist above."""

    def __init__(self, path: str | os.PathLike, metadata: Metadata | None = None) -> None:
        super().__init__(path)
        self._dir, self._metadata = Path(path), metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None:
            f = self._dir / METADATA_NAME
            try:
                with open(f, "rb") as fh:
                    self._metadata = _MetadataUnpickler(fh).load()
            except FileNotFoundError:
                raise CheckpointError(f"{f}: missing") from None
            except Exception as e:  # any unpickling failure: a damaged or foreign file
                raise CheckpointError(f"{f}: unreadable ({type(e).__name__}: {e})") from None
            if not isinstance(self._metadata, Metadata):
                raise CheckpointError(f"{f}: not DCP metadata")
        if getattr(self._metadata, "storage_meta", None) is not None and hasattr(self, "load_id"):
            self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


@contextlib.contextmanager
def _dcp_errors(what: str | None = None):
    """DCP reports a failure on any rank as a CheckpointException (a BaseException, raised on every rank): raise the
    lowest rank's failure itself instead, or with `what` (a load) a one-line CheckpointError unless it is an OSError."""
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        try:
            yield
        except CheckpointException as e:
            first = e.failures[min(e.failures)][0] if e.failures else RuntimeError(str(e))
            if what is None or isinstance(first, (OSError, CheckpointError)):
                raise first from None
            line = (str(first).strip().splitlines() or [""])[0]
            raise CheckpointError(f"{what}: {type(first).__name__}" + (f": {line}" if line else "")) from None


def _dcp_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with _dcp_errors():
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(path), no_dist=not dist.is_initialized())


def _dcp_load(tensors: dict[str, torch.Tensor], reader: _Reader, what: str, local: bool = False) -> None:
    """Fill `tensors` in place (plain tensors or this rank's shards of DTensors) from the checkpoint."""
    with _dcp_errors(what):
        dcp.load(tensors, storage_reader=reader, no_dist=local or not dist.is_initialized())


def _tensor_sizes(metadata: Metadata, prefix: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name (without the prefix) -> (global shape, dtype) of the checkpoint's tensors under `prefix`."""
    return {k[len(prefix):]: (tuple(m.size), m.properties.dtype) for k, m in metadata.state_dict_metadata.items()
            if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}


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


def _step_of(path: Path) -> int:
    return int(STEP_RE.match(path.name).group(1))


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories (those with a state.json), oldest first; temporary ones are skipped."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir()
             if not fsutil.is_temporary(p) and (m := STEP_RE.match(p.name)) and (p / STATE_NAME).is_file()]
    return [p for _, p in sorted(found)]


def _flatten_optim(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, other = {}, {}
    for fqn, state in osd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{fqn}/{name}"] = value
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


def _sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict, dict[str, Any]]:
    """(model tensors, optimizer tensors, optimizer JSON): this rank's shards (DTensors under FSDP), not copies."""
    otensors, ometa = _flatten_optim(get_optimizer_state_dict(model, optimizer))
    return get_model_state_dict(model, options=_TRAINED), otensors, ometa


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

    Call on every rank: each writes its own shards and RNG state into one temporary directory made by rank 0, which
    writes state.json last and swaps the directory in. An error on any rank is raised on all of them.
    """
    rank, world = _rank_world()
    root = Path(ckpt_dir)
    final = root / f"step_{step:08d}"
    msd, otensors, ometa = _sharded_state(model, optimizer)
    tensors = {**{MODEL + k: v for k, v in msd.items()}, **{OPTIM + k: v for k, v in otensors.items()}}

    with contextlib.ExitStack() as stack:
        def make_temporary() -> str | None:
            if rank != 0:
                return None
            fsutil.remove_stale_temporaries(root)  # any step's, left by a killed writer, not only this step's
            # atomic_dir fsyncs every file and swaps the directory in with one rename (when `commit` closes it): an
            # existing `final` (re-saving a step after a resume) stays whole until the new one is complete
            return str(stack.enter_context(fsutil.atomic_dir(final)))

        tmp = Path(everywhere(make_temporary)[0])
        _dcp_save(tensors, tmp)
        everywhere(lambda: _save_rng(tmp / _rng_name(rank)))
        shares = everywhere(lambda: _describe(tmp, sorted(p.name for p in tmp.iterdir())[rank::world]))

        def write_state() -> None:
            if rank == 0:
                files = {n: share[n] for share in shares for n in share}
                state = {"step": step, "world": world, "optim": ometa, "loader": loader_state, "extra": extra or {},
                         "files": dict(sorted(files.items()))}
                with open(tmp / STATE_NAME, "w") as f:
                    json.dump(state, f, default=_json_default)

        everywhere(write_state)
        commit = stack.pop_all()  # from here on, leaving the block keeps the temporary directory for `commit`

    def finish() -> None:
        commit.close()  # rank 0: fsync and rename into place (on an error the temporary directory is removed)
        if rank == 0:
            _prune(root, step, keep)

    everywhere(finish)
    return final


def _describe(path: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {n: {"bytes": (path / n).stat().st_size, "sha256": sha256_file(path / n)} for n in names}


def _prune(root: Path, step: int, keep: int) -> None:
    """Keep the newest `keep` checkpoints up to `step`. Later ones are from a run that was resumed from an earlier
    checkpoint: left in place they would be taken for the newest (by `--resume` and by this pruning)."""
    found = list_checkpoints(root)
    newer = [p for p in found if _step_of(p) > step]
    upto = [p for p in found if p not in newer]
    for old in newer + upto[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ---- load -------------------------------------------------------------------------------------------------
def _verify(path: Path, files: dict[str, Any], share: list[str]) -> None:
    """Every listed file is there with its size; those in `share` also match their checksum."""
    for name in sorted(files):
        f = path / name
        if not hf_checkpoint.plain_file_name(name):
            raise CheckpointError(f"{path / STATE_NAME}: lists {name!r}, which is not a plain file name")
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        if f.stat().st_size != files[name]["bytes"]:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, expected {files[name]['bytes']} (truncated?)")
    for name in share:
        if sha256_file(path / name) != files[name]["sha256"]:
            raise CheckpointError(f"{path / name}: checksum mismatch (corrupt)")


def read_checkpoint(path: str | os.PathLike, collective: bool = True) -> dict[str, Any]:
    """Verify one checkpoint and read its state.json and DCP metadata (no tensors): {'path', 'state', 'metadata'}.

    Under torchrun, with `collective`, call it on every rank: the ranks share the checksums and agree on the verdict.
    """
    path = Path(path)
    rank, world = _rank_world() if collective else (0, 1)
    out: dict[str, Any] = {"path": path}

    def check() -> None:  # fills `out` on every rank (nothing large travels between ranks)
        try:
            state = json.loads((path / STATE_NAME).read_text())
            files = {name: {"bytes": int(f["bytes"]), "sha256": str(f["sha256"])} for name, f in state["files"].items()}
            int(state["step"])
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no {STATE_NAME} (not a complete checkpoint)") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path / STATE_NAME}: unreadable ({type(e).__name__}: {e})") from None
        if METADATA_NAME not in files:
            raise CheckpointError(f"{path}: not a sharded (DCP) checkpoint; written by an older dbrx?")
        needed = [_rng_name(r) for r in range(int(state.get("world", 1)))]
        if missing := [n for n in needed if n not in files]:
            raise CheckpointError(f"{path / STATE_NAME}: unreadable (no entry for {missing[0]})")
        _verify(path, files, sorted(files)[rank::world])
        metadata = _Reader(path).read_metadata()
        shards = {info.relative_path for info in (metadata.storage_data or {}).values()}
        if unlisted := sorted(shards - set(files)):
            raise CheckpointError(f"{path / STATE_NAME}: unreadable (no entry for {unlisted[0]})")
        out.update(state=state, metadata=metadata)

    everywhere(check, collective)
    return out


def load_latest(ckpt_dir: str | os.PathLike, collective: bool = True) -> dict[str, Any] | None:
    """The newest readable checkpoint in `ckpt_dir` (warning about any skipped), or None when there is none."""
    candidates = list_checkpoints(ckpt_dir)
    for path in reversed(candidates):
        try:
            return read_checkpoint(path, collective)
        except CheckpointError as e:
            if _is_main() or not collective:
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

    Checked from the DCP metadata (global shapes) before loading: DCP would otherwise fail half-way through with a
    long error. `optim_name` is this run's `optim.name`, compared with the one in the checkpoint's stored config.
    """
    where = f"checkpoint {ckpt['path']}"
    # sharded state (no gathering): DTensors report the full shapes
    here = {k: tuple(v.shape) for k, v in get_model_state_dict(model, options=_TRAINED).items()}
    there = {k: shape for k, (shape, _) in _tensor_sizes(ckpt["metadata"], MODEL).items()}
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
    theirs = _tensor_sizes(ckpt["metadata"], OPTIM)
    if not theirs:
        return  # no optimizer step was taken before the save: nothing to compare
    ours, _ = _flatten_optim(get_optimizer_state_dict(model, optimizer))
    for a, b, missing in ((ours, theirs, "not there"), (theirs, ours, "not in this run")):
        if diff := sorted(set(a) - set(b)):
            raise CheckpointError(f"{where} was written for another optimizer ({type(optimizer).__name__} here): "
                                  f"optimizer state {diff[0]} is {missing}")


def apply_checkpoint(ckpt: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                     optim_name: str | None = None) -> dict[str, Any]:
    """Load the model and optimizer states (every rank reads its own shards; DCP reshards to this world size).

    Raises CheckpointError before changing anything when the checkpoint does not fit the model or optimizer (and
    also, with the model partly loaded, when DCP fails to read it). Returns the JSON state (step, world, loader,
    extra). The RNG states are `restore_rng`'s.
    """
    check_compatible(ckpt, model, optimizer, optim_name)
    msd, otensors, _ = _sharded_state(model, optimizer)
    has_optim = bool(_tensor_sizes(ckpt["metadata"], OPTIM))
    tensors = {**{MODEL + k: v for k, v in msd.items()},
               **({OPTIM + k: v for k, v in otensors.items()} if has_optim else {})}
    _dcp_load(tensors, _Reader(ckpt["path"], ckpt["metadata"]), f"checkpoint {ckpt['path']}: cannot load")
    set_model_state_dict(model, {k: tensors[MODEL + k] for k in msd}, options=_LOAD_TRAINED)
    if has_optim:
        osd = _unflatten_optim({k: tensors[OPTIM + k] for k in otensors}, ckpt["state"]["optim"])
        set_optimizer_state_dict(model, optimizer, osd)
    return ckpt["state"]


def load_tensor(ckpt: dict[str, Any], key: str, reader: _Reader | None = None) -> torch.Tensor:
    """One whole tensor of a read checkpoint (e.g. 'model/lm_head.weight'), read by this process alone from the
    shards of every rank that wrote it."""
    if key not in (sizes := _tensor_sizes(ckpt["metadata"], "")):
        raise CheckpointError(f"checkpoint {ckpt['path']} holds no tensor {key}")
    shape, dtype = sizes[key]
    out = {key: torch.empty(shape, dtype=dtype)}
    reader = reader or _Reader(ckpt["path"], ckpt["metadata"])
    _dcp_load(out, reader, f"checkpoint {ckpt['path']}: cannot read {key}", local=True)
    return out[key]


# ---- export -----------------------------------------------------------------------------------------------
def _pick(source: str | os.PathLike, step: int | None) -> dict[str, Any]:
    """One checkpoint (verified, this process only) of a run directory, checkpoint directory or checkpoint."""
    src = Path(source)
    if (src / STATE_NAME).is_file():
        ckpt = read_checkpoint(src, collective=False)
        if step is not None and int(ckpt["state"]["step"]) != step:
            raise ValueError(f"{src} is the checkpoint of step {ckpt['state']['step']}, not of step {step}")
        return ckpt
    root = src if list_checkpoints(src) else src / "checkpoints"
    found = {_step_of(p): p for p in list_checkpoints(root)}
    if not found:
        raise FileNotFoundError(f"{src}: no training checkpoints (looked in {root})")
    if step is None:
        ckpt = load_latest(root, collective=False)
        assert ckpt is not None
        return ckpt
    if step not in found:
        raise ValueError(f"{root}: no checkpoint of step {step}; available steps: {', '.join(map(str, found))}")
    return read_checkpoint(found[step], collective=False)


def model_config_of(ckpt: dict[str, Any]) -> DbrxConfig:
    """The model config stored with a checkpoint (by the trainer), else the one its training config names."""
    extra = ckpt["state"].get("extra") or {}
    if extra.get("model_config"):
        return DbrxConfig.from_hf_dict(extra["model_config"], source=f"{ckpt['path'] / STATE_NAME}")
    m = (extra.get("config") or {}).get("model") or {}
    if m.get("checkpoint"):
        return DbrxConfig.load(resolve_path(m["checkpoint"]) / "config.json")
    if m.get("preset"):
        return DbrxConfig.from_preset(m["preset"], **(m.get("overrides") or {}))
    raise ValueError(f"checkpoint {ckpt['path']} records no model config (extra.config.model in {STATE_NAME})")


def export_hf(source: str | os.PathLike, out: str | os.PathLike, step: int | None = None,
              config: DbrxConfig | None = None, dtype=None,
              max_shard_bytes: int | str = hf_checkpoint.DEFAULT_SHARD_BYTES) -> Path:
    """Write the model of a training checkpoint as a Hugging Face checkpoint in `out`, tensor by tensor (of a LoRA
    run: the adapter of that step, in PEFT's format).

    `source`: a run directory (its `checkpoints/`), a checkpoint directory or one `step_*` checkpoint; `step`: that
    step's checkpoint (default: the newest usable one). Each tensor is read whole from the shards of every rank that
    wrote it (DCP) and written; at most one output shard is held in memory. `out` is replaced whole once complete.
    Runs in this process alone (no collectives). Returns the checkpoint directory exported.
    """
    ckpt = _pick(source, step)
    cfg = config or model_config_of(ckpt)
    sizes = _tensor_sizes(ckpt["metadata"], MODEL)
    run = (ckpt["state"].get("extra") or {}).get("config") or {}
    if lora := run.get("lora"):  # a LoRA run's checkpoint holds the adapters only: that step's adapter (PEFT)
        from dbrx.lora.layers import LoraConfig
        from dbrx.lora.peft_format import factors_from_state_dict, write_peft

        lora_cfg = LoraConfig(**lora)
        reader = _Reader(ckpt["path"], ckpt["metadata"])
        state = {name: load_tensor(ckpt, MODEL + name, reader) for name in sizes}
        write_peft(factors_from_state_dict(state, lora_cfg), cfg, out, lora_cfg,
                   base_model=(run.get("model") or {}).get("checkpoint"))
        return ckpt["path"]
    expected = {k: tuple(v.shape) for k, v in DbrxForCausalLM.from_config(cfg, device="meta").state_dict().items()}
    for name, shape in expected.items():
        if name not in sizes or sizes[name][0] != shape:
            got = f"shape {list(sizes[name][0])}" if name in sizes else "no such tensor"
            raise CheckpointError(f"checkpoint {ckpt['path']} does not hold the model of its config: {name} has "
                                  f"{got}, expected {list(shape)}")
    reader = _Reader(ckpt["path"], ckpt["metadata"])
    dtype = hf_checkpoint.parse_dtype(dtype)
    hf_checkpoint.save_tensors(lambda name: load_tensor(ckpt, MODEL + name, reader), cfg, out,
                               lambda name: dtype or sizes[name][1], max_shard_bytes)
    return ckpt["path"]


__all__ = ["save_checkpoint", "read_checkpoint", "load_latest", "resolve_resume", "apply_checkpoint",
           "check_compatible", "list_checkpoints", "restore_rng", "load_tensor", "export_hf", "model_config_of",
           "everywhere", "CheckpointError", "rng_state", "set_rng_state"]
