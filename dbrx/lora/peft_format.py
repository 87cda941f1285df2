"""Adapters in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`) for transformers' DbrxForCausalLM,
and merged checkpoints.

What PEFT does with DBRX (read from peft 0.21 and transformers 5.x, checked by tests/test_lora.py against peft):
- attention and router are ordinary `target_modules` (`Wqkv`, `out_proj`, `router.layer`): per layer
  `base_model.model.<module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r), update scaling * B @ A.
- transformers keeps each expert weight fused as one 2-D parameter `ffn.experts.mlp.{w1,v1,w2}` of shape (E*F, D)
  (expert e is rows e*F:(e+1)*F, used as x @ w1_e^T, x @ v1_e^T and h @ w2_e). PEFT's `target_parameters` wraps
  such a parameter as a plain (out=E*F, in=D) matrix: lora_A (R, D), lora_B (E*F, R), and during the forward the
  parameter reads W + scaling * lora_B @ lora_A. The wrappers of one module nest: with all three targeted the keys
  are `mlp.base_layer.base_layer.lora_*` (w1), `mlp.base_layer.lora_*` (v1), `mlp.lora_*` (w2); in general the
  targeted ones in the order w1, v1, w2, innermost first.
- So our per-expert rank-r factors are one rank R = E*r adapter with block-diagonal lora_B:
    w1, v1: lora_A rows e*r:(e+1)*r = A_e (r, D);      lora_B block (e, e) = B_e (F, r)
    w2:     lora_A rows e*r:(e+1)*r = B_e^T (r, D);    lora_B block (e, e) = A_e^T (F, r)
  (for w2 the roles swap: our A is its F side, PEFT's lora_B side). PEFT's scaling alpha / R is made equal to ours
  through `rank_pattern` / `alpha_pattern` entries for the expert parameters. The expert part of the file is
  therefore E times the size of our stacked factors (lora_B is zero off its diagonal blocks).
- Read back, a block-diagonal lora_B gives per-expert rank R/E again; any other (an adapter trained by PEFT itself,
  where every expert shares lora_A) is exactly per-expert rank R with A_e = lora_A for every e.
- peft 0.21 loads such adapters onto transformers' DbrxForCausalLM, and `merge_and_unload()` applies them; its
  unmerged forward fails for expert targets on transformers 5.x (DbrxExperts reads `self.mlp.w1` from outside the
  wrapped module, where PEFT's parametrization is not active and the wrapper has no `w1`): PEFT's side, not the
  format's. Attention and router adapters run unmerged in peft too.

`Factors` are our form of one adapted base weight, keyed by the base tensor's name in our state dict
(`...attn.Wqkv.weight`, `...ffn.experts.mlp.w1`): linear A (r, in), B (out, r); experts A (E, r, in),
B (E, out, r). Files are written and read tensor by tensor. Imports: config, fsutil, hf_checkpoint, lora.layers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..config import DbrxConfig
from ..fsutil import atomic_dir
from ..hf_checkpoint import parse_dtype, read_checkpoint, save_tensors
from .layers import (
    EXPERT_TARGETS,
    LINEAR_PATHS,
    LoraConfig,
    LoraExperts,
    LoraLinear,
    adapted_modules,
    freeze_base,
    has_lora,
    lora_scaling,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
MAX_CONFIG_BYTES = 1 << 20
PEFT_MODULES = {"Wqkv": "Wqkv", "out_proj": "out_proj", "router": "router.layer"}  # our target -> target_modules
EXPERT_PARAM = "ffn.experts.mlp.{}"  # target_parameters entry of an expert weight

_LINEAR_RE = re.compile(r"transformer\.blocks\.(\d+)\.(norm_attn_norm\.attn\.(?:Wqkv|out_proj)|ffn\.router\.layer)")
_EXPERT_RE = re.compile(r"transformer\.blocks\.(\d+)\.ffn\.experts\.mlp((?:\.base_layer)*)")
_KEY_RE = re.compile(r"(.+)\.lora_([AB])\.weight")


@dataclass
class Factors:
    A: torch.Tensor  # linear (r, in); experts (E, r, in)
    B: torch.Tensor  # linear (out, r); experts (E, out, r)
    scaling: float

    @property
    def rank(self) -> int:
        return self.A.shape[-2]


def weight_delta(name: str, f: Factors) -> torch.Tensor:
    """The update of base tensor `name` in its stored layout, fp32: linear (out, in); experts (E, F, D)."""
    A, B = f.A.float(), f.B.float()
    if A.dim() == 2:
        return (B @ A) * f.scaling
    d = torch.bmm(B, A) * f.scaling  # (E, out, in)
    return d.transpose(1, 2) if name.endswith(".w2") else d


def _linear_weight_name(block: int, target: str) -> str:
    return f"transformer.blocks.{block}.{LINEAR_PATHS[target]}.weight"


def _expert_weight_name(block: int, w: str) -> str:
    return f"transformer.blocks.{block}.ffn.experts.mlp.{w}"


# ---- our model <-> factors ---------------------------------------------------------------------------------
def _full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor (an FSDP-sharded DTensor is gathered: call on every rank), detached, on the CPU."""
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu()


def adapter_factors(model: nn.Module) -> dict[str, Factors]:
    """Every adapter of `model` as Factors keyed by the base tensor's name. Under FSDP call on every rank."""
    out: dict[str, Factors] = {}
    paths = {path: t for t, path in LINEAR_PATHS.items()}
    for name, module in adapted_modules(model):
        m = re.fullmatch(r"transformer\.blocks\.(\d+)\.(.+)", name)
        if not m:
            raise ValueError(f"LoRA module {name} is not in a transformer block")
        block, path = int(m.group(1)), m.group(2)
        if isinstance(module, LoraLinear):
            out[_linear_weight_name(block, paths[path])] = Factors(_full(module.lora_A), _full(module.lora_B),
                                                                   module.scaling)
        else:
            for w in module.lora_A:
                out[_expert_weight_name(block, w)] = Factors(_full(module.lora_A[w]), _full(module.lora_B[w]),
                                                             module.scaling[w])
    return out


def factors_from_state_dict(state: dict[str, torch.Tensor], lora: LoraConfig) -> dict[str, Factors]:
    """Factors from adapter tensors by parameter name (`lora_state_dict`, a training checkpoint), all of rank and
    scaling as `lora` gives."""
    paths = {p: t for t, p in LINEAR_PATHS.items()}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in state.items():
        if m := re.fullmatch(r"(transformer\.blocks\.\d+)\.ffn\.experts\.lora_([AB])\.(w1|v1|w2)", name):
            pairs.setdefault(f"{m.group(1)}.ffn.experts.mlp.{m.group(3)}", {})[m.group(2)] = t
        elif (m := re.fullmatch(r"(transformer\.blocks\.\d+)\.(.+)\.lora_([AB])", name)) and m.group(2) in paths:
            pairs.setdefault(f"{m.group(1)}.{m.group(2)}.weight", {})[m.group(3)] = t
        else:
            raise ValueError(f"{name} is not a LoRA adapter tensor")
    return {name: Factors(ab["A"], ab["B"], lora.scaling) for name, ab in pairs.items()}


@torch.no_grad()
def attach_factors(model: nn.Module, factors: dict[str, Factors], dropout: float = 0.0) -> nn.Module:
    """Wrap the base weights named in `factors` with adapters holding those values (ranks and scalings as given);
    the base is frozen. `factors` must fit the model (read_peft checks it against the model's config)."""
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters")
    blocks = model.transformer.blocks
    experts: dict[int, dict[str, Factors]] = {}
    for name, f in factors.items():
        m = re.fullmatch(r"transformer\.blocks\.(\d+)\.(.+)", name)
        block, rest = int(m.group(1)), m.group(2)
        if rest.startswith("ffn.experts.mlp."):
            experts.setdefault(block, {})[rest.rsplit(".", 1)[1]] = f
            continue
        parent, _, leaf = rest.removesuffix(".weight").rpartition(".")
        owner = blocks[block].get_submodule(parent)
        wrapped = LoraLinear(getattr(owner, leaf), f.rank, f.scaling, dropout)
        wrapped.lora_A.copy_(f.A)
        wrapped.lora_B.copy_(f.B)
        setattr(owner, leaf, wrapped)
    for block, fs in experts.items():
        ffn = blocks[block].ffn
        wrapped = LoraExperts(ffn.experts, {w: f.rank for w, f in fs.items()}, {w: f.scaling for w, f in fs.items()},
                              dropout)
        for w, f in fs.items():
            wrapped.lora_A[w].copy_(f.A)
            wrapped.lora_B[w].copy_(f.B)
        ffn.experts = wrapped
    freeze_base(model)
    return model


# ---- factors <-> PEFT tensors ------------------------------------------------------------------------------
def experts_to_peft(w: str, f: Factors, side: str) -> torch.Tensor:
    """Our stacked per-expert factors of expert weight `w` -> PEFT's lora_A (E*r, D) (side 'A') or its
    block-diagonal lora_B (E*F, E*r) (side 'B')."""
    A, B = f.A, f.B  # (E, r, in), (E, out, r)
    E, r = A.shape[0], A.shape[1]
    d_side, f_side = (B.transpose(1, 2), A.transpose(1, 2)) if w == "w2" else (A, B)  # (E, r, D), (E, F, r)
    # (for w2, PEFT's D side is our B and its F side our A)
    return d_side.reshape(E * r, -1) if side == "A" else torch.block_diag(*f_side)


def experts_from_peft(w: str, lora_A: torch.Tensor, lora_B: torch.Tensor, E: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (lora_A (R, D), lora_B (E*F, R)) of expert weight `w` -> our (A (E, r, in), B (E, out, r)): r = R / E
    when lora_B is block-diagonal (as we write it), else r = R with the shared lora_A repeated for every expert."""
    R, D = lora_A.shape
    F_ = lora_B.shape[0] // E
    blocks = lora_B.reshape(E, F_, R)  # (E, F, R) each expert's rows
    diagonal = False
    if R % E == 0:
        used = lora_B.reshape(E, F_, E, R // E).ne(0).any(3).any(1)  # (E, E): expert e's rows touch column block e'
        diagonal = not bool((used & ~torch.eye(E, dtype=torch.bool, device=used.device)).any())
    if diagonal:  # expert e's rows use only columns e*r:(e+1)*r
        r = R // E
        idx = torch.arange(E)
        side_f = lora_B.reshape(E, F_, E, r)[idx, :, idx]  # (E, F, r): the diagonal blocks
        side_d = lora_A.reshape(E, r, D)  # (E, r, D)
    else:
        side_f = blocks  # (E, F, R)
        side_d = lora_A.expand(E, R, D)  # (E, R, D)
    if w == "w2":  # our A is the F side (E, r, F), our B the D side (E, D, r)
        return side_f.transpose(1, 2).contiguous(), side_d.transpose(1, 2).contiguous()
    return side_d.contiguous(), side_f.contiguous()


def _pattern_key(patterns: dict, key: str) -> str | None:
    """PEFT's rule for rank_pattern / alpha_pattern: the first pattern p with `(.*\\.)?(p)$` matching the key."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", key):
            return p
    return None


def _peft_alpha(scaling: float, rank: int, rslora: bool) -> float:
    """The lora_alpha for which PEFT's scaling (alpha / r, or alpha / sqrt(r)) is `scaling`."""
    alpha = scaling * (math.sqrt(rank) if rslora else rank)
    return int(alpha) if float(alpha).is_integer() else alpha


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


def _save_streaming(entries, path: Path) -> None:
    """A safetensors file written tensor by tensor: (name, shape, dtype, thunk) entries, each thunk called when its
    bytes are written, so that at most one tensor (a block-diagonal lora_B: E*F x E*r) exists at a time."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype, _ in entries:
        n = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape, dtype, thunk in entries:
            t = thunk().detach().to(device="cpu", dtype=dtype).contiguous()
            assert tuple(t.shape) == tuple(shape), (name, t.shape, shape)
            fh.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def write_peft(factors: dict[str, Factors], cfg: DbrxConfig, path: str | os.PathLike, lora: LoraConfig | None = None,
               base_model: str | None = None) -> Path:
    """Write `factors` (of a model with config `cfg`) as a PEFT adapter directory, atomically; returns the path."""
    if not factors:
        raise ValueError("the model has no LoRA adapters to save")
    E = cfg.ffn_config.moe_num_experts
    rslora = bool(lora.rslora) if lora else False
    tensors: list[tuple[str, tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]] = []  # written lazily
    kinds: dict[str, dict[str, tuple[int, float]]] = {}  # kind -> {pattern key of one layer: (peft r, alpha)}
    expert_kinds: dict[int, list[str]] = {}
    for name in factors:
        if m := re.fullmatch(r"transformer\.blocks\.(\d+)\.ffn\.experts\.mlp\.(w1|v1|w2)", name):
            expert_kinds.setdefault(int(m.group(1)), []).append(m.group(2))
    for name, f in factors.items():
        if m := re.fullmatch(r"transformer\.blocks\.(\d+)\.ffn\.experts\.mlp\.(w1|v1|w2)", name):
            block, w = int(m.group(1)), m.group(2)
            targeted = [t for t in EXPERT_TARGETS if t in expert_kinds[block]]
            depth = len(targeted) - 1 - targeted.index(w)  # the nesting of PEFT's ParamWrappers
            module = f"transformer.blocks.{block}.ffn.experts.mlp" + ".base_layer" * depth
            shapes = {"A": (E * f.rank, cfg.d_model), "B": (E * cfg.ffn_config.ffn_hidden_size, E * f.rank)}
            get = {side: (lambda w=w, f=f, side=side: experts_to_peft(w, f, side)) for side in "AB"}
            kind, key, rank = w, name, E * f.rank
        else:
            module = name.removesuffix(".weight")
            shapes = {"A": tuple(f.A.shape), "B": tuple(f.B.shape)}
            get = {"A": lambda f=f: f.A, "B": lambda f=f: f.B}
            kind = next(t for t, p in LINEAR_PATHS.items() if module.endswith(p))
            key, rank = module, f.rank
        for side in "AB":
            tensors.append((f"{PREFIX}{module}.lora_{side}.weight", shapes[side], f.A.dtype, get[side]))
        kinds.setdefault(kind, {})[key] = (rank, _peft_alpha(f.scaling, rank, rslora))

    linear = [k for k in kinds if k not in EXPERT_TARGETS]
    if lora is not None:  # the config as asked for; patterns below cover whatever differs from it
        r, alpha = lora.rank, int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    else:
        r, alpha = next(iter(kinds[(linear or list(kinds))[0]].values()))
    rank_pattern, alpha_pattern = {}, {}
    for kind, entries in kinds.items():
        values = set(entries.values())
        if values == {(r, alpha)}:
            continue
        pattern = EXPERT_PARAM.format(kind) if kind in EXPERT_TARGETS else PEFT_MODULES[kind]
        per_layer = entries if len(values) > 1 else {pattern: next(iter(values))}
        for key, (kr, ka) in per_layer.items():
            rank_pattern[key], alpha_pattern[key] = kr, ka
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": alpha, "use_rslora": rslora,
        # PEFT refuses dropout on target_parameters; it only matters in training
        "lora_dropout": 0.0 if any(k in EXPERT_TARGETS for k in kinds) or not lora else float(lora.dropout),
        "target_modules": sorted(PEFT_MODULES[k] for k in linear) or None,
        "target_parameters": [EXPERT_PARAM.format(k) for k in EXPERT_TARGETS if k in kinds] or None,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "use_dora": False, "lora_bias": False, "layers_to_transform": None,
        "layers_pattern": None,
    }
    out = Path(path)
    with atomic_dir(out) as tmp:
        _save_streaming(tensors, tmp / WEIGHTS_NAME)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out


# ---- reading a PEFT adapter ---------------------------------------------------------------------------------
_UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "LoRA biases", "fan_in_fan_out": "fan_in_fan_out",
                "modules_to_save": "modules_to_save", "layer_replication": "layer_replication",
                "trainable_token_indices": "trainable tokens", "use_qalora": "QALoRA", "use_bdlora": "BD-LoRA"}


def read_config(path: str | os.PathLike) -> dict:
    """adapter_config.json of a PEFT LoRA adapter, checked for what dbrx supports."""
    f = Path(path) / CONFIG_NAME
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: adapter directory not found")
    try:
        with open(f, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise FileNotFoundError(f"{f}: missing (not a PEFT adapter directory)") from None
    try:
        if len(raw) > MAX_CONFIG_BYTES:
            raise ValueError("too large")
        config = json.loads(raw)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{f}: not a valid adapter config ({e})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{f}: a {config.get('peft_type')} adapter; dbrx reads LoRA adapters only")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise ValueError(f"{f}: {key} is set; dbrx does not support {what}")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{f}: bias is {config['bias']!r}; dbrx supports LoRA adapters without biases only")
    for key in ("r", "lora_alpha"):
        v = config.get(key, 8)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{f}: {key} must be a positive number, got {v!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise ValueError(f"{f}: {key} must be a mapping")
    return config


@contextlib.contextmanager
def _weights(path: Path) -> Iterator[Any]:
    """The adapter's safetensors file, opened (tensors are read one at a time, when asked for)."""
    f = path / WEIGHTS_NAME
    if not f.is_file():
        pickles = [p.name for p in path.glob("*.bin")]
        hint = f"; found only {', '.join(pickles)} (pickle files are never read)" if pickles else ""
        raise FileNotFoundError(f"{f}: missing{hint}")
    try:
        with safe_open(str(f), framework="pt") as st:
            yield st
    except SafetensorError as e:
        raise ValueError(f"{f}: not a valid safetensors file (truncated or corrupt?): {e}") from None


def read_peft(path: str | os.PathLike, cfg: DbrxConfig) -> dict[str, Factors]:
    """A PEFT LoRA adapter for transformers' DbrxForCausalLM as our Factors, checked against the base config `cfg`
    (layers, targets, shapes and dtypes from the file's header, before any tensor is read): any mismatch is a
    one-line ValueError naming the tensor. One PEFT tensor is held at a time besides the (compact) result."""
    path = Path(path)
    config = read_config(path)
    where = path / WEIGHTS_NAME
    rslora = bool(config.get("use_rslora", False))
    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    targets = config.get("target_parameters") or []
    E, F_, D = cfg.ffn_config.moe_num_experts, cfg.ffn_config.ffn_hidden_size, cfg.d_model

    def scaling_of(key: str, rank: int, module: str) -> float:
        r = rank_pattern.get(_pattern_key(rank_pattern, key), r_default)
        if r != rank:
            raise ValueError(f"{where}: {module} has rank {rank} but {CONFIG_NAME} gives r {r} for it")
        alpha = alpha_pattern.get(_pattern_key(alpha_pattern, key), alpha_default)
        return lora_scaling(alpha, rank, rslora)

    def layer(i: str, module: str) -> int:
        block = int(i)
        if block >= cfg.n_layers:
            raise ValueError(f"{where}: {module} is in layer {block}, but the base model has {cfg.n_layers} layers "
                             f"(an adapter for another model?)")
        return block

    with _weights(path) as st:
        pairs: dict[str, dict[str, str]] = {}  # module -> {"A": key, "B": key}
        for key in st.keys():
            m = _KEY_RE.fullmatch(key.removeprefix(PREFIX))
            if not m:
                raise ValueError(f"{where}: tensor {key!r} is not a LoRA factor dbrx can use (only lora_A / lora_B)")
            pairs.setdefault(m.group(1), {})[m.group(2)] = key
        if not pairs:
            raise ValueError(f"{where}: holds no LoRA tensors")

        def rank_of(module: str, ab: dict[str, str]) -> int:
            shape = st.get_slice(ab["A"]).get_shape() if "A" in ab else []
            return shape[0] if len(shape) == 2 else -1

        def check(module: str, ab: dict[str, str], shape_A, shape_B) -> None:
            for side, want in (("A", shape_A), ("B", shape_B)):
                if side not in ab:
                    raise ValueError(f"{where}: {module} has no lora_{side}")
                dtype, shape = st.get_slice(ab[side]).get_dtype(), st.get_slice(ab[side]).get_shape()
                if dtype not in _ST_DTYPES.values():
                    raise ValueError(f"{where}: {module}.lora_{side} is {dtype}, expected floating point")
                if tuple(shape) != tuple(want):
                    raise ValueError(f"{where}: {module}.lora_{side}.weight has shape {list(shape)}, expected "
                                     f"{list(want)} for this base model (an adapter for another model?)")

        plan = []  # checked first, read after
        for module, ab in sorted(pairs.items()):
            rank = rank_of(module, ab)
            if m := _LINEAR_RE.fullmatch(module):
                block = layer(m.group(1), module)
                target = next(t for t, p in LINEAR_PATHS.items() if p == m.group(2))
                in_f, out_f = {"Wqkv": (D, cfg.qkv_dim), "out_proj": (D, D), "router": (D, E)}[target]
                check(module, ab, (rank, in_f), (out_f, rank))
                plan.append((_linear_weight_name(block, target), None, ab, scaling_of(module, rank, module)))
            elif m := _EXPERT_RE.fullmatch(module):
                block = layer(m.group(1), module)
                prefix = f"transformer.blocks.{block}.ffn.experts.mlp."
                targeted = [w for w in EXPERT_TARGETS
                            if any(f"{prefix}{w}" == t or f"{prefix}{w}".endswith("." + t) for t in targets)]
                depth = m.group(2).count(".base_layer")
                if depth >= len(targeted):
                    raise ValueError(f"{where}: {module} does not match the expert parameters that {CONFIG_NAME} "
                                     f"targets ({targets})")
                w = targeted[len(targeted) - 1 - depth]
                check(module, ab, (rank, D), (E * F_, rank))
                plan.append((_expert_weight_name(block, w), w, ab, scaling_of(prefix + w, rank, module)))
            else:
                raise ValueError(f"{where}: {module} is not a module dbrx adapts (attention Wqkv / out_proj, the "
                                 f"router, the experts' w1 / v1 / w2)")
        out: dict[str, Factors] = {}
        for name, w, ab, scaling in plan:
            A, B = st.get_tensor(ab["A"]), st.get_tensor(ab["B"])
            if w is not None:
                A, B = experts_from_peft(w, A, B, E)
            out[name] = Factors(A, B, scaling)
    return out


# ---- the public entry points --------------------------------------------------------------------------------
def save_adapter(model: nn.Module, path: str | os.PathLike, lora: LoraConfig | None = None,
                 base_model: str | None = None, write: bool = True) -> Path | None:
    """Write the model's adapters as a PEFT adapter for transformers' DbrxForCausalLM (atomically). Under FSDP call
    on every rank (the adapters are gathered) with `write` true on one."""
    factors = adapter_factors(model)
    return write_peft(factors, model.config, path, lora, base_model) if write else None


def load_adapter(model: nn.Module, path: str | os.PathLike, dropout: float = 0.0) -> nn.Module:
    """Apply a PEFT LoRA adapter (ours, or made by PEFT for transformers' DbrxForCausalLM) to a plain model."""
    return attach_factors(model, read_peft(path, model.config), dropout)


@torch.no_grad()
def merge_checkpoint(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike, dtype=None,
                     max_shard_bytes: int | str = 4 * 2**30) -> Path:
    """Write checkpoint `base` with adapter `adapter` merged in (W + scaling * B @ A, added in fp32) to `out`, tensor
    by tensor (the model is never built), atomically. dtype: that of the output (default the base's)."""
    base, out = Path(base), Path(out)
    if out.resolve() == base.resolve():
        raise ValueError(f"{out}: the merged checkpoint must not replace its base")
    cfg = DbrxConfig.load(base / "config.json")
    factors = read_peft(adapter, cfg)
    with read_checkpoint(base) as (cfg, tensors):
        stream = iter(tensors)
        first = next(stream)
        out_dtype = parse_dtype(dtype) or first[1].dtype
        pending = [first]

        def get(name: str) -> torch.Tensor:  # save_tensors asks in the order read_checkpoint yields
            got, t = pending.pop() if pending else next(stream)
            assert got == name, (got, name)
            if name in factors:
                t = (t.float() + weight_delta(name, factors[name])).to(out_dtype)
            return t

        save_tensors(get, cfg, out, lambda name: out_dtype, max_shard_bytes)
    return out


__all__ = ["save_adapter", "load_adapter", "merge_checkpoint", "read_peft", "write_peft", "adapter_factors",
           "factors_from_state_dict",
           "attach_factors", "experts_to_peft", "experts_from_peft", "weight_delta", "Factors", "CONFIG_NAME",
           "WEIGHTS_NAME"]
