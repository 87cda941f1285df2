"""Triton grouped GEMMs for the expert GLU, forward and backward, over routed rows sorted by expert.

Shape legend: R routed rows (sorted by expert), E experts, `bounds` (E+1,) int32 row offsets of the groups
(bounds[e] .. bounds[e+1] are expert e's rows; bounds[0] = 0). All group sizes stay on the device: the grid is
sized for the worst case (cdiv(R, BLOCK_M) + E row tiles) and surplus programs exit at once, so nothing here
synchronises with the host.

Two kernels:
  rows   C[r] = A[r] @ B[e(r)]  (+ A2[r] @ B2[e(r)]), B given as any strided (E, K, N) view. With B2 and no A2
         it writes a second output from the same loaded A tile (the fused w1/v1 pass: gate and up at once);
         with A2 and B2 it sums both products into one output (dx = dgate @ w1 + dup @ v1).
  wgrad  C[e] = A_e^T @ B_e over expert e's rows, (E, M, N), zeros for experts without rows; with A2 a second
         output sharing the loaded B tiles (dw1 and dv1 from one pass over the routed inputs).

The kernels are wrapped as `torch.library` custom ops so that `torch.compile(fullgraph=True)` treats them as
opaque ops. On the CPU they run under the Triton interpreter (`TRITON_INTERPRET=1`, set before import).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
GROUP_M = 8  # row tiles per group in the rows kernel's tile order

if _INTERPRET:  # the interpreter is slow: one small tile shape
    _CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=1)]
else:
    _CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 128, 64, 8, 4),
            (128, 256, 64, 8, 3),
            (64, 128, 64, 4, 4),
            (128, 64, 64, 4, 4),
            (64, 64, 32, 4, 4),
        ]
    ]


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # the interpreter's bf16 dot is wrong (triton 3.9): multiply in fp32 there
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:  # one return at the end: no early return for the compiler to handle
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.autotune(configs=_CONFIGS, key=["N", "K", "HAS2", "ADD2", "IEEE"])
@triton.jit
def _rows_kernel(
    a_ptr, b_ptr, a2_ptr, b2_ptr, c_ptr, c2_ptr, bounds_ptr,
    R, N, K,
    s_am, s_ak, s_be, s_bk, s_bn, s_cm, s_cn,
    E: tl.constexpr, HAS2: tl.constexpr, SHARE_A: tl.constexpr, ADD2: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row tiles sweep all column tiles before the next rows start, so the programs
    # running at once share a few row tiles of A and a band of B in L2. (Row tiles fastest would stream all of A
    # from memory once per column tile: 84 times for DBRX's gate/up projection.)
    pid = tl.program_id(0)
    n_tiles_m = tl.cdiv(R, BLOCK_M) + E  # the worst case over group sizes (see the module docstring)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * n_tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(n_tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    # Find the expert owning row tile pid_m: each expert's rows are tiled on their own (no tile spans two).
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
    b_base = expert.to(tl.int64) * s_be
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a_off = rows[:, None].to(tl.int64) * s_am + ks[None, :] * s_ak
        b_off = b_base + ks[:, None] * s_bk + cols[None, :] * s_bn
        a_mask = m_ok[:, None] & k_ok[None, :]
        b_mask = k_ok[:, None] & n_ok[None, :]
        a = tl.load(a_ptr + a_off, mask=a_mask, other=0.0)
        b = tl.load(b_ptr + b_off, mask=b_mask, other=0.0)
        acc = _dot(a, b, acc, IEEE, UPCAST)
        if HAS2:
            if SHARE_A:
                a2 = a
            else:
                a2 = tl.load(a2_ptr + a_off, mask=a_mask, other=0.0)
            b2 = tl.load(b2_ptr + b_off, mask=b_mask, other=0.0)
            acc2 = _dot(a2, b2, acc2, IEEE, UPCAST)
    c_off = rows[:, None].to(tl.int64) * s_cm + cols[None, :] * s_cn
    c_mask = m_ok[:, None] & n_ok[None, :]
    if HAS2 and ADD2:
        acc += acc2
    tl.store(c_ptr + c_off, acc.to(c_ptr.dtype.element_ty), mask=c_mask)
    if HAS2 and not ADD2:
        tl.store(c2_ptr + c_off, acc2.to(c2_ptr.dtype.element_ty), mask=c_mask)


@triton.autotune(configs=_CONFIGS, key=["M", "N", "HAS2", "IEEE"])
@triton.jit
def _wgrad_kernel(
    a_ptr, a2_ptr, b_ptr, c_ptr, c2_ptr, bounds_ptr,
    M, N,
    s_ar, s_am, s_br, s_bn, s_ce, s_cm, s_cn,
    HAS2: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    expert = tl.program_id(1)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    ms = (pid // n_tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = (pid % n_tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = ms < M
    n_ok = ns < N
    start = tl.load(bounds_ptr + expert)
    end = tl.load(bounds_ptr + expert + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_K):  # the reduction runs over this expert's rows
        rs = r0 + tl.arange(0, BLOCK_K)
        r_ok = rs < end
        a_off = rs[None, :].to(tl.int64) * s_ar + ms[:, None] * s_am  # (BLOCK_M, BLOCK_K): A_e^T tile
        a_mask = m_ok[:, None] & r_ok[None, :]
        b = tl.load(b_ptr + rs[:, None].to(tl.int64) * s_br + ns[None, :] * s_bn,
                    mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        a = tl.load(a_ptr + a_off, mask=a_mask, other=0.0)
        acc = _dot(a, b, acc, IEEE, UPCAST)
        if HAS2:
            a2 = tl.load(a2_ptr + a_off, mask=a_mask, other=0.0)
            acc2 = _dot(a2, b, acc2, IEEE, UPCAST)
    c_off = expert.to(tl.int64) * s_ce + ms[:, None] * s_cm + ns[None, :] * s_cn
    c_mask = m_ok[:, None] & n_ok[None, :]
    tl.store(c_ptr + c_off, acc.to(c_ptr.dtype.element_ty), mask=c_mask)
    if HAS2:
        tl.store(c2_ptr + c_off, acc2.to(c2_ptr.dtype.element_ty), mask=c_mask)


def _check(a: torch.Tensor, bounds: torch.Tensor) -> None:
    assert a.dim() == 2 and bounds.dim() == 1 and bounds.dtype == torch.int32, (a.shape, bounds.dtype)


@torch.library.custom_op("dbrx::triton_gmm_rows", mutates_args=())
def gmm_rows(
    a: torch.Tensor,
    b: torch.Tensor,
    bounds: torch.Tensor,
    a2: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    add: bool = False,
) -> list[torch.Tensor]:
    """a (R, K) rows sorted by expert, b (E, K, N) any strides -> [a @ b_e] (R, N).

    With b2: [a @ b_e, a @ b2_e] (two outputs, one pass over a); with a2 and b2 and add=True: [a @ b_e + a2 @ b2_e].
    """
    _check(a, bounds)
    R, K = a.shape
    E, _, N = b.shape
    has2 = b2 is not None
    c = torch.empty(R, N, dtype=a.dtype, device=a.device)
    c2 = torch.empty(R, N, dtype=a.dtype, device=a.device) if has2 and not add else c
    a2 = a if a2 is None else a2
    if b2 is not None:
        assert b2.stride() == b.stride() and a2.stride() == a.stride()

    def grid(meta):
        return ((triton.cdiv(R, meta["BLOCK_M"]) + E) * triton.cdiv(N, meta["BLOCK_N"]),)

    _rows_kernel[grid](
        a, b, a2, b if b2 is None else b2, c, c2, bounds,
        R, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        E=E, HAS2=has2, SHARE_A=a2 is a, ADD2=add, IEEE=a.dtype == torch.float32, UPCAST=_INTERPRET,
        GROUP_M=GROUP_M,
    )
    return [c] if not has2 or add else [c, c2]


@gmm_rows.register_fake
def _(a, b, bounds, a2=None, b2=None, add=False):
    c = a.new_empty(a.shape[0], b.shape[2])
    return [c] if b2 is None or add else [c, torch.empty_like(c)]


@torch.library.custom_op("dbrx::triton_gmm_wgrad", mutates_args=())
def gmm_wgrad(
    a: torch.Tensor, b: torch.Tensor, bounds: torch.Tensor, a2: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """a (R, M), b (R, N) rows sorted by expert -> [a_e^T @ b_e] (E, M, N); with a2 also [a2_e^T @ b_e]."""
    _check(a, bounds)
    R, M = a.shape
    N = b.shape[1]
    E = bounds.shape[0] - 1
    c = torch.empty(E, M, N, dtype=a.dtype, device=a.device)
    c2 = torch.empty_like(c) if a2 is not None else c
    if a2 is not None:
        assert a2.stride() == a.stride()

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), E)

    _wgrad_kernel[grid](
        a, a if a2 is None else a2, b, c, c2, bounds,
        M, N,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1), c.stride(2),
        HAS2=a2 is not None, IEEE=a.dtype == torch.float32, UPCAST=_INTERPRET,
    )
    return [c] if a2 is None else [c, c2]


@gmm_wgrad.register_fake
def _(a, b, bounds, a2=None):
    c = a.new_empty(bounds.shape[0] - 1, a.shape[1], b.shape[1])
    return [c] if a2 is None else [c, torch.empty_like(c)]
