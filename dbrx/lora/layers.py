"""LoRA applied to a built DbrxForCausalLM from outside: the config, the adapter modules, merging.

    model = DbrxForCausalLM.from_pretrained(base)
    apply_lora(model, LoraConfig(rank=16, alpha=32, targets=["Wqkv", "w1", "v1", "w2"]))   # base frozen
    ...train...
    lora_state_dict(model)   # the adapter tensors only
    merge_lora(model)        # W += s * B @ A everywhere, the plain model again

Targets by name: `Wqkv`, `out_proj` (attention), `router` (the router's linear), and the experts' `w1`, `v1`,
`w2`. A linear target is wrapped by `LoraLinear`, which calls the module it wraps (any module mapping (..., in) to
(..., out): a float nn.Linear, or a quantized one) and adds s * B @ A @ dropout(x). Expert targets replace the
block's `ffn.experts` by `LoraExperts`, whose per-expert factors stay stacked ((E, r, in), (E, out, r)) and run
through the grouped expert kernels (dbrx.kernels.lora_experts). B starts at zero, A as PEFT initialises it
(kaiming-uniform with a = sqrt(5), i.e. uniform(+-1/sqrt(in))), so a fresh adapter leaves the model unchanged.
Scaling is alpha / rank, or alpha / sqrt(rank) with rsLoRA. Parameter names: `...attn.Wqkv.base.weight`,
`...attn.Wqkv.lora_A`, `...ffn.experts.lora_A.w1` ...
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.experts import sort_by_expert
from ..kernels.lora_experts import lora_expert_glu

TARGETS = ("Wqkv", "out_proj", "router", "w1", "v1", "w2")
EXPERT_TARGETS = ("w1", "v1", "w2")
# linear target -> its module path inside a block
LINEAR_PATHS = {"Wqkv": "norm_attn_norm.attn.Wqkv", "out_proj": "norm_attn_norm.attn.out_proj",
                "router": "ffn.router.layer"}


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0  # scaling = alpha / rank (alpha / sqrt(rank) with rslora)
    rslora: bool = False
    dropout: float = 0.0  # on each adapter's input, training only
    targets: list[str] = field(default_factory=lambda: ["Wqkv", "out_proj", "w1", "v1", "w2"])

    def validate(self) -> None:
        """ValueError naming the first bad field (as `lora.<field>`)."""
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
                math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"lora.alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.rslora, bool):
            raise ValueError(f"lora.rslora must be true or false, got {self.rslora!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be a number in [0, 1), got {self.dropout!r}")
        if not isinstance(self.targets, (list, tuple)) or not self.targets:
            raise ValueError(f"lora.targets must be a non-empty list of {', '.join(TARGETS)}; got {self.targets!r}")
        for t in self.targets:
            if t not in TARGETS:
                raise ValueError(f"lora.targets: unknown target {t!r} (known: {', '.join(TARGETS)})")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"lora.targets lists a target twice: {self.targets}")

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.rank, self.rslora)


def lora_scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _init_A(A: torch.Tensor) -> None:
    """PEFT's default: kaiming_uniform(a=sqrt(5)) on each (r, in) factor, which is uniform(+-1/sqrt(in))."""
    bound = 1.0 / math.sqrt(A.shape[-1])
    with torch.no_grad():
        A.uniform_(-bound, bound)


def _float_dtype(module: nn.Module) -> torch.dtype:
    """The dtype adapters of `module` get: its first floating-point parameter's; for a quantized module (buffers
    only: codes and bf16 scales) its activation dtype `dtype` if it has one, else fp32."""
    for t in module.parameters():
        if t.is_floating_point():
            return t.dtype
    dt = getattr(module, "dtype", None)
    return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else torch.float32


def _device(module: nn.Module) -> torch.device:
    for t in [*module.parameters(), *module.buffers()]:
        return t.device
    return torch.device("cpu")


def _linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a linear-like module: its in/out_features, else its weight's (out, in) shape."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    w = getattr(module, "weight", None)
    if w is None or w.dim() != 2:
        raise ValueError(f"cannot apply LoRA to {type(module).__name__}: no in/out features")
    return int(w.shape[1]), int(w.shape[0])


class LoraLinear(nn.Module):
    """base(x) + scaling * dropout(x) @ A^T @ B^T, A (r, in), B (out, r); `base` is called as it is."""

    def __init__(self, base: nn.Module, rank: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        in_f, out_f = _linear_dims(base)
        kw = dict(dtype=_float_dtype(base), device=_device(base))
        self.base = base
        self.in_features, self.out_features = in_f, out_f
        self.lora_A = nn.Parameter(torch.empty(rank, in_f, **kw))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank, **kw))  # (out, r)
        self.scaling, self.dropout = float(scaling), float(dropout)
        _init_A(self.lora_A)
        self.train(base.training)

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        a = _dropped(x, self.dropout, self.training).to(self.lora_A.dtype)
        return y + (F.linear(F.linear(a, self.lora_A), self.lora_B) * self.scaling).to(y.dtype)

    def delta(self) -> torch.Tensor:
        """The update of the base weight, (out, in) in fp32: scaling * B @ A."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling


def _dropped(x, p, training):
    return F.dropout(x, p, training) if p and training else x


def is_quantized_experts(experts: nn.Module) -> bool:
    """Whether an experts module is dbrx.quant's QuantExperts (fused quantized gate/up `w13` and down `w2`)."""
    return hasattr(experts, "w13") and not hasattr(experts, "mlp")


def expert_dims(experts: nn.Module) -> tuple[int, int, int]:
    """(E, F, D) of an experts module (its stacked `mlp.w1`, or a QuantExperts' sizes)."""
    if is_quantized_experts(experts):
        return int(experts.n_experts), int(experts.ffn), int(experts.d_model)
    E, F_, D = experts.mlp.w1.shape
    return int(E), int(F_), int(D)


def expert_io(name: str, F_: int, D: int) -> tuple[int, int]:
    """(in, out) of one expert weight seen as a linear map: w1, v1 D -> F; w2 F -> D."""
    return (F_, D) if name == "w2" else (D, F_)


class LoraExperts(nn.Module):
    """The block's experts with per-expert adapters on some of w1, v1, w2, kept stacked: A (E, r, in), B (E, out, r).

    Replaces `MoE.experts` (same call); the base experts module stays inside as `base` (its weights are used as they
    are, never copied or merged) and the adapted GLU runs through dbrx.kernels.lora_experts.

    QLoRA: `base` may be a QuantExperts (int8 / int4). The three frozen products then run through its quantized
    kernels, expert by expert over the routed rows (torch has no grouped quantized kernel), with each adapter's
    product added to its base product inside the GLU; their backward w.r.t. the input dequantizes one expert's
    matrix at a time (dbrx.quant.grad), so the stack is never dequantized.
    """

    def __init__(self, base: nn.Module, ranks: dict[str, int], scalings: dict[str, float], dropout: float = 0.0):
        super().__init__()
        E, F_, D = expert_dims(base)
        kw = dict(dtype=_float_dtype(base), device=_device(base))
        self.base = base
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name in EXPERT_TARGETS:  # a fixed order, whatever the order asked for
            if name not in ranks:
                continue
            in_f, out_f = expert_io(name, F_, D)
            self.lora_A[name] = nn.Parameter(torch.empty(E, ranks[name], in_f, **kw))  # (E, r, in)
            self.lora_B[name] = nn.Parameter(torch.zeros(E, out_f, ranks[name], **kw))  # (E, out, r)
            _init_A(self.lora_A[name])
        self.scaling = {name: float(scalings[name]) for name in self.lora_A}
        self.dropout = float(dropout)
        self.train(base.training)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, backend: str = "auto",
                recompute: bool = False) -> torch.Tensor:
        """As `Experts.forward`: x (N, D), router weights (N, K), expert ids (N, K) -> (N, D)."""
        if is_quantized_experts(self.base):
            return self._quantized(x, weights, idx)
        mlp = self.base.mlp
        w1, v1, w2 = mlp.w1, mlp.v1, mlp.w2
        factors = {n: (self.lora_A[n], self.lora_B[n]) for n in self.lora_A}
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        # autocast does not reach the grouped GEMMs: cast as it would (a no-op without autocast)
        x, w1, v1, w2 = x.to(dt), w1.to(dt), v1.to(dt), w2.to(dt)
        adapters = {n: (a.to(dt), b.to(dt), self.scaling[n]) for n, (a, b) in factors.items()}
        return lora_expert_glu(x, weights.to(dt), idx, w1, v1, w2, adapters, backend=backend, recompute=recompute,
                               dropout=self.dropout, training=self.training)

    def _quantized(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The adapted GLU on a QuantExperts base: routed rows sorted by expert, per expert with rows
        gate/up = Q13_e(x) + s * (drop(x) A_e^T) B_e^T, hp = p * silu(gate) * up, out = Q2_e(hp) + s * (drop(hp) A_e^T)
        B_e^T; the quantized products in bf16 (as QuantExperts runs them), everything else in the activations' dtype
        (autocast's under autocast)."""
        from ..quant.grad import quant_matmul

        base, F_ = self.base, self.base.ffn
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        N, K = idx.shape
        order, inverse, ends = sort_by_expert(idx, base.n_experts)
        counts = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()  # host sync (the quantized path is CPU only)
        xs = x.to(dt)[order // K]  # (R, D) routed rows in expert order
        p = weights.reshape(-1)[order].to(dt)  # (R,) their router weights

        def adapter(a, name, e):
            A, B = self.lora_A[name], self.lora_B[name]
            t = _dropped(a, self.dropout, self.training)
            return F.linear(F.linear(t, A[e].to(dt)), B[e].to(dt)) * self.scaling[name]

        outs, start = [], 0
        for e, c in enumerate(counts):
            if not c:
                continue
            x_e, p_e = xs[start:start + c], p[start:start + c]
            start += c
            gu = quant_matmul(x_e, base.w13, e)  # (c, 2F)
            gate, up = gu[:, :F_], gu[:, F_:]
            if "w1" in self.lora_A:
                gate = gate + adapter(x_e, "w1", e)
            if "v1" in self.lora_A:
                up = up + adapter(x_e, "v1", e)
            hp = F.silu(gate) * up * p_e[:, None]  # (c, F)
            out = quant_matmul(hp, base.w2, e)  # (c, D)
            if "w2" in self.lora_A:
                out = out + adapter(hp, "w2", e)
            outs.append(out)
        rows = torch.cat(outs)  # (R, D)
        return rows[inverse].view(N, K, -1).sum(1).to(x.dtype)  # (N, D)

    def delta(self, name: str) -> torch.Tensor:
        """The update of base weight `name` as stored, (E, F, D) in fp32."""
        A, B = self.lora_A[name].float(), self.lora_B[name].float()
        d = torch.bmm(B, A) * self.scaling[name]  # (E, out, in)
        return d.transpose(1, 2) if name == "w2" else d  # w2 is stored (E, F, D): (in, out)


# ---- applying, inspecting, merging -------------------------------------------------------------------------
def _blocks(model: nn.Module):
    blocks = getattr(getattr(model, "transformer", None), "blocks", None)
    if blocks is None:
        raise ValueError("LoRA needs a DbrxForCausalLM-like model with `transformer.blocks`")
    return blocks


def adapted_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every LoraLinear and LoraExperts in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, (LoraLinear, LoraExperts)):
            yield name, module


def has_lora(model: nn.Module) -> bool:
    return next(adapted_modules(model), None) is not None


def _check_rank(what: str, rank: int, dims: tuple[int, ...]) -> None:
    if rank > min(dims):
        raise ValueError(f"lora.rank {rank} is larger than a dimension of {what} ({' x '.join(map(str, dims))}); "
                         f"use at most {min(dims)}")


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap the targets of every block with fresh adapters and freeze everything else; returns the model.

    Call on a built model before activation checkpointing, compile and FSDP. A's initialisation draws from torch's
    global generator (seed it for reproducible adapters; every rank must draw the same).
    """
    cfg.validate()
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters (merge_lora or a fresh model first)")
    blocks = _blocks(model)
    s = cfg.scaling
    experts = [t for t in EXPERT_TARGETS if t in cfg.targets]
    for name in cfg.targets:  # check every rank before changing anything
        if name in LINEAR_PATHS:
            in_f, out_f = _linear_dims(blocks[0].get_submodule(LINEAR_PATHS[name]))
            _check_rank(name, cfg.rank, (out_f, in_f))
        else:
            E, F_, D = expert_dims(blocks[0].ffn.experts)
            _check_rank(f"expert weight {name}", cfg.rank, (F_, D))
    for block in blocks:
        for name, path in LINEAR_PATHS.items():
            if name in cfg.targets:
                parent, _, leaf = path.rpartition(".")
                owner = block.get_submodule(parent)
                setattr(owner, leaf, LoraLinear(getattr(owner, leaf), cfg.rank, s, cfg.dropout))
        if experts:
            block.ffn.experts = LoraExperts(block.ffn.experts, {n: cfg.rank for n in experts},
                                            {n: s for n in experts}, cfg.dropout)
    freeze_base(model)
    return model


def freeze_base(model: nn.Module) -> None:
    """Only adapter tensors train: every other parameter gets requires_grad False (no gradient, no optimizer state)."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_name(name))


def is_adapter_name(name: str) -> bool:
    """Whether a parameter name (of `named_parameters`) is an adapter tensor."""
    parts = name.split(".")
    return "lora_A" in parts or "lora_B" in parts


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors by parameter name (`...attn.Wqkv.lora_A`, `...ffn.experts.lora_B.w2` ...), detached."""
    return {n: p.detach() for n, p in model.named_parameters() if is_adapter_name(n)}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Add every adapter's update into its base weight and unwrap it: the plain model again (in place; returned).

    The update is computed in fp32 and added to the weight in its own dtype. A quantized base cannot take it.
    """
    for name, module in list(adapted_modules(model)):
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = module.base
        if isinstance(module, LoraLinear):
            w = getattr(base, "weight", None)
            if not isinstance(w, nn.Parameter) or not w.is_floating_point():  # a quantized layer's is a copy
                raise ValueError(f"cannot merge LoRA into {name}: its base is not a float linear layer (quantized? "
                                 f"merge into the float checkpoint with `dbrx merge-lora`)")
            w.copy_((w.float() + module.delta()).to(w.dtype))
        else:
            if is_quantized_experts(base):
                raise ValueError(f"cannot merge LoRA into {name}: its base is quantized (merge into the float "
                                 f"checkpoint with `dbrx merge-lora`)")
            for p_name in module.lora_A:
                w = getattr(base.mlp, p_name)
                if not w.is_floating_point():
                    raise ValueError(f"cannot merge LoRA into {name}.{p_name}: its base is quantized")
                w.copy_((w.float() + module.delta(p_name)).to(w.dtype))
        setattr(parent, leaf, base)
    return model


__all__ = ["LoraConfig", "LoraLinear", "LoraExperts", "apply_lora", "merge_lora", "lora_state_dict", "freeze_base",
           "adapted_modules", "has_lora",
           "is_quantized_experts", "is_adapter_name", "lora_scaling", "expert_dims", "expert_io", "TARGETS",
           "EXPERT_TARGETS", "LINEAR_PATHS"]
