"""Expert compute with per-expert low-rank adapters (LoRA) on the stacked expert weights.

Shape legend as in dbrx.kernels.experts: N tokens, D d_model, F ffn_hidden_size, E experts, K top-k, R = N*K
routed rows; r the adapter rank.

Each adapted weight W of expert e gets a low-rank update scaling * B_e @ A_e. The factors stay stacked like the
experts, always as (input side, output side):
  w1, v1 (D -> F):  A (E, r, D), B (E, F, r)      gate = x @ w1_e^T + s * (x @ A_e^T) @ B_e^T
  w2     (F -> D):  A (E, r, F), B (E, D, r)      out  = h @ w2_e   + s * (h @ A_e^T) @ B_e^T
(w2 is stored (E, F, D), not transposed: its update as a (F, D) matrix is s * A_e^T @ B_e^T.)

Several adapters at once (serving, inference only): each token n has an adapter slot s_n in [0, S) and the factors
are stacked per (expert, slot), A (E*S, r, in) and B (E*S, out, r) with group g = e*S + s (slot 0 all zeros: the
base model; scaling folded into B). The routed rows are sorted by g, so that each expert's rows stay contiguous
for the base GEMMs (E groups) and split by slot for the adapter GEMMs (E*S groups): still one grouped GEMM per
product. `segment_lora` is the same for a linear layer: rows sorted by slot, two grouped GEMMs over S groups (the
segmented GEMM of vLLM's multi-LoRA kernels, here on the experts' grouped kernels).

On the grouped backends (grouped_mm, triton) the routed rows are sorted by expert once and every product, base and
adapter alike, is one grouped GEMM over them with the per-expert offsets: the adapter path is two grouped GEMMs
(rows @ A_e^T, then @ B_e^T), with no Python loop over experts and no host sync. Each GEMM is an autograd op
(`grouped_linear`) whose backward is two more grouped GEMMs; a frozen base weight gets no gradient and keeps no
copy of its input. `dense` (every expert on every token) and `loop` (per-expert matmuls) are the references, as
for the plain experts. Imports: torch, dbrx.kernels.experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .experts import (
    _OPS,
    _combine,
    glu_backward,
    grouped_mm_supported,
    resolve_backend,
    sort_by_expert,
    triton_supported,
)

ADAPTED = ("w1", "v1", "w2")

# name -> (A (E, r, in), B (E, out, r), scaling)
Adapters = dict[str, tuple[torch.Tensor, torch.Tensor, float]]


class _GroupedLinear(torch.autograd.Function):
    """y_r = a_r @ w_e^T for the rows r of expert e: a (R, Kin) sorted by expert, w (E, Nout, Kin) -> (R, Nout)."""

    @staticmethod
    def forward(ctx, a, w, ends, backend: str):
        ctx.save_for_backward(a if w.requires_grad else None, w, ends)  # a frozen w needs no copy of a
        ctx.backend = backend
        return _OPS[backend]["rows_nt"](a, w, ends)

    @staticmethod
    def backward(ctx, dy):
        a, w, ends = ctx.saved_tensors
        ops = _OPS[ctx.backend]
        dy = dy.contiguous()
        da = ops["rows_nn"](dy, w, ends) if ctx.needs_input_grad[0] else None  # (R, Kin) = dy @ w_e
        dw = ops["wgrad"](dy, a, ends) if ctx.needs_input_grad[1] else None  # (E, Nout, Kin) = dy_e^T @ a_e
        return da, dw, None, None


def grouped_linear(a: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, backend: str) -> torch.Tensor:
    """a (R, Kin) rows sorted by expert, w (E, Nout, Kin), ends (E,) group ends -> a_e @ w_e^T (R, Nout), with
    autograd; backend 'grouped_mm' or 'triton'."""
    return _GroupedLinear.apply(a, w, ends, backend)


class _GLU(torch.autograd.Function):
    """hp = p * silu(gate) * up (R, F); keeps gate and up, recomputes hp in backward (as the plain experts do)."""

    @staticmethod
    def forward(ctx, gate, up, p):
        ctx.save_for_backward(gate, up, p)
        return F.silu(gate).mul_(up).mul_(p[:, None])

    @staticmethod
    def backward(ctx, dhp):
        gate, up, p = ctx.saved_tensors
        _, dgate, dup, dp = glu_backward(gate, up, dhp.contiguous(), p)
        return dgate, dup, dp


def lora_backend(backend: str, x: torch.Tensor, w1: torch.Tensor, ranks) -> str:
    """The concrete backend for the adapted experts: as `resolve_backend`, and for grouped_mm every adapter GEMM must
    be 16-byte aligned too (rank a multiple of 8 in bf16, of 4 in fp32); `auto` falls back where it is not."""
    resolved = resolve_backend(backend, x, w1)
    if resolved != "grouped_mm":
        return resolved
    align = 16 // x.element_size()
    if all(r % align == 0 for r in ranks):
        return resolved
    if backend == "grouped_mm":
        raise ValueError(f"expert backend 'grouped_mm' needs the LoRA rank to be a multiple of {align} for "
                         f"{x.dtype} (16-byte aligned GEMMs), got {sorted(set(ranks))}")
    if x.device.type == "cuda" and triton_supported(x):
        return "triton"
    return "dense" if torch.compiler.is_compiling() else "loop"


def _drop(t: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    return F.dropout(t, p, training) if p and training else t


def _rows_nt_loop(a: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """As the grouped `rows_nt`: a (R, Kin) sorted by group, w (G, Nout, Kin) -> a_g @ w_g^T (R, Nout), one matmul per
    group (reads the group sizes on the host)."""
    sizes = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()
    return torch.cat([a_g @ w[g].T for g, a_g in enumerate(torch.split(a, sizes))])


def rows_backend(x: torch.Tensor, A: torch.Tensor, out: int) -> str:
    """The backend for the inference GEMMs x (R, in) @ A_g^T (A (G, r, in)) then @ B_g^T (B (G, out, r)): grouped_mm
    where torch runs it for x and A and `out` is 16-byte aligned too, else triton on CUDA, else loop (dense while
    compiling: no host sync)."""
    if out % (16 // x.element_size()) == 0 and grouped_mm_supported(x, A):
        return "grouped_mm"
    if x.device.type == "cuda" and triton_supported(x):
        return "triton"
    return "dense" if torch.compiler.is_compiling() else "loop"


def grouped_rows(a: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, backend: str) -> torch.Tensor:
    """a (R, Kin) sorted by group, w (G, Nout, Kin), ends (G,) -> a_g @ w_g^T (R, Nout), no autograd (inference);
    backend grouped_mm, triton or loop."""
    return _rows_nt_loop(a, w, ends) if backend == "loop" else _OPS[backend]["rows_nt"](a, w, ends)


def segment_lora(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Each row through its own adapter: x (N, in), A (S, r, in), B (S, out, r), slots (N,) -> (x_n @ A_s^T) @ B_s^T
    (N, out) with s = slots[n]. Inference only (no autograd)."""
    S = A.shape[0]
    backend = rows_backend(x, A, B.shape[1])
    if backend == "dense":  # every row gathers its own factors: N * r * (in + out) memory, no sort
        t = torch.einsum("ni,nri->nr", x, A[slots])  # (N, r)
        return torch.einsum("nr,nor->no", t, B[slots])  # (N, out)
    order, inverse, ends = sort_by_expert(slots[:, None], S)  # rows sorted by slot, (S,) group ends
    t = grouped_rows(x[order], A, ends, backend)  # (N, r)
    return grouped_rows(t, B, ends, backend)[inverse]  # (N, out) back in the rows' order


def lora_expert_glu(
    x: torch.Tensor,
    weights: torch.Tensor,
    idx: torch.Tensor,
    w1: torch.Tensor,
    v1: torch.Tensor,
    w2: torch.Tensor,
    adapters: Adapters,
    backend: str = "auto",
    recompute: bool = False,
    dropout: float = 0.0,
    training: bool = False,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (N, D), router weights (N, K), expert ids (N, K), w1/v1/w2 (E, F, D), adapters {name: (A, B, s)} for some of
    w1, v1, w2 -> sum_k weight * adapted expert(x): (N, D).

    dropout (training only) applies to each adapter's input, as PEFT does. recompute (selective checkpointing): the
    gate/up activations are not kept for backward but computed again there.
    slots (N,): each token's adapter slot, with the factors stacked per (expert, slot) as A (E*S, r, in),
    B (E*S, out, r), group e*S + s (see the module's docstring); None: one adapter, A (E, r, in), B (E, out, r).
    """
    unknown = set(adapters) - set(ADAPTED)
    assert not unknown, f"adapters for unknown expert weights {unknown}"
    backend = lora_backend(backend, x, w1, [a.shape[1] for a, _, _ in adapters.values()])
    E = w1.shape[0]
    S = 1 if slots is None else next(iter(adapters.values()))[0].shape[0] // E  # adapter slots
    if backend == "dense":
        return _dense(x, weights, idx, w1, v1, w2, adapters, dropout, training, slots, S)
    N, K = idx.shape
    if slots is None:
        order, inverse, ends = sort_by_expert(idx, E)
        fine = ends
    else:  # sorted by (expert, slot): E groups for the base, E*S for the adapters
        order, inverse, fine = sort_by_expert(idx * S + slots[:, None], E * S)  # fine (E*S,)
        ends = fine[S - 1 :: S]  # (E,) an expert's rows end where those of its last slot do
    src = order // K  # (R,) the token of each routed row
    p = weights.reshape(-1)[order]  # (R,) the router weight of each routed row
    if backend == "loop":
        return _combine(_loop(x[src], p, w1, v1, w2, fine, S, adapters, dropout, training), inverse, K)

    def lin(a, w, groups=ends):  # (R, in) @ w_g^T -> (R, out), one grouped GEMM
        return grouped_linear(a, w, groups, backend)

    def low_rank(a, name):  # s * (drop(a) @ A_g^T) @ B_g^T: two grouped GEMMs through rank r
        A, B, s = adapters[name]
        return lin(lin(_drop(a, dropout, training), A, fine), B, fine) * s

    def glu(xs, p):  # (R, D) -> p * silu(gate) * up (R, F)
        gate, up = lin(xs, w1), lin(xs, v1)
        if "w1" in adapters:
            gate = gate + low_rank(xs, "w1")
        if "v1" in adapters:
            up = up + low_rank(xs, "v1")
        return _GLU.apply(gate, up, p)

    xs = x[src]  # (R, D) the routed rows, in expert order
    if recompute and torch.is_grad_enabled():
        hp = checkpoint(glu, xs, p, use_reentrant=False)  # keeps xs and p only; the gate/up GEMMs run again
    else:
        hp = glu(xs, p)
    out = lin(hp, w2.transpose(-2, -1))  # (R, D) = hp @ w2_e
    if "w2" in adapters:
        out = out + low_rank(hp, "w2")
    return _combine(out, inverse, K)  # (N, D)


def _loop(xs, p, w1, v1, w2, fine, S, adapters, dropout, training):
    """Per-expert matmuls over the sorted rows, and per (expert, slot) for the adapters (reads the group sizes on
    the host: the readable reference). fine (E*S,): the group ends of the rows, sorted by (expert, slot)."""
    sizes = torch.diff(fine, prepend=fine.new_zeros(1)).tolist()  # (E*S,) rows per group

    def proj(a, name, e, w):  # a @ W_e^T (+ each slot's adapter on its rows), W_e as (out, in)
        y = a @ w.T
        if name in adapters:
            A, B, s = adapters[name]
            parts = torch.split(_drop(a, dropout, training), sizes[e * S : (e + 1) * S])
            y = y + torch.cat([(t @ A[e * S + j].T) @ B[e * S + j].T for j, t in enumerate(parts)]) * s
        return y

    per_expert = [sum(sizes[e * S : (e + 1) * S]) for e in range(w1.shape[0])]
    outs = []
    for e, (x_e, p_e) in enumerate(zip(torch.split(xs, per_expert), torch.split(p, per_expert))):
        h = F.silu(proj(x_e, "w1", e, w1[e])) * proj(x_e, "v1", e, v1[e]) * p_e[:, None]  # (R_e, F)
        outs.append(proj(h, "w2", e, w2[e].T))  # (R_e, D)
    return torch.cat(outs)


def _dense(x, weights, idx, w1, v1, w2, adapters, dropout, training, slots=None, S=1):
    """Every expert on every token, combined with the router weights (no sorting, no host sync). With slots, each
    token gathers its slot's factors: (E, N, r, in), the reference for several adapters."""
    E = w1.shape[0]
    comb = weights.new_zeros(x.shape[0], E).scatter(1, idx, weights)  # (N, E), zero where not routed

    def low_rank(a, name, eq):  # a (N, [E,] in) -> (N, E, r)
        A, B, s = adapters[name]
        if slots is None:
            return torch.einsum(f"{eq},erd->ner", _drop(a, dropout, training), A), B, s
        A = A.view(E, S, *A.shape[1:])[:, slots]  # (E, N, r, in)
        B = B.view(E, S, *B.shape[1:])[:, slots]  # (E, N, out, r)
        return torch.einsum(f"{eq},enrd->ner", _drop(a, dropout, training), A), B, s

    def out_eq(eq):  # the B product's einsum, with B (E, out, r) or per token (E, N, out, r)
        return eq if slots is None else eq.replace(",e", ",en", 1)

    def up_proj(name, w):  # (N, D) -> (N, E, F)
        y = torch.einsum("nd,efd->nef", x, w)
        if name in adapters:
            t, B, s = low_rank(x, name, "nd")  # (N, E, r)
            y = y + torch.einsum(out_eq("ner,efr->nef"), t, B) * s
        return y

    h = F.silu(up_proj("w1", w1)) * up_proj("v1", v1)  # (N, E, F)
    y = torch.einsum("nef,efd,ne->nd", h, w2, comb)  # (N, D)
    if "w2" in adapters:
        t, B, s = low_rank(h, "w2", "ned")  # (N, E, r), with d the F side here
        y = y + torch.einsum(out_eq("ner,edr,ne->nd"), t, B, comb) * s
    return y


__all__ = ["lora_expert_glu", "grouped_linear", "lora_backend", "segment_lora", "grouped_rows", "rows_backend",
           "ADAPTED"]
