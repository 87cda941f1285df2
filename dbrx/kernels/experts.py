"""Expert compute for the dropless MoE: sort routed rows by expert, grouped GLU matmuls, weighted un-sort.

Shape legend: N tokens, D d_model, F ffn_hidden_size, E experts, K top-k, R = N*K routed rows.

Backends (all exact up to floating-point rounding, all forward and backward, none loops over experts in Python
except `loop`, the readable reference):
  grouped_mm  torch._grouped_mm over the stacked (E, F, D) weights (CUDA, and the CPU where shapes are aligned)
  loop        per-expert matmuls over the sorted rows; needs the group sizes on the host (reference only)
  auto        grouped_mm when it can run the shapes, else loop
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "grouped_mm", "loop")


def sort_by_expert(idx: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """idx (N, K) -> order (R,) stable sort of routed rows by expert, inverse (R,), group ends (E,) int32."""
    flat = idx.reshape(-1)  # (R,)
    order = torch.argsort(flat, stable=True)  # (R,)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.zeros(n_experts, dtype=torch.int32, device=idx.device)
    counts.scatter_add_(0, flat.to(torch.int64), torch.ones_like(flat, dtype=torch.int32))  # no host sync
    return order, inverse, torch.cumsum(counts, 0, dtype=torch.int32)


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and x.shape[-1] % 8 == 0 and w.shape[1] % 8 == 0
    align = 16 // x.element_size()  # the CPU kernel wants 16-byte aligned strides
    return x.shape[-1] % align == 0 and w.shape[1] % align == 0


def _glu_grouped_mm(xs, w1, v1, w2, ends):
    # xs: (R, D) sorted by expert; w*: (E, F, D); ends: (E,) int32 cumulative group sizes.
    gate = torch._grouped_mm(xs, w1.transpose(-2, -1), offs=ends)  # (R, F)
    up = torch._grouped_mm(xs, v1.transpose(-2, -1), offs=ends)  # (R, F)
    h = (F.silu(gate) * up).contiguous()  # (R, F)
    return torch._grouped_mm(h, w2, offs=ends)  # (R, D)


def _glu_loop(xs, w1, v1, w2, ends):
    sizes = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()  # host sync: reference path only
    outs = []
    # unbind (not w[e]) so that backward stacks the per-expert gradients once instead of allocating a
    # full-size zero gradient for every expert
    for x_e, w1_e, v1_e, w2_e in zip(torch.split(xs, sizes), w1.unbind(0), v1.unbind(0), w2.unbind(0)):
        outs.append((F.silu(x_e @ w1_e.T) * (x_e @ v1_e.T)) @ w2_e)  # (R_e, D)
    return torch.cat(outs)


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
    if backend not in BACKENDS:
        raise ValueError(f"unknown expert backend {backend!r}; known: {', '.join(BACKENDS)}")
    N, K = idx.shape
    order, inverse, ends = sort_by_expert(idx, w1.shape[0])
    xs = x[order // K]  # (R, D) routed rows, grouped by expert
    if backend == "auto":
        backend = "grouped_mm" if _grouped_mm_ok(x, w1) else "loop"
    ys = (_glu_grouped_mm if backend == "grouped_mm" else _glu_loop)(xs, w1, v1, w2, ends)  # (R, D)
    ys = ys[inverse].view(N, K, -1)  # (N, K, D) back in token order
    return torch.einsum("nkd,nk->nd", ys, weights)  # (N, D)
