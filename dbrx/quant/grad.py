"""Autograd through the quantized kernels, for QLoRA: the quantized weights are frozen, gradients flow to the input.

`quant_matmul(x, qm, e)` is x @ W^T (W_e^T of a stack) through torch's weight-only kernel; its backward
dx = dy @ W dequantizes that one matrix to fp32 (`dequantize`), multiplies, and drops it, so a stack of experts is
never dequantized as a whole and nothing but the input's shape is kept for backward.

int4 weights sit in `_convert_weight_to_int4pack_for_cpu`'s private layout, which depends on torch's build and the
CPU (AVX512 or not); it is not assumed but measured once per matrix shape (`_int4_kernel_order`: a few
conversions of an index matrix; the permutation is cached, 4 bytes per weight element, shared by every expert and
layer of that shape).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .formats import dequantize_int4_rows


@torch.no_grad()
def dequantize(qm, e: int | None = None) -> torch.Tensor:
    """Matrix W of a quantized matmul module (or W_e of its stack) as fp32 (out, in): what its kernel multiplies by."""
    if qm.bits == 8:
        w, s = (qm.qweight, qm.weight_scale) if e is None else (qm.qweight[e], qm.weight_scale[e])
        return w.float() * s.float()[:, None]
    if qm.layout == "file":  # the checkpoint layout (CUDA, our CPU kernels): (out, ceil(in/2)) uint8 + (out, ng)
        # scales and zeros
        w, s, z = (qm.qweight, qm.weight_scale, qm.weight_zero) if e is None else (
            qm.qweight[e], qm.weight_scale[e], qm.weight_zero[e])
        return dequantize_int4_rows(w, s, z, qm.in_features, qm.group_size, torch.float32)
    w, sz = qm.qweight, qm.weight_scales_and_zeros  # (Np, Kp/2) uint8, (ng, Np, 2)
    if e is not None:
        w, sz = w[e], sz[e]
    ng, Np = sz.shape[0], sz.shape[1]
    Kp = ng * qm.group_size
    nibbles = torch.stack((w & 15, w >> 4), dim=-1).reshape(-1)  # (Np * Kp,) in the kernel's order
    codes = nibbles[_int4_kernel_order(Np, Kp)].view(Np, Kp)[: qm.out_features, : qm.in_features]
    g = torch.arange(qm.in_features) // qm.group_size  # (in,) the group of each input
    scale = sz[:, : qm.out_features, 0].float().T[:, g]  # (out, in)
    zero = sz[:, : qm.out_features, 1].float().T[:, g]
    return (codes.float() - 8) * scale + zero


@lru_cache(maxsize=8)
def _int4_kernel_order(Np: int, Kp: int) -> torch.Tensor:
    """For each element (n, k) of an (Np, Kp) code matrix (flat index n * Kp + k), the index of its nibble among
    the low/high nibbles (low first) of `_convert_weight_to_int4pack_for_cpu`'s output: each element's own position
    is packed as codes, 4 bits at a time, and read back from where its nibble lands."""
    n = Np * Kp
    flat = torch.arange(n, dtype=torch.int64)
    where = torch.zeros(n, dtype=torch.int64)  # nibble i -> the element it holds
    for shift in range(0, max(n - 1, 1).bit_length(), 4):
        codes = ((flat >> shift) & 15).to(torch.int32).view(Np, Kp)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        where |= torch.stack((packed & 15, packed >> 4), dim=-1).reshape(-1).to(torch.int64) << shift
    order = torch.full_like(where, -1)
    order[where] = flat
    if bool((order < 0).any()):
        raise RuntimeError("torch's int4 kernel layout is not a permutation of its codes: cannot dequantize")
    return order.to(torch.int32) if n < 2**31 else order  # kept (cached) per shape: 4 bytes an element


class _QuantMM(torch.autograd.Function):
    """y = x @ W^T through the quantized kernel (bf16 in, out in x's dtype); dx = dy @ W with W dequantized."""

    @staticmethod
    def forward(ctx, x, qm, e):
        ctx.qm, ctx.e = qm, e
        return qm.mm(x, e).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        w = dequantize(ctx.qm, ctx.e)  # (out, in) fp32, this one matrix only
        return (dy.float() @ w).to(dy.dtype), None, None


def quant_matmul(x: torch.Tensor, qm, e: int | None = None) -> torch.Tensor:
    """x (M, in) @ W^T (W_e^T of a stack) -> (M, out) in x's dtype; differentiable w.r.t. x (never w.r.t. W)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _QuantMM.apply(x, qm, e)
    return qm.mm(x, e).to(x.dtype)


__all__ = ["quant_matmul", "dequantize"]
