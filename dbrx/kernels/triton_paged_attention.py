"""A Triton kernel for attention over the paged KV cache: one launch for a ragged batch of prefill chunks and decodes.

Shape legend (as in dbrx.kernels.paged_attention):
  N new tokens of all sequences, flattened in sequence order; S sequences; H query heads, kvH KV heads,
  G = H // kvH query heads per KV head, hd head dim; NB blocks in the pool, BS tokens per block;
  L a sequence's context (cached + new tokens), n its new tokens (the last n of its L positions).

Work split: a sequence's n new tokens times its G query heads sharing one KV head form n*G rows (token-major:
row r is token r // G, head r % G of the group), cut into tiles of BLOCK_M rows. One program per (tile, KV head)
loads its KV head once for the whole group (GQA without repeating K/V), walks the sequence's keys BLOCK_N at a time
through the block table (any BS: each key's slot is looked up, so a key tile may span blocks), applies the causal
mask (key j is seen by the row at position p iff j <= p, p = L - n + token) and keeps an online softmax in fp32. The
grid is exactly the tiles of the batch: a tile map (tile -> sequence, tile index in it) is built on the host from
the metadata's lists, once per step for all layers (cached in `PagedMetadata.derived`), with one host-to-device copy.

Caches may be fp32, bf16 or fp16 (loaded and cast to q's dtype, as the reference does); products accumulate in
fp32, and fp32 inputs multiply in IEEE fp32 (no TF32). On the CPU the kernel runs under the Triton interpreter
(`TRITON_INTERPRET=1`, set before triton is imported). Imports: torch, triton (optional: without it this module
imports and `paged_attention` raises).
"""

from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a torch-only machine: importable, not runnable
    triton = tl = None

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# (BLOCK_M query rows, BLOCK_N keys, num_warps, num_stages). The interpreter is slow: one small tile there. On a GPU
# the decode tile fits a group of decode rows (DBRX: 6 heads of one token) in the smallest tensor-core tile; the
# prefill tile is a Hopper warpgroup's 64 rows.
DECODE_TILE = (16, 16, 1, 1) if _INTERPRET else (16, 64, 4, 3)
PREFILL_TILE = (16, 16, 1, 1) if _INTERPRET else (64, 64, 4, 3)


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


@_jit
def _dot(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # the interpreter's bf16 dot is wrong (triton 3.9): multiply in fp32 there
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@_jit
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, tables_ptr, q_start_ptr, seq_len_ptr, tile_seq_ptr, tile_idx_ptr,
    scale,
    s_qn, s_qh, s_on, s_oh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_ts,
    HD: tl.constexpr, G: tl.constexpr, BS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = tl.load(tile_seq_ptr + tile)
    q0 = tl.load(q_start_ptr + seq)  # the sequence's first row in the flattened batch
    n = tl.load(q_start_ptr + seq + 1) - q0
    L = tl.load(seq_len_ptr + seq)
    row0 = tl.load(tile_idx_ptr + tile) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)  # (BLOCK_M,) rows of this sequence
    tok = rows // G  # (BLOCK_M,) new token of the sequence
    head = (kvh * G + rows % G).to(tl.int64)  # (BLOCK_M,) query head
    row_ok = tok < n
    pos = L - n + tok  # (BLOCK_M,) position in the sequence (rows past n get positions >= L: computed, not stored)
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < HD
    q_off = (q0 + tok).to(tl.int64)[:, None] * s_qn + head[:, None] * s_qh + ds[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    m_i = tl.full((BLOCK_M,), -1e30, dtype=tl.float32)  # running max of the scaled scores (log2 units)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    # keys 0 .. kv_end-1 are all that any row of the tile sees (the last row's position, at most L - 1)
    kv_end = tl.minimum(L, L - n + (row0 + BLOCK_M - 1) // G + 1)
    table = tables_ptr + seq.to(tl.int64) * s_ts
    for j0 in range(0, kv_end, BLOCK_N):
        js = j0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,) key positions
        j_ok = js < kv_end
        block = tl.load(table + js // BS, mask=j_ok, other=0).to(tl.int64)  # (BLOCK_N,) their blocks in the pool
        k_off = block * s_kb + (js % BS) * s_kt + kvh * s_kh  # (BLOCK_N,)
        kt = tl.load(k_ptr + k_off[None, :] + ds[:, None], mask=j_ok[None, :] & d_ok[:, None], other=0.0)  # K^T (D, N)
        qk = _dot(q, kt.to(q.dtype), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), IEEE, UPCAST) * scale
        allowed = (js[None, :] <= pos[:, None]) & j_ok[None, :]  # (BLOCK_M, BLOCK_N) causal, within the context
        qk = tl.where(allowed, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))  # finite: m_i starts finite
        alpha = tl.exp2(m_i - m_new)  # (BLOCK_M,) rescales what was summed so far
        p = tl.exp2(qk - m_new[:, None])  # (BLOCK_M, BLOCK_N), 0 where masked
        l_i = l_i * alpha + tl.sum(p, 1)
        v_off = block * s_vb + (js % BS) * s_vt + kvh * s_vh  # (BLOCK_N,)
        v = tl.load(v_ptr + v_off[:, None] + ds[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)  # (N, D)
        acc = _dot(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], IEEE, UPCAST)  # (BLOCK_M, BLOCK_D)
        m_i = m_new
    out = acc / l_i[:, None]  # every stored row saw key 0, so l_i > 0 there
    o_off = (q0 + tok).to(tl.int64)[:, None] * s_on + head[:, None] * s_oh + ds[None, :]
    tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _tile_map(meta, G: int, block_m: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(q_start (S+1,), seq_len (S,), tile_seq (T,), tile_idx (T,)) int32 on `device`, built on the host from the
    metadata's lists in one copy and cached in `meta.derived` for the other layers of the step."""
    key = ("triton_tiles", G, block_m, str(device))
    if key not in meta.derived:
        starts, tile_seq, tile_idx = [0], [], []
        for s, n in enumerate(meta.query_lens):
            starts.append(starts[-1] + n)
            tiles = -(-n * G // block_m)
            tile_seq += [s] * tiles
            tile_idx += range(tiles)
        S, T = len(meta.seq_lens), len(tile_seq)
        host = torch.tensor(starts + list(meta.seq_lens) + tile_seq + tile_idx, dtype=torch.int32,
                            pin_memory=device.type == "cuda")
        flat = host.to(device, non_blocking=True)
        meta.derived[key] = (flat[: S + 1], flat[S + 1 : 2 * S + 1], flat[2 * S + 1 : 2 * S + 1 + T],
                           flat[2 * S + 1 + T :])
    return meta.derived[key]


def _validate(q, k_cache, v_cache, meta, gqa) -> int:
    """ValueError for inputs the kernel cannot take; returns G, the query heads per KV head."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"want q (N, H, hd) and caches (NB, BS, kvH, hd); got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    (N, H, hd), kvH = q.shape, k_cache.shape[2]
    if k_cache.shape[3] != hd or H % kvH or (not gqa and H != kvH):
        raise ValueError(f"q (N, H={H}, hd={hd}) does not fit caches with kvH={kvH}, hd={k_cache.shape[3]} "
                         f"(gqa={gqa})")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the KV caches need a unit stride along the head dim")
    S = len(meta.query_lens)
    if len(meta.seq_lens) != S or meta.block_tables.shape[0] != S or sum(meta.query_lens) != N:
        raise ValueError(f"metadata for {S} sequences, {sum(meta.query_lens)} tokens does not fit "
                         f"{len(meta.seq_lens)} seq_lens, {meta.block_tables.shape[0]} block tables, {N} queries")
    cap = meta.block_tables.shape[1] * k_cache.shape[1]
    if any(n < 0 or n > L or L > cap for n, L in zip(meta.query_lens, meta.seq_lens)):
        raise ValueError(f"need 0 <= query_len <= seq_len <= {cap} (block table width x BS) for every sequence")
    return H // kvH


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta,
                    gqa: bool) -> torch.Tensor:
    """q (N, H, hd), caches (NB, BS, kvH, hd) -> (N, H, hd) in q's dtype: the same as
    `paged_attention.reference_attention`, in one kernel launch."""
    if triton is None:
        raise ValueError("the 'triton' attention backend needs triton installed")
    if q.device.type != "cuda" and not (q.device.type == "cpu" and _INTERPRET):
        raise ValueError("the 'triton' attention backend needs a CUDA device (or TRITON_INTERPRET=1 on the CPU)")
    G = _validate(q, k_cache, v_cache, meta, gqa)
    N, H, hd = q.shape
    out = torch.empty(N, H, hd, dtype=q.dtype, device=q.device)
    if N == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    block_m, block_n, warps, stages = DECODE_TILE if max(meta.query_lens) * G <= DECODE_TILE[0] else PREFILL_TILE
    q_start, seq_len, tile_seq, tile_idx = _tile_map(meta, G, block_m, q.device)
    tables = meta.block_tables if meta.block_tables.stride(1) == 1 else meta.block_tables.contiguous()
    grid = (tile_seq.shape[0], k_cache.shape[2])  # (tiles, kvH)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, tables, q_start, seq_len, tile_seq, tile_idx,
        math.log2(math.e) / math.sqrt(hd),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), tables.stride(0),
        HD=hd, G=G, BS=k_cache.shape[1], IEEE=q.dtype == torch.float32, UPCAST=_INTERPRET,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(hd)),
        num_warps=warps, num_stages=stages,
    )
    return out


__all__ = ["paged_attention"]
