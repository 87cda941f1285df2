"""Hugging Face-format DBRX checkpoints: load, save and convert, safetensors only.

A checkpoint directory holds `config.json` and either `model.safetensors` or shards
`model-0000i-of-0000N.safetensors` listed in `model.safetensors.index.json`. Two expert layouts are read:

- ``stacked`` (the official one): `transformer.blocks.{i}.ffn.experts.mlp.{w1,v1,w2}`, each [E*F, D];
- ``split`` (a community re-upload): `transformer.blocks.{i}.ffn.experts.mlp_experts.{e}.{w1,v1,w2}.weight`,
  w1 and v1 [F, D] (as `nn.Linear(D, F)`), w2 as `nn.Linear(F, D)`, i.e. stored [D, F]. A w2 stored [F, D] is
  also accepted. When F == D the two cannot be told apart by shape and w2 is taken as stored [D, F].

The layout is detected from the key names. Every other tensor maps 1:1 to our state_dict names; our experts are
(E, F, D) tensors. Reading yields tensors one at a time from the memory-mapped files (`DbrxForCausalLM.
from_pretrained` assigns them to a model built on the meta device), so the weights are never held twice. Pickle
files (`*.bin`) are never read; shard names in an index must be plain file names inside the directory; tensors
must be floating point and finite (unless `allow_nonfinite`). Writing goes to a fresh temporary directory that
replaces the target whole (dbrx.fsutil.atomic_dir), so a reader sees the old checkpoint or the new one, never a
mix. Also the one adapter to `transformers`' config and state dict.

Imports: config, devices, fsutil (never the model: the shapes below are the layout's own table).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import DbrxConfig
from .devices import parse_dtype
from .fsutil import atomic_dir

CONFIG_NAME = "config.json"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
DEFAULT_SHARD_BYTES = 4 * 2**30
MAX_INDEX_BYTES = 64 * 2**20
LAYOUTS = ("stacked", "split")
EXPERT_RE = re.compile(r"(transformer\.blocks\.\d+\.ffn\.experts)\.mlp\.(w1|v1|w2)")
SPLIT_MARK = ".ffn.experts.mlp_experts."

_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}




def parse_size(text: str | int) -> int:
    """'4GB' (10^9), '4GiB' (2^30), '500MB', '1024' (bytes) -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"invalid size {text!r}; use e.g. 4GB, 500MiB or a number of bytes")
    unit = m.group(2).upper().rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    n = int(float(m.group(1)) * scale)
    if n < 1:
        raise ValueError(f"size must be positive, got {text!r}")
    return n


# ---- reading ------------------------------------------------------------------------------------------------
class _Reader:
    """Lazily opened safetensors files of one checkpoint directory; errors name the file and the tensor."""

    def __init__(self, path: str | os.PathLike):
        self.dir = Path(path)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"{self.dir}: checkpoint directory not found")
        self.config = DbrxConfig.load(self.dir / CONFIG_NAME)
        self.key_file = _weight_map(self.dir)  # tensor name -> file name
        if not self.key_file:
            raise ValueError(f"{self.dir}: the checkpoint holds no tensors")
        self._files = contextlib.ExitStack()
        self._handles: dict[str, object] = {}

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc) -> None:
        self._handles.clear()
        self._files.close()

    def _open(self, fname: str):
        if fname not in self._handles:
            p = self.dir / fname
            try:
                self._handles[fname] = self._files.enter_context(safe_open(str(p), framework="pt"))
            except SafetensorError as e:
                raise ValueError(f"{p}: not a valid safetensors file (truncated or corrupt?): {e}") from None
            have = set(self._handles[fname].keys())
            missing = [k for k, f in self.key_file.items() if f == fname and k not in have]
            if missing:
                raise ValueError(f"{p}: the index lists tensor {missing[0]!r} in this file, but it is not there")
        return self._handles[fname]

    def where(self, key: str) -> Path:
        return self.dir / self.key_file[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._open(self.key_file[key]).get_slice(key).get_shape())

    def dtype_name(self, key: str) -> str:
        """The safetensors dtype name ('BF16', 'I8', 'U8' ...) from the header."""
        return self._open(self.key_file[key]).get_slice(key).get_dtype()

    def dtype(self, key: str) -> torch.dtype:
        name = self._open(self.key_file[key]).get_slice(key).get_dtype()
        if name not in _ST_DTYPES:
            raise ValueError(f"{self.where(key)}: tensor {key!r} has dtype {name}, expected a float type")
        return _ST_DTYPES[name]

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._open(self.key_file[key]).get_tensor(key)
        except SafetensorError as e:
            raise ValueError(f"{self.where(key)}: cannot read tensor {key!r}: {e}") from None


def plain_file_name(name: object) -> bool:
    """True for a file name that stays inside its directory: no separators, not '.' or '..', no NUL."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name)


def _weight_map(d: Path) -> dict[str, str]:
    """Tensor name -> file name, from the index json or the single `model.safetensors`."""
    index = d / INDEX_NAME
    if index.is_file():
        try:
            with open(index, "rb") as fh:
                raw = fh.read(MAX_INDEX_BYTES + 1)
            if len(raw) > MAX_INDEX_BYTES:
                raise ValueError(f"{index}: larger than {MAX_INDEX_BYTES >> 20} MiB; not a checkpoint index")
            weight_map = json.loads(raw)["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            weight_map = None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: not a valid index (expected JSON with a 'weight_map' object)")
        for key, fname in weight_map.items():
            if not plain_file_name(fname):
                raise ValueError(f"{index}: weight_map entry {key!r} names {fname!r}, which is not a plain file "
                                 f"name inside the checkpoint directory")
            if not (d / fname).is_file():
                raise FileNotFoundError(f"{d / fname}: shard listed in {index.name} (for tensor {key!r}) is missing")
        return weight_map
    single = d / SINGLE_NAME
    if single.is_file():
        try:
            with safe_open(str(single), framework="pt") as f:
                return {k: SINGLE_NAME for k in f.keys()}
        except SafetensorError as e:
            raise ValueError(f"{single}: not a valid safetensors file (truncated or corrupt?): {e}") from None
    pickles = sorted(p.name for p in d.glob("*.bin")) + sorted(p.name for p in d.glob("*.pt"))
    if pickles:
        raise ValueError(
            f"{d}: found only {', '.join(pickles)}; only safetensors checkpoints are supported (pickle files are "
            f"never loaded). Convert them to {SINGLE_NAME} first."
        )
    raise FileNotFoundError(f"{d}: no {SINGLE_NAME} or {INDEX_NAME}")


def detect_layout(keys) -> str:
    """'split' when the per-expert `mlp_experts.{e}` names are used, else 'stacked'."""
    keys = list(keys)
    split = any(SPLIT_MARK in k for k in keys)
    stacked = any(EXPERT_RE.fullmatch(k) for k in keys)
    if split and stacked:
        raise ValueError("checkpoint mixes stacked (experts.mlp.w1) and split (experts.mlp_experts.{e}) expert tensors")
    return "split" if split else "stacked"


def _expected_shapes(cfg: DbrxConfig) -> dict[str, tuple[int, ...]]:
    """Our state_dict names -> shapes (experts (E, F, D)), in the model's order (a test checks the model agrees)."""
    D, V, E, F = cfg.d_model, cfg.vocab_size, cfg.ffn_config.moe_num_experts, cfg.ffn_config.ffn_hidden_size
    out: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (V, D)}
    for i in range(cfg.n_layers):
        b = f"transformer.blocks.{i}"
        out.update({
            f"{b}.norm_attn_norm.norm_1.weight": (D,),
            f"{b}.norm_attn_norm.attn.Wqkv.weight": (cfg.qkv_dim, D),
            f"{b}.norm_attn_norm.attn.out_proj.weight": (D, D),
            f"{b}.norm_attn_norm.norm_2.weight": (D,),
            f"{b}.ffn.router.layer.weight": (E, D),
            **{f"{b}.ffn.experts.mlp.{w}": (E, F, D) for w in ("w1", "v1", "w2")},
        })
    out.update({"transformer.norm_f.weight": (D,), "lm_head.weight": (V, D)})
    return out


def _split_keys(prefix: str, w: str, n_experts: int) -> list[str]:
    return [f"{prefix}.mlp_experts.{e}.{w}.weight" for e in range(n_experts)]


def _source_keys(cfg: DbrxConfig, layout: str) -> dict[str, list[str]]:
    """Our name -> the checkpoint keys it is read from, in the given layout."""
    out = {}
    for name in _expected_shapes(cfg):
        m = EXPERT_RE.fullmatch(name)
        if m and layout == "split":
            out[name] = _split_keys(m.group(1), m.group(2), cfg.ffn_config.moe_num_experts)
        else:
            out[name] = [name]
    return out


def _check_keys(reader: _Reader, sources: dict[str, list[str]]) -> None:
    needed = {k for keys in sources.values() for k in keys}
    have = set(reader.key_file)
    missing, unexpected = sorted(needed - have), sorted(have - needed)
    where = reader.dir / (INDEX_NAME if (reader.dir / INDEX_NAME).is_file() else SINGLE_NAME)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"{where}: missing tensors {', '.join(missing[:5])}{more}")
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise ValueError(f"{where}: unexpected tensors {', '.join(unexpected[:5])}{more}")


def _shape_error(reader: _Reader, key: str, expected, got) -> ValueError:
    return ValueError(f"{reader.where(key)}: tensor {key!r} has shape {list(got)}, expected {list(expected)}")


def _check_shapes(reader: _Reader, sources: dict[str, list[str]], shapes: dict[str, tuple[int, ...]]) -> None:
    """Check every tensor's shape and dtype (floating point) from the file headers before any data is read."""
    for name, keys in sources.items():
        shape = shapes[name]
        for key in keys:
            reader.dtype(key)  # ValueError naming the tensor when it is not a float type
        if EXPERT_RE.fullmatch(name):
            E, F, D = shape
            for key in keys:
                got = reader.shape(key)
                if SPLIT_MARK not in key and got != (E * F, D):
                    raise _shape_error(reader, key, (E * F, D), got)
                if SPLIT_MARK in key and got != (F, D) and not (key.endswith("w2.weight") and got == (D, F)):
                    raise _shape_error(reader, key, (D, F) if key.endswith("w2.weight") else (F, D), got)
        elif reader.shape(keys[0]) != shape:
            raise _shape_error(reader, keys[0], shape, reader.shape(keys[0]))


def _all_finite(t: torch.Tensor) -> bool:
    """Exact, and fast in the usual case: a finite fp32 sum proves every element finite (a NaN or inf makes the
    sum non-finite); only a non-finite sum (a bad value, or a sum that overflowed) pays the elementwise test."""
    return bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


def _read(reader: _Reader, name: str, keys: list[str], shape, dtype=None, device=None,
          allow_nonfinite: bool = False) -> torch.Tensor:
    """Our tensor `name` (experts (E, F, D)) read from the checkpoint keys, converted to dtype/device, and checked
    finite there (after the conversion, which can overflow; on a GPU the check is free)."""
    if SPLIT_MARK not in keys[0]:  # a non-expert tensor, or stacked experts [E*F, D] -> (E, F, D)
        out = reader.get(keys[0]).view(shape).to(device=device, dtype=dtype)
    else:
        E, F, D = shape
        out = torch.empty(shape, dtype=dtype or reader.dtype(keys[0]), device=device)
        for e, key in enumerate(keys):
            t = reader.get(key)
            if key.endswith("w2.weight") and t.shape == (D, F):  # nn.Linear(F, D) weight; F == D lands here too
                t = t.T  # (F, D)
            out[e].copy_(t)
    if not allow_nonfinite and not _all_finite(out):
        raise ValueError(f"{reader.where(keys[0])}: tensor {keys[0]!r} holds NaN or infinite values (as "
                         f"{str(out.dtype).removeprefix('torch.')}); refused (--allow-nonfinite loads it anyway)")
    return out


def quantization_config(path: str | os.PathLike):
    """The `quantization_config` entry of a checkpoint directory's config.json (None when absent or unreadable:
    the regular loading path then reports what is wrong with the file). Quantized checkpoints are read by
    dbrx.quant, which this module never imports."""
    try:
        with open(Path(path) / CONFIG_NAME, "rb") as fh:
            d = json.loads(fh.read(MAX_INDEX_BYTES))
    except (OSError, ValueError, RecursionError):
        return None
    return d.get("quantization_config") if isinstance(d, dict) else None


def _validated(reader: _Reader) -> tuple[dict[str, tuple[int, ...]], dict[str, list[str]]]:
    """(our shapes, our name -> checkpoint keys) after checking names, shapes and dtypes from the headers."""
    if quantization_config(reader.dir) is not None:
        raise ValueError(f"{reader.dir}: a quantized checkpoint (quantization_config in {CONFIG_NAME}); load it with "
                         f"dbrx.quant.load_quantized (the dbrx verbs do), or quantize the float checkpoint again")
    shapes = _expected_shapes(reader.config)
    sources = _source_keys(reader.config, detect_layout(reader.key_file))
    _check_keys(reader, sources)
    _check_shapes(reader, sources, shapes)
    return shapes, sources


@contextlib.contextmanager
def read_checkpoint(path: str | os.PathLike, dtype=None, device=None,
                    allow_nonfinite: bool = False) -> Iterator[tuple[DbrxConfig, Iterator[tuple[str, torch.Tensor]]]]:
    """`with read_checkpoint(dir) as (config, tensors)`: the DbrxConfig and an iterator of (our name, tensor).

    Everything that can be checked from the headers (names, layout, shapes, dtypes) is checked before the first
    tensor is read; each tensor is checked finite as it is read. dtype: torch dtype or 'bf16' / 'fp16' / 'fp32'
    (default: the checkpoint's, that of `transformer.wte.weight`); device: default CPU.
    """
    dtype = parse_dtype(dtype)
    with _Reader(path) as reader:
        shapes, sources = _validated(reader)
        if dtype is None:
            dtype = reader.dtype(sources["transformer.wte.weight"][0])
        tensors = ((name, _read(reader, name, keys, shapes[name], dtype, device or "cpu", allow_nonfinite))
                   for name, keys in sources.items())
        yield reader.config, tensors


# ---- writing ------------------------------------------------------------------------------------------------
# A write plan: (checkpoint key, shape, dtype, thunk producing the tensor). Thunks run one shard at a time.
_Plan = list[tuple[str, tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]]


def _plan(shapes: dict[str, tuple[int, ...]], get: Callable[[str], torch.Tensor],
          dtype_of: Callable[[str], torch.dtype], layout: str) -> _Plan:
    """Output keys in `layout` for our tensors `shapes`; `get(name)` returns our tensor (experts (E, F, D))."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    plan: _Plan = []
    for name, shape in shapes.items():
        dt = dtype_of(name)
        m = EXPERT_RE.fullmatch(name)
        if not m:
            plan.append((name, shape, dt, lambda n=name: get(n)))
        elif layout == "stacked":
            E, F, D = shape
            plan.append((name, (E * F, D), dt, lambda n=name, s=(E * F, D): get(n).reshape(s)))  # (E, F, D) -> [E*F, D]
        else:
            E, F, D = shape
            w2 = m.group(2) == "w2"
            for e, key in enumerate(_split_keys(m.group(1), m.group(2), E)):
                if w2:  # stored as nn.Linear(F, D).weight: [D, F]
                    plan.append((key, (D, F), dt, lambda n=name, e=e: get(n)[e].T))
                else:
                    plan.append((key, (F, D), dt, lambda n=name, e=e: get(n)[e]))
    return plan


def _write(plan: _Plan, path: Path, max_shard_bytes: int, progress: Callable[[str], None] | None = None) -> list[str]:
    """Write the plan into the (new, empty) directory `path` as one file or shards + index."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dt, _) in enumerate(plan):
        n = torch.Size(shape).numel() * dt.itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    names = [SINGLE_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for fname, idx in zip(names, shards):
        tensors = {}
        for i in idx:
            key, shape, dt, thunk = plan[i]
            t = thunk().to(device="cpu", dtype=dt).contiguous()
            assert tuple(t.shape) == shape, (key, t.shape, shape)
            tensors[key] = t
            weight_map[key] = fname
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        total += nbytes
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        del tensors
        if progress:
            progress(f"wrote {fname} ({len(idx)} tensors, {nbytes / 1e9:.2f} GB)")
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names


def _is_ours(name: str) -> bool:
    return name in (CONFIG_NAME, SINGLE_NAME, INDEX_NAME) or bool(SHARD_RE.fullmatch(name))


@contextlib.contextmanager
def _replacing(target: str | os.PathLike) -> Iterator[Path]:
    """atomic_dir(target) for a checkpoint: an existing non-empty target must be a checkpoint directory, and its
    other files (tokenizer, README, ...) are carried over into the new one."""
    target = Path(target)
    if target.is_dir() and any(target.iterdir()) and not (target / CONFIG_NAME).is_file():
        raise ValueError(f"{target} exists and is not a checkpoint directory (no {CONFIG_NAME}); refusing to "
                         f"replace it")
    with atomic_dir(target) as tmp:
        yield tmp
        if target.is_dir():
            for p in target.iterdir():
                if not _is_ours(p.name):
                    if p.is_dir() and not p.is_symlink():
                        shutil.copytree(p, tmp / p.name, symlinks=True)
                    else:
                        shutil.copy2(p, tmp / p.name, follow_symlinks=False)


def _save_config(cfg: DbrxConfig, path: Path, dtype: torch.dtype) -> None:
    """`cfg.to_hf_dict()` (with `rope_parameters`) plus the dtype actually written: transformers 5.x loads a model
    in the config's `dtype` by default, so a stale "bfloat16" would silently round an fp32 checkpoint."""
    d = cfg.to_hf_dict()
    d["torch_dtype"] = d["dtype"] = str(dtype).removeprefix("torch.")
    (path / CONFIG_NAME).write_text(json.dumps(d, indent=2) + "\n")


def save_state_dict(state: dict[str, torch.Tensor], cfg: DbrxConfig, path: str | os.PathLike,
                    max_shard_bytes: int | str = DEFAULT_SHARD_BYTES, dtype=None) -> None:
    """Write our state dict as a Hugging Face checkpoint (stacked layout, loadable by transformers), atomically.

    One `model.safetensors` when everything fits in `max_shard_bytes`, else numbered shards plus
    `model.safetensors.index.json`. Tensors are converted to `dtype` (default: as they are) one shard at a time.
    An existing checkpoint at `path` is replaced whole once the new one is complete.
    """
    dtype = parse_dtype(dtype)
    metas = [k for k, v in state.items() if v.is_meta]
    if metas:
        raise ValueError(f"cannot save a model with tensors on the meta device (e.g. {metas[0]})")
    shapes = _expected_shapes(cfg)
    got = {k: tuple(v.shape) for k, v in state.items()}
    assert got == shapes, f"state dict does not match the config: {sorted(set(got) ^ set(shapes))[:5]}"
    save_tensors(state.__getitem__, cfg, path, lambda n: dtype or state[n].dtype, max_shard_bytes)


def save_tensors(get: Callable[[str], torch.Tensor], cfg: DbrxConfig, path: str | os.PathLike,
                 dtype_of: Callable[[str], torch.dtype], max_shard_bytes: int | str = DEFAULT_SHARD_BYTES) -> None:
    """Write the tensors `get(name)` (our names and shapes for `cfg`, experts (E, F, D)) as a Hugging Face checkpoint
    in the stacked layout, atomically, asking for each tensor only when its shard is written (a sharded training
    checkpoint is exported without ever holding the whole model). `dtype_of(name)`: the dtype it is written in."""
    plan = _plan(_expected_shapes(cfg), get, dtype_of, "stacked")
    with _replacing(path) as tmp:
        _write(plan, tmp, parse_size(max_shard_bytes))
        _save_config(cfg, tmp, dtype_of("lm_head.weight"))


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, layout: str = "stacked", dtype=None,
                       max_shard_bytes: int | str = DEFAULT_SHARD_BYTES,
                       progress: Callable[[str], None] | None = None) -> list[str]:
    """Rewrite checkpoint `src` into `dst` in the given expert layout, tensor by tensor (no model is built).

    Returns the weight file names written. At most one of our (E, F, D) expert tensors is held at a time. `dst`
    is replaced whole, and only once the new checkpoint is complete.
    """
    dtype = parse_dtype(dtype)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    src_r, dst_r = Path(src).resolve(), Path(dst).resolve()
    if src_r == dst_r or src_r in dst_r.parents or dst_r in src_r.parents:
        raise ValueError(f"{dst}: destination must differ from the source (and neither may contain the other)")
    with _Reader(src) as reader:
        shapes, sources = _validated(reader)
        cache: dict[str, torch.Tensor] = {}

        def get(name: str) -> torch.Tensor:  # the split layout reads one expert tensor E times: keep the last
            if name not in cache:
                cache.clear()
                cache[name] = _read(reader, name, sources[name], shapes[name], allow_nonfinite=True)
            return cache[name]

        plan = _plan(shapes, get, lambda n: dtype or reader.dtype(sources[n][0]), layout)
        with _replacing(dst) as tmp:
            names = _write(plan, tmp, parse_size(max_shard_bytes), progress)
            _save_config(reader.config, tmp, dtype or reader.dtype(sources["lm_head.weight"][0]))
    return names


# ---- transformers --------------------------------------------------------------------------------------------
# transformers 5.x calls `clamp(min=None, max=None)` when clip_qkv is None and crashes; a clip this large never
# binds, so "no clipping" is written as it.
HF_NO_CLIP = 1e9


def transformers_config(cfg: DbrxConfig, dtype: str | None = None):
    """The equivalent `transformers.DbrxConfig`; `rope_parameters` carries theta (transformers 5.x reads only it)."""
    try:
        import transformers
    except ImportError:
        raise ValueError("this needs the `transformers` package (pip install transformers)") from None
    d = cfg.to_hf_dict()
    if d["attn_config"]["clip_qkv"] is None:
        d["attn_config"]["clip_qkv"] = HF_NO_CLIP
    d.pop("torch_dtype", None)
    if dtype is not None:
        d["dtype"] = dtype
    return transformers.DbrxConfig(**d)


def state_dict_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict in transformers' names and shapes: experts (E, F, D) -> [E*F, D]."""
    return {k: v.reshape(-1, v.shape[-1]) if EXPERT_RE.fullmatch(k) else v for k, v in state.items()}


__all__ = ["read_checkpoint", "quantization_config", "save_state_dict", "save_tensors", "convert_checkpoint",
           "detect_layout", "parse_dtype", "parse_size", "plain_file_name", "transformers_config",
           "state_dict_to_transformers", "HF_NO_CLIP", "LAYOUTS", "DEFAULT_SHARD_BYTES"]
