"""Expert compute for the dropless MoE: sort routed rows by expert, grouped GLU matmuls, weighted un-sort.

Shape legend: N tokens, D d_model, F ffn_hidden_size, E experts, K top-k, R = N*K routed rows.

Backends (all exact up to floating-point rounding, all forward and backward):
  grouped_mm  torch._grouped_mm over the stacked (E, F, D) weights (CUDA bf16; the CPU where strides are 16-byte
              aligned; under torch.compile bf16 only)
  triton      our Triton grouped GEMMs (dbrx.kernels.triton_grouped_gemm), gate and up fused in one pass
  dense       every expert on every token, combined with the router weights: E/K times the work, no sorting,
              no host sync; the independent reference for tests
  loop        per-expert matmuls over the sorted rows; needs the group sizes on the host (readable reference)
  auto        CUDA: grouped_mm where it runs the shapes, else triton, else loop. CPU: grouped_mm where aligned,
              else loop (dense while compiling, where a host sync would break the graph)

grouped_mm and triton share one autograd.Function: it saves the routed inputs and the gate/up activations
(not silu(gate) * up, which backward recomputes), and writes each weight gradient once as (E, F, D). No path but
`loop` synchronises with the host, so a block compiles with torch.compile(fullgraph=True).
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "grouped_mm", "triton", "dense", "loop")

_gmm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def sort_by_expert(idx: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """idx (N, K) -> order (R,) stable sort of routed rows by expert, inverse (R,), group ends (E,) int32."""
    flat = idx.reshape(-1)  # (R,)
    order = torch.argsort(flat, stable=True)  # (R,)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.zeros(n_experts, dtype=torch.int32, device=idx.device)
    counts.scatter_add_(0, flat.to(torch.int64), torch.ones_like(flat, dtype=torch.int32))  # no host sync
    return order, inverse, torch.cumsum(counts, 0, dtype=torch.int32)


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch's grouped matmul can run x (R, D) against w (E, F, D) here (dtype, alignment, compile)."""
    if _gmm is None:
        return False
    align = 16 // x.element_size()  # the kernels want 16-byte aligned strides
    aligned = x.shape[-1] % align == 0 and w.shape[1] % align == 0
    if x.device.type == "cuda" or torch.compiler.is_compiling():  # its meta kernel (compile) accepts bf16 only
        return aligned and x.dtype == torch.bfloat16
    return aligned and x.device.type == "cpu"


def triton_supported(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on x's device (CUDA, or the CPU under TRITON_INTERPRET=1)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return x.device.type == "cuda" or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def resolve_backend(backend: str, x: torch.Tensor, w: torch.Tensor) -> str:
    """The concrete backend `auto` (or an explicit choice) means for these tensors; ValueError if it cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown expert backend {backend!r}; known: {', '.join(BACKENDS)}")
    if backend == "auto":
        if grouped_mm_supported(x, w):
            return "grouped_mm"
        if x.device.type == "cuda" and triton_supported(x):
            return "triton"
        return "dense" if torch.compiler.is_compiling() else "loop"
    if backend == "grouped_mm" and not grouped_mm_supported(x, w):
        raise ValueError(
            f"expert backend 'grouped_mm' cannot run {x.dtype} on {x.device.type} with d_model={x.shape[-1]}, "
            f"ffn_hidden_size={w.shape[1]} (needs torch._grouped_mm, 16-byte aligned sizes, bf16 on CUDA)"
        )
    if backend == "triton" and not triton_supported(x):
        raise ValueError("expert backend 'triton' needs triton and a CUDA device (or TRITON_INTERPRET=1 on the CPU)")
    return backend


# ---- grouped GEMM primitives, one set per backend ---------------------------------------------------------
# rows_nt(a, w, ends): a (R, K) @ w_e^T with w (E, N, K) -> (R, N)     rows_nn(a, w, ends): a @ w_e, w (E, K, N)
# up(x, w1, v1, ends) -> gate, up (R, F)                                down_t(a, a2, w, w2, ends): a @ w_e + a2 @ w2_e
# wgrad(a, b, ends): a_e^T @ b_e -> (E, M, N)                           wgrad2(a, a2, b, ends): two of those
def _gm_wgrad(a, b, ends):
    return _gmm(a.transpose(0, 1), b, offs=ends)  # (M, R) x (R, N) split by ends -> (E, M, N)


def _tg():
    """The Triton kernels, imported on first use (TRITON_INTERPRET must be set before triton is imported)."""
    from . import triton_grouped_gemm

    return triton_grouped_gemm


def _bounds(ends):
    return F.pad(ends, (1, 0))  # (E+1,) group starts and ends


_OPS = {
    "grouped_mm": dict(
        up=lambda xs, w1, v1, ends: (_gmm(xs, w1.transpose(-2, -1), offs=ends),
                                     _gmm(xs, v1.transpose(-2, -1), offs=ends)),
        rows_nn=lambda a, w, ends: _gmm(a, w, offs=ends),
        rows_nt=lambda a, w, ends: _gmm(a, w.transpose(-2, -1), offs=ends),
        dx=lambda dg, du, w1, v1, ends: _gmm(dg, w1, offs=ends) + _gmm(du, v1, offs=ends),
        wgrad=_gm_wgrad,
        wgrad2=lambda a, a2, b, ends: (_gm_wgrad(a, b, ends), _gm_wgrad(a2, b, ends)),
    ),
    "triton": dict(  # gate and up in one pass; dx sums both products in one kernel; dw1 and dv1 in one pass
        up=lambda xs, w1, v1, ends: _tg().gmm_rows(xs, w1.transpose(-2, -1), _bounds(ends),
                                                    b2=v1.transpose(-2, -1)),
        rows_nn=lambda a, w, ends: _tg().gmm_rows(a, w, _bounds(ends))[0],
        rows_nt=lambda a, w, ends: _tg().gmm_rows(a, w.transpose(-2, -1), _bounds(ends))[0],
        dx=lambda dg, du, w1, v1, ends: _tg().gmm_rows(dg, w1, _bounds(ends), a2=du, b2=v1, add=True)[0],
        wgrad=lambda a, b, ends: _tg().gmm_wgrad(a, b, _bounds(ends))[0],
        wgrad2=lambda a, a2, b, ends: _tg().gmm_wgrad(a, b, _bounds(ends), a2=a2),
    ),
}


class _GroupedGLU(torch.autograd.Function):
    """ys = (silu(xs @ w1_e^T) * (xs @ v1_e^T)) @ w2_e per expert group; explicit backward, weight grads (E, F, D)."""

    @staticmethod
    def forward(ctx, xs, w1, v1, w2, ends, backend: str):
        ops = _OPS[backend]
        gate, up = ops["up"](xs, w1, v1, ends)  # (R, F) each
        h = F.silu(gate) * up  # (R, F)
        ys = ops["rows_nn"](h, w2, ends)  # (R, D)
        ctx.save_for_backward(xs, w1, v1, w2, ends, gate, up)
        ctx.backend = backend
        return ys

    @staticmethod
    def backward(ctx, dys):
        xs, w1, v1, w2, ends, gate, up = ctx.saved_tensors
        ops = _OPS[ctx.backend]
        dys = dys.contiguous()  # an expanded (stride-0) gradient breaks the grouped kernels
        dh = ops["rows_nt"](dys, w2, ends)  # (R, F) = dys @ w2_e^T
        h, dgate, dup = glu_backward(gate, up, dh)  # (R, F) each; h recomputed rather than saved
        del dh
        need = ctx.needs_input_grad
        dw2 = ops["wgrad"](h, dys, ends) if need[3] else None  # (E, F, D)
        del h  # before the larger products below, to lower the peak
        dxs = ops["dx"](dgate, dup, w1, v1, ends) if need[0] else None  # (R, D)
        dw1 = dv1 = None
        if need[1] or need[2]:
            dw1, dv1 = ops["wgrad2"](dgate, dup, xs, ends)  # (E, F, D) each
        return dxs, dw1, dv1, dw2, None, None


GLU_CHUNK_ELEMENTS = 1 << 25  # eager backward: fp32 temporaries of at most this many elements (128 MB) each


def glu_backward(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor):
    """h = silu(gate) * up, d gate and d up from dh = dL/dh, all (R, F) in gate's dtype, computed in fp32.

    Compiled, this is one fused pass. Eager, it runs in row chunks so that the fp32 temporaries stay small:
    unchunked, they took 7 GB at DBRX's size (32768 routed rows x 10752) on top of the gradients.
    """
    rows = max(1, GLU_CHUNK_ELEMENTS // max(gate.shape[1], 1))
    if torch.compiler.is_compiling() or gate.shape[0] <= rows:
        return _glu_backward_rows(gate, up, dh)
    h, dgate, dup = torch.empty_like(gate), torch.empty_like(gate), torch.empty_like(gate)
    for s in range(0, gate.shape[0], rows):  # a handful of chunks by size, not per expert; no host sync
        h[s:s + rows], dgate[s:s + rows], dup[s:s + rows] = _glu_backward_rows(
            gate[s:s + rows], up[s:s + rows], dh[s:s + rows])
    return h, dgate, dup


def _glu_backward_rows(gate, up, dh):
    g, u, d = gate.float(), up.float(), dh.float()
    sig = torch.sigmoid(g)
    silu = g * sig
    dgate = d * u * sig * (1 + g * (1 - sig))  # d silu(g) / dg = sig * (1 + g * (1 - sig))
    return (silu * u).to(gate.dtype), dgate.to(gate.dtype), (d * silu).to(gate.dtype)


def _glu_loop(xs, w1, v1, w2, ends):
    sizes = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()  # host sync: reference path only
    outs = []
    # unbind (not w[e]) so that backward stacks the per-expert gradients once instead of allocating a
    # full-size zero gradient for every expert
    for x_e, w1_e, v1_e, w2_e in zip(torch.split(xs, sizes), w1.unbind(0), v1.unbind(0), w2.unbind(0)):
        outs.append((F.silu(x_e @ w1_e.T) * (x_e @ v1_e.T)) @ w2_e)  # (R_e, D)
    return torch.cat(outs)


def _dense(x, weights, idx, w1, v1, w2):
    comb = weights.new_zeros(x.shape[0], w1.shape[0]).scatter(1, idx, weights)  # (N, E), zero where not routed
    h = F.silu(torch.einsum("nd,efd->nef", x, w1)) * torch.einsum("nd,efd->nef", x, v1)  # (N, E, F)
    return torch.einsum("nef,efd,ne->nd", h, w2, comb)  # (N, D)


def expert_glu(
    x: torch.Tensor,
    weights: torch.Tensor,
    idx: torch.Tensor,
    w1: torch.Tensor,
    v1: torch.Tensor,
    w2: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """x (N, D), router weights (N, K), expert ids (N, K), w1/v1/w2 (E, F, D) -> sum_k weight * expert(x): (N, D)."""
    backend = resolve_backend(backend, x, w1)
    if backend == "dense":
        return _dense(x, weights, idx, w1, v1, w2)
    N, K = idx.shape
    order, inverse, ends = sort_by_expert(idx, w1.shape[0])
    xs = x[order // K]  # (R, D) routed rows, grouped by expert
    if backend == "loop":
        ys = _glu_loop(xs, w1, v1, w2, ends)
    elif torch.is_grad_enabled() and any(t.requires_grad for t in (x, w1, v1, w2)):
        ys = _GroupedGLU.apply(xs, w1, v1, w2, ends, backend)  # (R, D)
    else:  # inference: nothing kept for backward, so SiLU and the product go in place (half the (R, F) memory)
        ops = _OPS[backend]
        gate, up = ops["up"](xs, w1, v1, ends)  # (R, F) each
        ys = ops["rows_nn"](F.silu(gate, inplace=True).mul_(up), w2, ends)  # (R, D)
    ys = ys[inverse].view(N, K, -1)  # (N, K, D) back in token order
    return torch.einsum("nkd,nk->nd", ys, weights)  # (N, D)
