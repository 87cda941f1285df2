"""Selective activation checkpointing of a block: cheap recomputation where memory is large.

Full checkpointing keeps only each block's input and recomputes the whole block in backward (least memory,
about a third more compute). The selective variant splits a block in its two halves:
- attention: saves the outputs of the expensive ops (matmuls, SDPA attention) and recomputes only element-wise
  work (norms, rope, clamps, residual adds);
- MoE: keeps its input and routing but none of the experts' (routed rows, ffn) activations, the bulk of an MoE
  block's memory; backward runs the gate and up grouped GEMMs again (2 of the experts' 9 per step).
"""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

_SAVED_OPS = ("mm", "bmm", "addmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
              "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
_SAVE = {getattr(torch.ops.aten, name).default for name in _SAVED_OPS if hasattr(torch.ops.aten, name)}


def _policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def selective_checkpoint(block, x, cos, sin, mask, token_mask=None, cache_pos=None):
    """One block (`attend`, then `moe`) under selective checkpointing; returns what `block.forward` returns."""
    h, normed = checkpoint(block.attend, x, cos, sin, mask, cache_pos, use_reentrant=False,
                           context_fn=partial(create_selective_checkpoint_contexts, _policy))
    return block.moe(h, normed, token_mask, recompute=True)
