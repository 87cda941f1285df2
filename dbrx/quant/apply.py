"""Which weights are quantized and how: the table of quantized tensors, quantizing one weight into the checkpoint
layout, installing the quantized modules into a model, and `quantize_model` (in place)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..config import DbrxConfig
from ..hf_checkpoint import _expected_shapes
from .formats import SCALE_DTYPE, check_bits_group, n_groups, quantize_int4, quantize_int8
from .layers import QuantEmbedding, QuantExperts, QuantLinear

FORMAT_VERSION = 1
QUANT_METHOD = "dbrx-weight-only"
TARGETS = ("attn", "experts", "lm_head", "embedding")  # the router always stays in full precision
DEFAULT_TARGETS = ("attn", "experts")


@dataclass(frozen=True)
class QuantSpec:
    """What a quantized model or checkpoint is: bits, the int4 group size (None for int8), the quantized parts."""

    bits: int
    group_size: int | None
    targets: tuple[str, ...]

    @classmethod
    def make(cls, cfg: DbrxConfig, bits: int, group_size: int | None = None,
             targets: Iterable[str] = DEFAULT_TARGETS) -> QuantSpec:
        """Validated against the model config (ValueError naming the problem)."""
        if isinstance(targets, str):
            targets = (targets,)
        targets = tuple(targets)
        unknown = [t for t in targets if t not in TARGETS]
        if unknown or not targets:
            raise ValueError(f"quantization targets must be some of {', '.join(TARGETS)}, got {list(targets)}")
        if bits == 8 and group_size is not None:
            raise ValueError("int8 is quantized per output row: a group size applies to int4 only")
        group_size = check_bits_group(bits, group_size, cfg.d_model)
        return cls(bits, group_size, tuple(t for t in TARGETS if t in targets))

    def to_json(self) -> dict:
        """The `quantization_config` of config.json."""
        return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "bits": self.bits,
                "group_size": self.group_size, "modules": list(self.targets),
                "scale_dtype": str(SCALE_DTYPE).removeprefix("torch.")}

    @classmethod
    def from_json(cls, cfg: DbrxConfig, d, source: str) -> QuantSpec:
        if not isinstance(d, dict):
            raise ValueError(f"{source}: quantization_config must be a JSON object")
        if d.get("quant_method") != QUANT_METHOD:
            raise ValueError(f"{source}: quantization_config.quant_method is {d.get('quant_method')!r}; only "
                             f"{QUANT_METHOD!r} checkpoints (written by `dbrx quantize`) can be loaded")
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{source}: quantization format_version {d.get('format_version')!r} is not supported "
                             f"(this dbrx reads version {FORMAT_VERSION})")
        if d.get("scale_dtype", "bfloat16") != str(SCALE_DTYPE).removeprefix("torch."):
            raise ValueError(f"{source}: quantization_config.scale_dtype must be bfloat16")
        modules = d.get("modules")
        if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
            raise ValueError(f"{source}: quantization_config.modules must be a list of names ({', '.join(TARGETS)})")
        bits, group = d.get("bits"), d.get("group_size")
        if isinstance(bits, bool) or isinstance(group, bool):
            raise ValueError(f"{source}: quantization_config bits and group_size must be integers")
        try:
            spec = cls.make(cfg, bits, group, modules)
        except ValueError as e:
            raise ValueError(f"{source}: quantization_config: {e}") from None
        if spec.group_size != group:
            raise ValueError(f"{source}: quantization_config: int4 needs an explicit group_size")
        return spec


# ---- the table ----------------------------------------------------------------------------------------------
# kinds: "linear" (out, in) as stored in the model; "stack" (E, F, D) gate/up experts; "stack_t" the down experts,
# (E, F, D) in the model, quantized and stored transposed as (E, D, F) so that every quantized matrix is (out, in);
# "embedding" (V, D), rows quantized along D.
def quantized_weights(cfg: DbrxConfig, spec: QuantSpec) -> dict[str, str]:
    """Our state-dict names of the weights `spec` quantizes -> their kind, in state-dict order."""
    out = {}
    for name in _expected_shapes(cfg):
        if name == "transformer.wte.weight" and "embedding" in spec.targets:
            out[name] = "embedding"
        elif name == "lm_head.weight" and "lm_head" in spec.targets:
            out[name] = "linear"
        elif name.endswith(("attn.Wqkv.weight", "attn.out_proj.weight")) and "attn" in spec.targets:
            out[name] = "linear"
        elif name.endswith(("experts.mlp.w1", "experts.mlp.v1")) and "experts" in spec.targets:
            out[name] = "stack"
        elif name.endswith("experts.mlp.w2") and "experts" in spec.targets:
            out[name] = "stack_t"
    return out


def quantized_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    """The (..., out, in) shape a weight is quantized in."""
    return (*shape[:-2], shape[-1], shape[-2]) if kind == "stack_t" else tuple(shape)


def file_tensors(shape: tuple[int, ...], kind: str, spec: QuantSpec) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key suffix ('', '_scale', '_zero') -> (shape, dtype) of a quantized weight's tensors in a checkpoint."""
    *lead, out, k = quantized_shape(shape, kind)
    if spec.bits == 8:
        return {"": ((*lead, out, k), torch.int8), "_scale": ((*lead, out), SCALE_DTYPE)}
    g = (*lead, out, n_groups(k, spec.group_size))
    return {"": ((*lead, out, -(-k // 2)), torch.uint8), "_scale": (g, SCALE_DTYPE), "_zero": (g, SCALE_DTYPE)}


@torch.no_grad()
def quantize_weight(w: torch.Tensor, kind: str, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """A float weight of `kind` -> its checkpoint tensors {'': q, '_scale': scale[, '_zero': zero]}."""
    if w.dim() == 3:  # one expert at a time keeps the fp32 temporaries small
        parts = [quantize_weight(w[e].T if kind == "stack_t" else w[e], "linear", spec) for e in range(w.shape[0])]
        return {k: torch.stack([p[k] for p in parts]) for k in parts[0]}
    if spec.bits == 8:
        q, scale = quantize_int8(w)
        return {"": q, "_scale": scale}
    q, scale, zero = quantize_int4(w, spec.group_size)
    return {"": q, "_scale": scale, "_zero": zero}


# ---- installing modules -------------------------------------------------------------------------------------
def _triple(t: dict[str, torch.Tensor]):
    return t[""], t["_scale"], t.get("_zero")


def install(model: nn.Module, name: str, kind: str, tensors: dict[str, torch.Tensor], spec: QuantSpec,
            dtype: torch.dtype, pending: dict) -> None:
    """Replace the float module owning weight `name` by its quantized module, built from checkpoint tensors.

    The three expert stacks of a layer arrive one at a time: they wait in `pending` until the last (w2)."""
    if kind in ("stack", "stack_t"):
        prefix, _, w = name.rpartition(".mlp.")  # 'transformer.blocks.{i}.ffn.experts', 'w1'
        pending[w] = _triple(tensors)
        if len(pending) < 3:
            return
        mod = QuantExperts.from_quantized(spec.bits, spec.group_size, pending["w1"], pending["v1"], pending["w2"])
        pending.clear()
        parent, _, attr = prefix.rpartition(".")
    else:
        mod_name = name.removesuffix(".weight")
        parent, _, attr = mod_name.rpartition(".")
        in_features = model.get_submodule(mod_name).weight.shape[1]
        if kind == "embedding":
            mod = QuantEmbedding(spec.bits, spec.group_size, *_triple(tensors), in_features, dtype)
        else:
            mod = QuantLinear.from_quantized(spec.bits, spec.group_size, in_features, *_triple(tensors), dtype=dtype)
    setattr(model.get_submodule(parent), attr, mod)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantLinear, QuantEmbedding, QuantExperts)) for m in model.modules())


@torch.no_grad()
def quantize_model(model: nn.Module, bits: int = 8, group_size: int | None = None,
                   targets: Iterable[str] = DEFAULT_TARGETS) -> nn.Module:
    """Quantize a float `DbrxForCausalLM` in place (weight-only; CPU) and return it.

    bits 8: symmetric per output row. bits 4: asymmetric groups of `group_size` along the input dim (32, 64, 128
    or 256; default 128, or the largest of those below it that divides d_model). targets: some of 'attn' (Wqkv,
    out_proj), 'experts' (all of them, one stacked module), 'lm_head', 'embedding'; the router stays float.
    The result equals loading the checkpoint `save_quantized` writes from the same float model.
    """
    cfg = model.config
    spec = QuantSpec.make(cfg, bits, group_size, targets)
    if is_quantized(model):
        raise ValueError("the model is already quantized")
    state = model.state_dict()
    dtype = model.transformer.norm_f.weight.dtype
    pending: dict = {}
    for name, kind in quantized_weights(cfg, spec).items():
        install(model, name, kind, quantize_weight(state.pop(name), kind, spec), spec, dtype, pending)
    model.quantization = spec
    return model


__all__ = ["QuantSpec", "TARGETS", "DEFAULT_TARGETS", "FORMAT_VERSION", "QUANT_METHOD", "quantized_weights",
           "quantized_shape", "file_tensors", "quantize_weight", "install", "is_quantized", "quantize_model"]
