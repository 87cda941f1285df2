"""Triton grouped GEMM against weight-only int8 / int4 expert stacks, dequantized in the kernel (the GPU path of
dbrx.quant), over routed rows sorted by expert.

Shape legend: R routed rows (sorted by expert), E experts, K input features, N output features. The weights are in
the checkpoint layout of dbrx.quant.formats, (E, N, K) "out, in" matrices:
  int8  q int8 (E, N, K), scale (E, N):                          W[e, n, k] = q * scale[e, n]
  int4  q uint8 (E, N, ceil(K/2)) with input 2j in the low nibble of byte j, 2j+1 in the high one; scale, zero
        (E, N, ceil(K / G)) for groups of G inputs:               W[e, n, k] = (code - 8) * scale + zero
`bounds` (E+1,) int32: rows bounds[e] .. bounds[e+1] are expert e's. C[r] = A[r] @ W[e(r)]^T, (R, N) in A's dtype,
accumulated in fp32. int8: the integer tile meets A in A's dtype and each output column is scaled once at the end
(per-channel scales factor out of the sum). int4: a K tile never spans two groups (BLOCK_K divides G), so each tile
dequantizes with one scale and one zero per column. No full-size dequantized weight ever exists. A Linear is the
case E = 1, bounds [0, R].

As in dbrx.kernels.triton_grouped_gemm, the grid is sized for the worst case over group sizes (cdiv(R, BLOCK_M) + E
row tiles; surplus programs exit), so nothing synchronises with the host, and the op is a `torch.library` custom op.
On the CPU it runs under the Triton interpreter (`TRITON_INTERPRET=1`, set before import), which is how it is tested.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MIN_GROUP = 32  # the smallest int4 group size (dbrx.quant.formats.INT4_GROUP_SIZES): BLOCK_K must divide it

if _INTERPRET:  # the interpreter is slow: one small tile shape
    _CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=1)]
else:
    _CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (16, 64, 32, 4, 4),  # decode: few rows per expert, many columns
            (16, 128, 32, 4, 4),
            (32, 128, 32, 4, 4),
            (64, 128, 32, 4, 4),
            (128, 128, 32, 8, 3),
        ]
    ]


@triton.autotune(configs=_CONFIGS, key=["N", "K", "BITS", "G"])
@triton.jit
def _qrows_kernel(
    a_ptr, q_ptr, s_ptr, z_ptr, c_ptr, bounds_ptr,
    R, N, K,
    s_am, s_ak, s_qe, s_qn, s_qk, s_se, s_sn, s_sg, s_cm, s_cn,
    E: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_tiles_n
    pid_n = pid % n_tiles_n
    # the expert owning row tile pid_m: each expert's rows are tiled on their own (no tile spans two)
    tiles = 0
    expert = -1
    row0 = 0
    row_end = 0
    for e in tl.static_range(E):
        start = tl.load(bounds_ptr + e)
        end = tl.load(bounds_ptr + e + 1)
        n_tiles = tl.cdiv(end - start, BLOCK_M)
        hit = (pid_m >= tiles) & (pid_m < tiles + n_tiles)
        expert = tl.where(hit, e, expert)
        row0 = tl.where(hit, start + (pid_m - tiles) * BLOCK_M, row0)
        row_end = tl.where(hit, end, row_end)
        tiles += n_tiles
    if expert < 0:  # a surplus tile of the worst-case grid
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rows < row_end
    n_ok = cols < N
    q_base = expert.to(tl.int64) * s_qe
    s_base = expert.to(tl.int64) * s_se
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_ptr + rows[:, None].to(tl.int64) * s_am + ks[None, :] * s_ak,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        b_mask = k_ok[:, None] & n_ok[None, :]
        if BITS == 8:
            q = tl.load(q_ptr + q_base + cols[None, :] * s_qn + ks[:, None] * s_qk, mask=b_mask, other=0)
            b = q.to(tl.float32)  # (BLOCK_K, BLOCK_N) integer values, exact in bf16 too
        else:
            byte = tl.load(q_ptr + q_base + cols[None, :] * s_qn + (ks[:, None] // 2) * s_qk, mask=b_mask, other=0)
            code = (byte.to(tl.int32) >> ((ks[:, None] % 2) * 4)) & 15
            g = k0 // G  # the tile's one group
            sc = tl.load(s_ptr + s_base + cols * s_sn + g * s_sg, mask=n_ok, other=0.0).to(tl.float32)
            zr = tl.load(z_ptr + s_base + cols * s_sn + g * s_sg, mask=n_ok, other=0.0).to(tl.float32)
            b = (code.to(tl.float32) - 8.0) * sc[None, :] + zr[None, :]
            b = tl.where(b_mask, b, 0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong (triton 3.9): multiply in fp32 there
            acc = tl.dot(a.to(tl.float32), b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b.to(a.dtype), acc)
    if BITS == 8:  # per output channel: one scale per column, after the sum
        sc = tl.load(s_ptr + s_base + cols * s_sn, mask=n_ok, other=0.0).to(tl.float32)
        acc = acc * sc[None, :]
    tl.store(c_ptr + rows[:, None].to(tl.int64) * s_cm + cols[None, :] * s_cn, acc.to(c_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@torch.library.custom_op("dbrx::triton_quant_gmm", mutates_args=())
def quant_gmm(a: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
              bounds: torch.Tensor, bits: int, group_size: int, in_features: int) -> torch.Tensor:
    """a (R, K) rows sorted by expert, q/scale/zero an (E, N, ...) quantized stack (module docstring), bounds (E+1,)
    int32 -> (R, N) in a's dtype. group_size: int4's (ignored for int8)."""
    assert a.dim() == 2 and q.dim() == 3 and bounds.dtype == torch.int32, (a.shape, q.shape, bounds.dtype)
    assert a.shape[1] == in_features and bits in (8, 4), (a.shape, in_features, bits)
    R, K = a.shape
    E, N = q.shape[:2]
    c = torch.empty(R, N, dtype=a.dtype, device=a.device)
    if R == 0:
        return c
    if bits == 4:
        assert zero is not None and group_size % MIN_GROUP == 0 and scale.shape == zero.shape
        assert scale.stride() == zero.stride()
    s3 = scale if scale.dim() == 3 else scale[..., None]  # int8: (E, N) -> (E, N, 1)

    def grid(meta):
        return ((triton.cdiv(R, meta["BLOCK_M"]) + E) * triton.cdiv(N, meta["BLOCK_N"]),)

    _qrows_kernel[grid](
        a, q, s3, s3 if zero is None else zero, c, bounds,
        R, N, K,
        a.stride(0), a.stride(1), q.stride(0), q.stride(1), q.stride(2), s3.stride(0), s3.stride(1), s3.stride(2),
        c.stride(0), c.stride(1),
        E=E, BITS=bits, G=group_size if bits == 4 else MIN_GROUP, UPCAST=_INTERPRET,
    )
    return c


@quant_gmm.register_fake
def _(a, q, scale, zero, bounds, bits, group_size, in_features):
    return a.new_empty(a.shape[0], q.shape[1])


__all__ = ["quant_gmm", "MIN_GROUP"]
