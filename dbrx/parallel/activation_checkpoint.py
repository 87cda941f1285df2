"""Activation checkpointing of the transformer blocks, applied to a built model from outside.

Modes (`MODES`, the one list of them):
- ``none``: every activation is kept for backward.
- ``full``: each block keeps only its input and is recomputed whole in backward (least memory, about a third more
  compute).
- ``selective``: a block is split in its two halves.
  - attention: saves the outputs of the expensive ops (matmuls, SDPA attention) and recomputes only element-wise
    work (norms, rope, clamps, residual adds);
  - MoE: keeps its input and routing but none of the experts' (routed rows, ffn) activations, the bulk of an MoE
    block's memory; backward runs the gate and up grouped GEMMs again (2 of the experts' 9 per step).

`apply_activation_checkpointing(model, mode)` replaces each block's `forward` by a checkpointed one (state dict
keys unchanged); `dbrx.parallel.compile.compile_blocks` then compiles that forward, so the checkpoint sits inside
the compiled region (torchtitan's order: checkpointing, then compile, then FSDP). Without autograd (inference)
the blocks run plainly. May import torch only.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "full", "selective")

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


def _checkpointed_forward(block, forward, mode: str, *args):
    if not torch.is_grad_enabled():
        return forward(*args)
    if mode == "selective":
        return selective_checkpoint(block, *args)
    return checkpoint(forward, *args, use_reentrant=False)


def check_mode(mode: str | bool) -> str:
    """`mode` as one of MODES (True -> 'full', False -> 'none'); ValueError listing the modes otherwise."""
    mode = {True: "full", False: "none"}.get(mode, mode) if isinstance(mode, bool) else mode
    if mode not in MODES:
        raise ValueError(f"activation checkpointing must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def apply_activation_checkpointing(model: nn.Module, mode: str | bool) -> nn.Module:
    """Checkpoint every block of `model.transformer.blocks` in `mode` (in place; returns the model).

    Apply before `compile_blocks` and FSDP. Applying again replaces the earlier mode ('none' restores the plain
    forwards).
    """
    mode = check_mode(mode)
    blocks = getattr(getattr(model, "transformer", None), "blocks", None)
    if blocks is None:
        raise ValueError("activation checkpointing needs a DbrxForCausalLM-like model with `transformer.blocks`")
    for block in blocks:
        if getattr(block, "_compiled", False):
            raise ValueError("apply activation checkpointing before compile_blocks, not after")
        block.__dict__.pop("forward", None)  # the class's plain forward again
        if mode != "none":
            block.forward = partial(_checkpointed_forward, block, block.forward, mode)
    model.activation_checkpointing = mode
    return model
