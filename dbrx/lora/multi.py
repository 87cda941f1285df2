"""Several LoRA adapters on one model at once, chosen per token: what the server needs to serve each request with
its own adapter (or none) in one mixed batch, without merging.

    adapters = attach_adapters(model, {"sql": read_peft(dir1, cfg), "chat": read_peft(dir2, cfg)})
    slots = torch.tensor([0, 0, 1, 2, 2])        # (N,) each token's slot: 0 the base model, i the i-th adapter
    with adapters.active(slots):
        logits = model.forward_paged(...)          # or model(ids) with N = B*T tokens

Every adapted module holds the adapters stacked by slot, slot 0 all zeros (the base model), so one forward runs any
mix of them: `MultiLoraLinear` A (S, r, in), B (S, out, r), applied by `segment_lora` (rows sorted by slot, two
grouped GEMMs); `MultiLoraExperts` per (expert, slot) A (E*S, r, in), B (E*S, out, r), group e*S + s, through
the same grouped expert kernels as one adapter (dbrx.kernels.lora_experts). Adapters of different ranks are
padded with zeros to the largest (rounded up to a multiple of 8, for aligned GEMMs), an adapter without some target
has zeros there, and each adapter's scaling is folded into its B, so the padding changes nothing. A module no
adapter targets is left alone. The factors are frozen parameters (inference only) in the base's dtype (on a quantized
base: the activation dtype for linear layers, fp32 for the experts, whose GLU runs in fp32).

The per-token slots reach the modules from outside the model through the `AdapterSet` they share (the engine sets
them around its forward); with no slots set the modules are the base model. Training keeps its own modules
(dbrx.lora.layers): this one is for inference only.

Imports: dbrx.kernels.lora_experts, dbrx.lora.layers, dbrx.lora.peft_format (Factors).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.experts import sort_by_expert
from ..kernels.lora_experts import grouped_rows, lora_expert_glu, rows_backend, segment_lora
from .layers import _device, _float_dtype, _linear_dims, expert_dims, expert_io, has_lora, is_quantized_experts
from .peft_format import Factors

RANK_MULTIPLE = 8  # stacked ranks are padded to a multiple of this: 16-byte aligned GEMMs in bf16 and fp32


class AdapterSet:
    """The adapters a model holds, by slot (0: none, the base model; i: `names[i - 1]`), and the per-token slots of
    the forward being run (None: every token on the base model)."""

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self.slots: torch.Tensor | None = None  # (N,) long, set by `active`

    def slot(self, name: str | None) -> int:
        """The slot of adapter `name` (None: 0, the base model); ValueError for an unknown name."""
        if name is None:
            return 0
        try:
            return self.names.index(name) + 1
        except ValueError:
            raise ValueError(f"unknown adapter {name!r}; known: {', '.join(map(repr, self.names))}") from None

    @contextlib.contextmanager
    def active(self, slots: torch.Tensor | None) -> Iterator[None]:
        """Run the model's forwards inside with these per-token slots (N,) (None: the base model)."""
        previous, self.slots = self.slots, slots
        try:
            yield
        finally:
            self.slots = previous

    def rows(self, n: int) -> torch.Tensor | None:
        """The slots of a layer's forward over n token rows, or None."""
        assert self.slots is None or self.slots.shape == (n,), f"slots for {tuple(self.slots.shape)} rows, not {n}"
        return self.slots


class MultiLoraLinear(nn.Module):
    """base(x) + (x @ A_s^T) @ B_s^T for each token's slot s; A (S, r, in), B (S, out, r) with scaling folded in."""

    def __init__(self, base: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, adapters: AdapterSet) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(lora_A, requires_grad=False)  # (S, r, in)
        self.lora_B = nn.Parameter(lora_B, requires_grad=False)  # (S, out, r)
        self.adapters = adapters  # shared by every module of the model (a plain attribute, not a submodule)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        slots = self.adapters.rows(x2.shape[0])
        if slots is None:
            return y
        d = segment_lora(x2.to(self.lora_A.dtype), self.lora_A, self.lora_B, slots)  # (N, out)
        return y + d.view(y.shape).to(y.dtype)


class MultiLoraExperts(nn.Module):
    """The block's experts with per-(expert, slot) adapters on some of w1, v1, w2: A[w] (E*S, r, in),
    B[w] (E*S, out, r), group e*S + s, scaling folded in. Replaces `MoE.experts` (same call); `base` is the experts
    module, float or quantized, used as it is."""

    def __init__(self, base: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 adapters: AdapterSet) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name, (A, B) in factors.items():
            self.lora_A[name] = nn.Parameter(A, requires_grad=False)  # (E*S, r, in)
            self.lora_B[name] = nn.Parameter(B, requires_grad=False)  # (E*S, out, r)
        self.adapters = adapters

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, backend: str = "auto",
                recompute: bool = False) -> torch.Tensor:
        """As `Experts.forward`: x (N, D), router weights (N, K), expert ids (N, K) -> (N, D)."""
        slots = self.adapters.rows(x.shape[0])
        if slots is None:
            return self.base(x, weights, idx, backend=backend, recompute=recompute)
        if is_quantized_experts(self.base):
            return self._quantized(x, weights, idx, slots)
        mlp = self.base.mlp
        dt = x.dtype
        factors = {n: (self.lora_A[n].to(dt), self.lora_B[n].to(dt), 1.0) for n in self.lora_A}
        return lora_expert_glu(x, weights.to(dt), idx, mlp.w1.to(dt), mlp.v1.to(dt), mlp.w2.to(dt), factors,
                               backend=backend, slots=slots)

    def _quantized(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                   slots: torch.Tensor) -> torch.Tensor:
        """On a QuantExperts base: the routed rows sorted by (expert, slot); the quantized products by expert
        (QuantExperts' kernels: grouped on CUDA, expert by expert on the CPU), the adapters' as grouped GEMMs over
        the (expert, slot) groups, added inside the GLU. As in QuantExperts, the GLU runs in fp32 and the router
        weight multiplies the rows after w2, so that the base model's rows are QuantExperts' own whatever adapters
        run beside them."""
        base, F_ = self.base, self.base.ffn
        E, N, K = base.n_experts, *idx.shape
        S = next(iter(self.lora_A.values())).shape[0] // E
        order, inverse, fine = sort_by_expert(idx * S + slots[:, None], E * S)  # (R,), (R,), (E*S,)
        ends = fine[S - 1 :: S]  # (E,) each expert's rows
        xs = x.float()[order // K]  # (R, D) routed rows, sorted
        p = weights.reshape(-1)[order].float()  # (R,)

        def low_rank(a, name):  # (a @ A_g^T) @ B_g^T over the (expert, slot) groups
            A, B = self.lora_A[name].to(a.dtype), self.lora_B[name].to(a.dtype)
            backend = rows_backend(a, A, B.shape[1])
            backend = "loop" if backend == "dense" else backend
            return grouped_rows(grouped_rows(a, A, fine, backend), B, fine, backend)

        gu = _quant_rows(base.w13, xs, ends)  # (R, 2F)
        gate, up = gu[:, :F_], gu[:, F_:]
        if "w1" in self.lora_A:
            gate = gate + low_rank(xs, "w1")
        if "v1" in self.lora_A:
            up = up + low_rank(xs, "v1")
        h = F.silu(gate) * up  # (R, F)
        out = _quant_rows(base.w2, h, ends)  # (R, D)
        if "w2" in self.lora_A:
            out = out + low_rank(h, "w2")
        return (out * p[:, None])[inverse].view(N, K, -1).sum(1).to(x.dtype)  # (N, D)


def _quant_rows(qm: nn.Module, a: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """a (R, in) rows sorted by expert, through quantized stack `qm` (a QuantExperts matrix) -> (R, out), a's dtype."""
    from ..quant.formats import SCALE_DTYPE

    ab = a.to(SCALE_DTYPE)
    if qm._gpu(ab):
        return qm.grouped(ab, F.pad(ends, (1, 0))).to(a.dtype)
    counts = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()  # host sync (free on the CPU)
    return torch.cat([qm.mm(a_e, e) for e, a_e in enumerate(torch.split(ab, counts)) if len(a_e)]).to(a.dtype)


# ---- attaching ----------------------------------------------------------------------------------------------
def _padded_rank(ranks) -> int:
    return -(-max(ranks) // RANK_MULTIPLE) * RANK_MULTIPLE


@torch.no_grad()
def attach_adapters(model: nn.Module, adapters: dict[str, dict[str, Factors]]) -> AdapterSet:
    """Wrap every base weight some adapter targets with its stacked multi-adapter module; returns their AdapterSet.

    adapters: name -> Factors as dbrx.lora.peft_format.read_peft gives them (checked against the model's config);
    slot i is the i-th name. The model must have no adapters yet; nothing else of it changes."""
    if not adapters:
        raise ValueError("no adapters to attach")
    if has_lora(model) or adapter_set(model) is not None:
        raise ValueError("the model already has LoRA adapters")
    names = list(adapters)
    S = len(names) + 1
    state = AdapterSet(names)
    blocks = model.transformer.blocks
    by_weight: dict[str, list[tuple[int, Factors]]] = {}  # base weight name -> (slot, factors) of each adapter
    for slot, name in enumerate(names, 1):
        for weight, f in adapters[name].items():
            by_weight.setdefault(weight, []).append((slot, f))
    experts: dict[int, dict[str, list[tuple[int, Factors]]]] = {}
    for weight, per in sorted(by_weight.items()):
        block, rest = re.fullmatch(r"transformer\.blocks\.(\d+)\.(.+)", weight).groups()
        if rest.startswith("ffn.experts.mlp."):
            experts.setdefault(int(block), {})[rest.rsplit(".", 1)[1]] = per
            continue
        parent, _, leaf = rest.removesuffix(".weight").rpartition(".")
        owner = blocks[int(block)].get_submodule(parent)
        base = getattr(owner, leaf)
        in_f, out_f = _linear_dims(base)
        kw = dict(dtype=_float_dtype(base), device=_device(base))
        r = _padded_rank(f.rank for _, f in per)
        A, B = torch.zeros(S, r, in_f, **kw), torch.zeros(S, out_f, r, **kw)  # (S, r, in), (S, out, r)
        for slot, f in per:
            A[slot, : f.rank] = f.A
            B[slot, :, : f.rank] = f.B.float() * f.scaling
        setattr(owner, leaf, MultiLoraLinear(base, A, B, state))
    for block, per_weight in experts.items():
        ffn = blocks[block].ffn
        E, F_, D = expert_dims(ffn.experts)
        kw = dict(dtype=_float_dtype(ffn.experts), device=_device(ffn.experts))
        stacks = {}
        for w in ("w1", "v1", "w2"):  # a fixed order
            if w not in per_weight:
                continue
            in_f, out_f = expert_io(w, F_, D)
            r = _padded_rank(f.rank for _, f in per_weight[w])
            A, B = torch.zeros(E, S, r, in_f, **kw), torch.zeros(E, S, out_f, r, **kw)
            for slot, f in per_weight[w]:
                A[:, slot, : f.rank] = f.A  # (E, r, in)
                B[:, slot, :, : f.rank] = f.B.float() * f.scaling  # (E, out, r)
            stacks[w] = (A.view(E * S, r, in_f), B.view(E * S, out_f, r))  # group e*S + s
        ffn.experts = MultiLoraExperts(ffn.experts, stacks, state)
    return state


def adapter_set(model: nn.Module) -> AdapterSet | None:
    """The AdapterSet of a model with several adapters attached (attach_adapters), or None."""
    for module in model.modules():
        if isinstance(module, (MultiLoraLinear, MultiLoraExperts)):
            return module.adapters
    return None


__all__ = ["AdapterSet", "MultiLoraLinear", "MultiLoraExperts", "attach_adapters", "adapter_set"]
