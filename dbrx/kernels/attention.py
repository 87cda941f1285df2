"""Per-document causal attention without a T x T mask: flex_attention with a block mask built from doc ids.

The boolean (B, 1, T, T) mask of `dbrx.model.build_attention_mask` costs B * T^2 bytes (1 GiB per sequence at
32K context) and forces SDPA off its flash kernels. On CUDA, packed sequences instead go through
`torch.nn.attention.flex_attention`, whose block mask stores one entry per 128 x 128 tile and skips the tiles
that cross documents. Semantics match the SDPA mask path: causal, within a document, padding keys hidden, and a
query always sees itself.
"""

from __future__ import annotations

import torch

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # torch without flex_attention: the SDPA mask path is used everywhere
    BlockMask = create_block_mask = flex_attention = None

FLEX_ON_CPU = False  # tests set this: on the CPU flex_attention runs an eager reference that materialises scores
_compiled_flex = None
_compiled_create_block_mask = None


def use_flex(doc_ids: torch.Tensor | None, cache_pos: torch.Tensor | None) -> bool:
    """Whether a forward with these inputs should use flex_attention (packed training/prefill on CUDA)."""
    if flex_attention is None or doc_ids is None or cache_pos is not None:
        return False
    return doc_ids.device.type == "cuda" or FLEX_ON_CPU


def doc_block_mask(doc_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """doc_ids (B, T), attention_mask (B, T) 1 = real token -> a BlockMask for causal per-document attention."""
    B, T = doc_ids.shape
    valid = None if attention_mask is None else attention_mask.bool()

    def mask_mod(b, h, q, k):
        allowed = (k <= q) & (doc_ids[b, q] == doc_ids[b, k])
        if valid is not None:
            allowed = allowed & valid[b, k]
        return allowed | (q == k)  # never an empty row

    if doc_ids.device.type != "cuda":
        return create_block_mask(mask_mod, B, None, T, T, device=doc_ids.device)
    # Compiled, the mask is evaluated tile by tile instead of as a dense (B, 1, T, T) tensor (1 GiB per sequence
    # at 32K). One compiled function for all calls (the `_compile=True` flag is deprecated in newer torch).
    global _compiled_create_block_mask
    if _compiled_create_block_mask is None:
        _compiled_create_block_mask = torch.compile(create_block_mask)
    return _compiled_create_block_mask(mask_mod, B, None, T, T, device=doc_ids.device)


def is_block_mask(mask) -> bool:
    return BlockMask is not None and isinstance(mask, BlockMask)


def flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, enable_gqa: bool) -> torch.Tensor:
    """q (B, H, T, hd), k/v (B, kvH, T, hd) -> (B, H, T, hd); compiled on CUDA (eager flex is a slow reference)."""
    global _compiled_flex
    fn = flex_attention
    if q.device.type == "cuda" and not torch.compiler.is_compiling():  # inside a compiled block: traced as is
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention)
        fn = _compiled_flex
    return fn(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
