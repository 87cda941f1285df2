"""Attention over a paged KV cache, for a ragged batch of sequences (the serving engine's step).

Shape legend:
  N new tokens of all sequences, flattened; S sequences; H query heads, kvH KV heads, hd head dim;
  NB blocks in the pool, BS tokens per block; L a sequence's context (cached + new tokens).

The engine owns the memory: per layer a key and a value cache of shape (NB, BS, kvH, hd); token t of a sequence
lives in slot `block_table[t // BS] * BS + t % BS`. Each step the model writes the new tokens' keys and values at
`slot_mapping` and attends, for each sequence, from its new tokens (the last `query_len` positions of its context)
to its whole context, causally. `BACKENDS` maps a name to the attention function; the metadata's `backend`
picks one (the engine sets it; None: the module's `BACKEND`): `reference` (one SDPA per sequence), `padded` (one
SDPA for the batch) and `mixed` (decodes padded together, prefill chunks one by one), all exact and on any device,
and `triton` (one fused kernel for the whole ragged batch, reading K/V through the block tables:
dbrx.kernels.triton_paged_attention, CUDA or the Triton interpreter). `default_backend(device)` is the choice for
a device. Imports: torch (and, lazily, the
triton backend's module).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PagedMetadata:
    """Where a step's tokens go and what each sequence sees. Host lists where the reference needs plain ints."""

    slot_mapping: torch.Tensor  # (N,) long: the cache slot each new token's K/V is written to
    block_tables: torch.Tensor  # (S, max_blocks) long: each sequence's blocks (padded with any valid block id)
    query_lens: list[int]  # S new-token counts, in the order of the flattened batch (sum = N)
    seq_lens: list[int]  # S context lengths after this step (cached + new)
    # what a backend derives from the above on first use and reuses in every layer of the step (index tensors,
    # masks, the triton backend's tile map: one host-to-device copy per step, not per layer)
    derived: dict = field(default_factory=dict, repr=False, compare=False)
    backend: str | None = None  # a name in BACKENDS; None: BACKEND


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v (N, kvH, hd) into the caches (NB, BS, kvH, hd) at their slots."""
    NB, BS, kvH, hd = k_cache.shape
    k_cache.view(NB * BS, kvH, hd).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(NB * BS, kvH, hd).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def reference_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PagedMetadata,
                        gqa: bool) -> torch.Tensor:
    """q (N, H, hd) -> (N, H, hd): each sequence's new tokens attend to its gathered context, causally (SDPA)."""
    BS = k_cache.shape[1]
    out = torch.empty_like(q)
    start = 0
    for s, (n, L) in enumerate(zip(meta.query_lens, meta.seq_lens)):
        blocks = meta.block_tables[s, : -(-L // BS)]
        k = k_cache[blocks].flatten(0, 1)[:L]  # (L, kvH, hd)
        v = v_cache[blocks].flatten(0, 1)[:L]
        qs = q[start : start + n]  # (n, H, hd)
        pos = torch.arange(L - n, L, device=q.device)  # the new tokens' positions in the sequence
        allowed = torch.arange(L, device=q.device)[None, :] <= pos[:, None]  # (n, L)
        y = F.scaled_dot_product_attention(qs.transpose(0, 1)[None], k.transpose(0, 1)[None].to(q.dtype),
                                           v.transpose(0, 1)[None].to(q.dtype), attn_mask=allowed,
                                           enable_gqa=gqa)  # (1, H, n, hd)
        out[start : start + n] = y[0].transpose(0, 1)
        start += n
    return out


def _padded_layout(meta: PagedMetadata, BS: int, device: torch.device) -> tuple:
    """The index tensors and mask of `padded_attention`, built once per step (they are the same in every layer)."""
    key = ("padded", BS)
    if key not in meta.derived:
        S = len(meta.query_lens)
        qlens = torch.tensor(meta.query_lens, device=device)
        lens = torch.tensor(meta.seq_lens, device=device)
        maxq, maxL = max(meta.query_lens), max(meta.seq_lens)
        tables = meta.block_tables[:, : -(-maxL // BS)]  # (S, nb)
        if maxq == 1:  # decode rows only: token i is sequence i's one query
            seq = off = None
            allowed = torch.arange(maxL, device=device)[None, None] < lens[:, None, None]  # (S, 1, maxL)
        else:
            seq = torch.repeat_interleave(torch.arange(S, device=device), qlens)  # (N,) each token's sequence
            off = torch.arange(len(seq), device=device) - (torch.cumsum(qlens, 0) - qlens)[seq]  # (N,) its place
            qpos = (lens - qlens)[:, None] + torch.arange(maxq, device=device)[None]  # (S, maxq) positions
            allowed = torch.arange(maxL, device=device)[None, None] <= qpos[:, :, None]  # (S, maxq, maxL)
        meta.derived[key] = (tables, maxq, maxL, seq, off, allowed[:, None])  # mask (S, 1, maxq, maxL)
    return meta.derived[key]


def padded_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PagedMetadata,
                     gqa: bool) -> torch.Tensor:
    """The same as `reference_attention` in one SDPA call: sequences padded to the longest query and context.

    Q (S, H, maxq, hd), K/V gathered through the block tables (S, kvH, maxL, hd), a causal mask per sequence;
    keys past a sequence's context (other sequences' blocks, unwritten slots) are masked out."""
    S, BS = len(meta.query_lens), k_cache.shape[1]
    tables, maxq, maxL, seq, off, mask = _padded_layout(meta, BS, q.device)
    k = k_cache[tables].flatten(1, 2)[:, :maxL].transpose(1, 2).to(q.dtype)  # (S, kvH, maxL, hd)
    v = v_cache[tables].flatten(1, 2)[:, :maxL].transpose(1, 2).to(q.dtype)
    if seq is None:  # decode rows: (N = S, H, hd) -> (S, H, 1, hd)
        y = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, enable_gqa=gqa)
        return y[:, :, 0]  # (S, H, hd)
    qp = q.new_zeros(S, maxq, *q.shape[1:])  # (S, maxq, H, hd)
    qp[seq, off] = q
    y = F.scaled_dot_product_attention(qp.transpose(1, 2), k, v, attn_mask=mask, enable_gqa=gqa)
    return y.transpose(1, 2)[seq, off]  # (N, H, hd)


def mixed_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PagedMetadata,
                    gqa: bool) -> torch.Tensor:
    """Decode rows (one new token) in one padded SDPA call, prefill chunks one sequence at a time: padding a
    512-token chunk's queries to every decode row would cost more than it saves."""
    decode = [i for i, n in enumerate(meta.query_lens) if n == 1]
    if len(decode) == len(meta.query_lens):
        return padded_attention(q, k_cache, v_cache, meta, gqa)
    if len(decode) < 2:
        return reference_attention(q, k_cache, v_cache, meta, gqa)
    starts = [0]
    for n in meta.query_lens:
        starts.append(starts[-1] + n)
    out = torch.empty_like(q)
    if "mixed" not in meta.derived:  # the decode rows' own metadata, built once per step
        rows = torch.tensor([starts[i] for i in decode], device=q.device)  # the decode tokens' rows in the batch
        meta.derived["mixed"] = rows, PagedMetadata(meta.slot_mapping[rows], meta.block_tables[decode],
                                                    [1] * len(decode), [meta.seq_lens[i] for i in decode])
    rows, sub = meta.derived["mixed"]
    out[rows] = padded_attention(q[rows], k_cache, v_cache, sub, gqa)
    for i, n in enumerate(meta.query_lens):
        if n > 1:
            one = PagedMetadata(meta.slot_mapping[starts[i] : starts[i + 1]], meta.block_tables[i : i + 1], [n],
                                [meta.seq_lens[i]])
            out[starts[i] : starts[i + 1]] = reference_attention(q[starts[i] : starts[i + 1]], k_cache, v_cache,
                                                                 one, gqa)
    return out


def triton_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PagedMetadata,
                     gqa: bool) -> torch.Tensor:
    """The same in one Triton kernel launch (dbrx.kernels.triton_paged_attention, imported on first use so that
    torch-only machines never import triton)."""
    from .triton_paged_attention import paged_attention

    return paged_attention(q, k_cache, v_cache, meta, gqa)


BACKENDS = {"reference": reference_attention, "padded": padded_attention, "mixed": mixed_attention,
            "triton": triton_attention}
BACKEND = "mixed"  # decodes batched in one SDPA call, prefill chunks per sequence


def default_backend(device: torch.device | str) -> str:
    """The backend for caches on `device`: "triton" on CUDA when triton is installed, else "mixed"."""
    if torch.device(device).type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "mixed"


def paged_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: PagedMetadata, gqa: bool) -> torch.Tensor:
    """Write the new k, v (N, kvH, hd) into the caches, then attend: q (N, H, hd) -> (N, H, hd)."""
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    return BACKENDS[meta.backend or BACKEND](q, k_cache, v_cache, meta, gqa)


__all__ = ["PagedMetadata", "write_kv", "reference_attention", "padded_attention", "triton_attention", "paged_attend",
           "BACKENDS", "default_backend"]
