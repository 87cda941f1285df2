"""Attention over a paged KV cache, for a ragged batch of sequences (the serving engine's step).

Shape legend:
  N new tokens of all sequences, flattened; S sequences; H query heads, kvH KV heads, hd head dim;
  NB blocks in the pool, BS tokens per block; L a sequence's context (cached + new tokens).

The engine owns the memory: per layer a key and a value cache of shape (NB, BS, kvH, hd); token t of a sequence
lives in slot `block_table[t // BS] * BS + t % BS`. Each step the model writes the new tokens' keys and values at
`slot_mapping` and attends, for each sequence, from its new tokens (the last `query_len` positions of its context)
to its whole context, causally. `BACKENDS` maps a name to the attention function; `BACKEND` picks one (set from
outside, e.g. by the engine): `reference` (one SDPA per sequence), `padded` (one SDPA for the batch) and
`mixed` (the default: decodes padded together, prefill chunks one by one), all exact and on any device; a fused
paged kernel for CUDA is future work. Imports: torch only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PagedMetadata:
    """Where a step's tokens go and what each sequence sees. Host lists where the reference needs plain ints."""

    slot_mapping: torch.Tensor  # (N,) long: the cache slot each new token's K/V is written to
    block_tables: torch.Tensor  # (S, max_blocks) long: each sequence's blocks (padded with any valid block id)
    query_lens: list[int]  # S new-token counts, in the order of the flattened batch (sum = N)
    seq_lens: list[int]  # S context lengths after this step (cached + new)


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


def padded_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PagedMetadata,
                     gqa: bool) -> torch.Tensor:
    """The same as `reference_attention` in one SDPA call: sequences padded to the longest query and context.

    Q (S, H, maxq, hd), K/V gathered through the block tables (S, kvH, maxL, hd), a causal mask per sequence;
    keys past a sequence's context (other sequences' blocks, unwritten slots) are masked out."""
    S, BS = len(meta.query_lens), k_cache.shape[1]
    dev = q.device
    qlens = torch.tensor(meta.query_lens, device=dev)
    lens = torch.tensor(meta.seq_lens, device=dev)
    maxq, maxL = max(meta.query_lens), max(meta.seq_lens)
    tables = meta.block_tables[:, : -(-maxL // BS)]  # (S, nb)
    k = k_cache[tables].flatten(1, 2)[:, :maxL].transpose(1, 2).to(q.dtype)  # (S, kvH, maxL, hd)
    v = v_cache[tables].flatten(1, 2)[:, :maxL].transpose(1, 2).to(q.dtype)
    seq = torch.repeat_interleave(torch.arange(S, device=dev), qlens)  # (N,) each token's sequence
    off = torch.arange(q.shape[0], device=dev) - (torch.cumsum(qlens, 0) - qlens)[seq]  # (N,) its place in it
    qp = q.new_zeros(S, maxq, *q.shape[1:])  # (S, maxq, H, hd)
    qp[seq, off] = q
    qpos = (lens - qlens)[:, None] + torch.arange(maxq, device=dev)[None]  # (S, maxq) positions in the sequence
    allowed = torch.arange(maxL, device=dev)[None, None] <= qpos[:, :, None]  # (S, maxq, maxL)
    y = F.scaled_dot_product_attention(qp.transpose(1, 2), k, v, attn_mask=allowed[:, None], enable_gqa=gqa)
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
    rows = torch.tensor([starts[i] for i in decode], device=q.device)  # the decode tokens' rows in the batch
    sub = PagedMetadata(meta.slot_mapping[rows], meta.block_tables[decode], [1] * len(decode),
                        [meta.seq_lens[i] for i in decode])
    out[rows] = padded_attention(q[rows], k_cache, v_cache, sub, gqa)
    for i, n in enumerate(meta.query_lens):
        if n > 1:
            one = PagedMetadata(meta.slot_mapping[starts[i] : starts[i + 1]], meta.block_tables[i : i + 1], [n],
                                [meta.seq_lens[i]])
            out[starts[i] : starts[i + 1]] = reference_attention(q[starts[i] : starts[i + 1]], k_cache, v_cache,
                                                                 one, gqa)
    return out


BACKENDS = {"reference": reference_attention, "padded": padded_attention, "mixed": mixed_attention}
BACKEND = "mixed"  # decodes batched in one SDPA call, prefill chunks per sequence


def paged_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: PagedMetadata, gqa: bool) -> torch.Tensor:
    """Write the new k, v (N, kvH, hd) into the caches, then attend: q (N, H, hd) -> (N, H, hd)."""
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    return BACKENDS[BACKEND](q, k_cache, v_cache, meta, gqa)


__all__ = ["PagedMetadata", "write_kv", "reference_attention", "padded_attention", "paged_attend", "BACKENDS"]
