"""Quantized checkpoints: written from a float model or streamed from a float checkpoint, and loaded for inference.

A quantized checkpoint is a Hugging Face-style directory (config.json + safetensors, sharded with an index when
large) whose config.json carries a `quantization_config` (see README, "Quantized checkpoints"); float tensors keep
their names, each quantized weight NAME becomes NAME (int8, or uint8 with two int4 codes per byte), NAME_scale and,
for int4, NAME_zero (dbrx.quant.formats). Everything is checked from the file headers (names, shapes, dtypes)
before a tensor is read; a mismatch is a one-line ValueError naming the file and the tensor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from ..config import DbrxConfig
from ..devices import parse_dtype
from ..hf_checkpoint import (
    CONFIG_NAME,
    DEFAULT_SHARD_BYTES,
    _all_finite,
    _expected_shapes,
    _Reader,
    _replacing,
    _write,
    parse_size,
    quantization_config,
    read_checkpoint,
)
from ..model import DbrxForCausalLM
from .apply import DEFAULT_TARGETS, QuantSpec, file_tensors, install, is_quantized, quantize_weight, quantized_weights
from .layers import check_device

_ST_NAMES = {torch.int8: "I8", torch.uint8: "U8", torch.bfloat16: "BF16", torch.float16: "F16",
             torch.float32: "F32", torch.float64: "F64"}
_FLOAT_NAMES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def expected_tensors(cfg: DbrxConfig, spec: QuantSpec) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """Every checkpoint key -> (shape, dtype); dtype None for the float tensors (any float type)."""
    quantized = quantized_weights(cfg, spec)
    out: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {}
    for name, shape in _expected_shapes(cfg).items():
        if name in quantized:
            out.update({name + sfx: v for sfx, v in file_tensors(shape, quantized[name], spec).items()})
        else:
            out[name] = (shape, None)
    return out


def checkpoint_bytes(cfg: DbrxConfig, spec: QuantSpec, float_bytes: int = 2) -> int:
    """The bytes of a quantized checkpoint's tensors (float tensors at `float_bytes` each), from the config alone."""
    return sum(torch.Size(shape).numel() * (float_bytes if dt is None else dt.itemsize)
               for shape, dt in expected_tensors(cfg, spec).values())


# ---- writing ------------------------------------------------------------------------------------------------
def _write_quantized(get: Callable[[str], torch.Tensor], cfg: DbrxConfig, spec: QuantSpec, path, float_dtype,
                     max_shard_bytes, progress: Callable[[str], None] | None) -> list[str]:
    """Write the checkpoint of the float tensors `get(name)` (our names, experts (E, F, D)), quantizing the weights
    of `spec` one at a time as their shard is written; atomically (dbrx.fsutil.atomic_dir)."""
    quantized = quantized_weights(cfg, spec)
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def part(name: str, sfx: str) -> torch.Tensor:
        if name not in cache:  # the plan asks for a weight's tensors one after another: keep only the last one
            cache.clear()
            cache[name] = quantize_weight(get(name), quantized[name], spec)
            if progress and quantized[name] == "stack_t":
                progress(f"quantized {name.removesuffix('.ffn.experts.mlp.w2')}")
        return cache[name][sfx]

    plan = []
    for name, shape in _expected_shapes(cfg).items():
        if name in quantized:
            for sfx, (shp, dt) in file_tensors(shape, quantized[name], spec).items():
                plan.append((name + sfx, shp, dt, lambda n=name, s=sfx: part(n, s)))
        else:
            plan.append((name, shape, float_dtype, lambda n=name: get(n)))
    with _replacing(path) as tmp:
        names = _write(plan, tmp, parse_size(max_shard_bytes), progress)
        d = cfg.to_hf_dict()
        d["torch_dtype"] = d["dtype"] = str(float_dtype).removeprefix("torch.")
        d["quantization_config"] = spec.to_json()
        (tmp / CONFIG_NAME).write_text(json.dumps(d, indent=2) + "\n")
    return names


def save_quantized(model: nn.Module, path: str | os.PathLike, bits: int = 8, group_size: int | None = None,
                   targets: Iterable[str] = DEFAULT_TARGETS, max_shard_bytes: int | str = DEFAULT_SHARD_BYTES,
                   progress: Callable[[str], None] | None = None) -> list[str]:
    """Quantize a float model's weights into a quantized checkpoint at `path` (the model is left as it is).

    `load_quantized(path)` then equals `quantize_model(model, bits, group_size, targets)` exactly."""
    if is_quantized(model):
        raise ValueError("save_quantized takes the float model (it quantizes while writing); this one is quantized")
    spec = QuantSpec.make(model.config, bits, group_size, targets)
    state = model.state_dict()
    metas = [k for k, v in state.items() if v.is_meta]
    if metas:
        raise ValueError(f"cannot save a model with tensors on the meta device (e.g. {metas[0]})")
    dtype = model.transformer.norm_f.weight.dtype
    return _write_quantized(lambda n: state[n].detach().cpu(), model.config, spec, path, dtype, max_shard_bytes,
                            progress)


def quantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, bits: int = 8, group_size: int | None = None,
                        targets: Iterable[str] = DEFAULT_TARGETS, max_shard_bytes: int | str = DEFAULT_SHARD_BYTES,
                        progress: Callable[[str], None] | None = None) -> list[str]:
    """Quantize the float checkpoint `src` into `dst`, tensor by tensor (no model is built: one float tensor and
    its quantized form are held at a time). Returns the weight file names written."""
    src_r, dst_r = Path(src).resolve(), Path(dst).resolve()
    if src_r == dst_r or src_r in dst_r.parents or dst_r in src_r.parents:
        raise ValueError(f"{dst}: destination must differ from the source (and neither may contain the other)")
    with read_checkpoint(src) as (cfg, tensors):
        spec = QuantSpec.make(cfg, bits, group_size, targets)
        it: Iterator[tuple[str, torch.Tensor]] = iter(tensors)
        first = next(it)  # the embedding: its dtype is the checkpoint's
        current = dict([first])

        def get(name: str) -> torch.Tensor:  # the plan asks in the reader's order: hold only the latest tensor
            while name not in current:
                current.clear()
                n, t = next(it)
                current[n] = t
            return current[name]

        return _write_quantized(get, cfg, spec, dst, first[1].dtype, max_shard_bytes, progress)


# ---- loading ------------------------------------------------------------------------------------------------
def _check(reader: _Reader, expected: dict) -> None:
    have, needed = set(reader.key_file), set(expected)
    where = reader.dir
    for label, keys in (("missing", sorted(needed - have)), ("unexpected", sorted(have - needed))):
        if keys:
            more = f" (and {len(keys) - 3} more)" if len(keys) > 3 else ""
            raise ValueError(f"{where}: {label} tensors {', '.join(keys[:3])}{more} for this config.json's model and "
                             f"quantization_config")
    for key, (shape, dtype) in expected.items():
        got_shape, got_dtype = reader.shape(key), reader.dtype_name(key)
        if got_shape != tuple(shape):
            raise ValueError(f"{reader.where(key)}: tensor {key!r} has shape {list(got_shape)}, expected "
                             f"{list(shape)} (config.json and the tensors disagree)")
        if (dtype is None and got_dtype not in _FLOAT_NAMES) or (dtype is not None and got_dtype != _ST_NAMES[dtype]):
            want = "a float type" if dtype is None else _ST_NAMES[dtype]
            raise ValueError(f"{reader.where(key)}: tensor {key!r} has dtype {got_dtype}, expected {want}")


def _read_float(reader: _Reader, key: str, dtype, allow_nonfinite: bool) -> torch.Tensor:
    t = reader.get(key)
    t = t if dtype is None else t.to(dtype)
    if not allow_nonfinite and not _all_finite(t):
        raise ValueError(f"{reader.where(key)}: tensor {key!r} holds NaN or infinite values; refused "
                         f"(--allow-nonfinite loads it anyway)")
    return t


def load_quantized(path: str | os.PathLike, dtype=None, device=None, allow_nonfinite: bool = False) -> nn.Module:
    """A quantized checkpoint directory -> DbrxForCausalLM with quantized modules, in eval mode, on `device` (the
    CPU by default; CUDA runs the quantized layers through Triton, dbrx.kernels.triton_quant_gemm).

    dtype: of the float tensors and activations (default: the checkpoint's); quantized layers compute in bf16."""
    device = torch.device(device or "cpu")
    check_device(device)  # the CPU, or CUDA with Triton (dbrx.quant.layers)
    dtype = parse_dtype(dtype)
    with _Reader(path) as reader:
        cfg = reader.config
        spec = QuantSpec.from_json(cfg, quantization_config(reader.dir), str(reader.dir / CONFIG_NAME))
        expected = expected_tensors(cfg, spec)
        _check(reader, expected)
        dtype = dtype or _FLOAT_NAMES[reader.dtype_name("transformer.norm_f.weight")]
        quantized = quantized_weights(cfg, spec)
        model = DbrxForCausalLM.from_config(cfg, device="meta")
        pending: dict = {}
        for name, shape in _expected_shapes(cfg).items():
            if name not in quantized:
                mod_name, _, leaf = name.rpartition(".")
                module = model.get_submodule(mod_name)
                t = _read_float(reader, name, dtype, allow_nonfinite)
                module._parameters[leaf] = nn.Parameter(t.view(shape).to(device), requires_grad=False)
                continue
            tensors = {sfx: reader.get(name + sfx) if dt != torch.bfloat16 else
                       _read_float(reader, name + sfx, None, allow_nonfinite)
                       for sfx, (_, dt) in file_tensors(shape, quantized[name], spec).items()}
            tensors = {sfx: t.to(device) for sfx, t in tensors.items()}
            install(model, name, quantized[name], tensors, spec, dtype, pending)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, f"tensors left on the meta device after loading: {left[:5]}"
    model.quantization = spec
    return model.eval()


__all__ = ["save_quantized", "quantize_checkpoint", "load_quantized", "expected_tensors", "checkpoint_bytes"]
