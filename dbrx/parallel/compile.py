"""Per-block torch.compile, applied to a built model from outside (the model file never learns about it).

Each transformer block is compiled on its own: the blocks are identical, so one compilation serves all layers
(dynamo re-uses the code for each block instance), compile time stays that of one block, and the MoE has no host
sync, so `fullgraph=True` holds. When the model has activation checkpointing on ('full' or 'selective'), the
checkpoint is moved *inside* the compiled region (as torchtitan orders it): dynamo traces the checkpoint and,
for 'selective', its save/recompute policy, so the compiled backward recomputes only what the policy allows.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..kernels.experts import fast_grouped_mm_gpu
from .checkpointing import selective_checkpoint


def _checkpointed_forward(block, forward, mode: str, *args):
    if not torch.is_grad_enabled():
        return forward(*args)
    if mode == "selective":
        return selective_checkpoint(block, *args)
    return checkpoint(forward, *args, use_reentrant=False)


def compile_blocks(model: nn.Module, fullgraph: bool = True, mode: str | None = None, dynamic: bool | None = False,
                   backend: str = "inductor") -> nn.Module:
    """Compile every block of `model.transformer.blocks` in place; returns the model (state dict keys unchanged).

    Call after `model.set_activation_checkpointing(...)`: a 'full' or 'selective' setting is taken over by the
    compiled blocks (the model's own setting becomes 'none' and `model.compiled_checkpointing` records it).
    """
    blocks = getattr(getattr(model, "transformer", None), "blocks", None)
    if blocks is None:
        raise ValueError("compile_blocks needs a DbrxForCausalLM-like model with `transformer.blocks`")
    ckpt = getattr(model, "activation_checkpointing", "none")
    device = next(model.parameters()).device
    if device.type == "cuda":  # the device query made now, in eager, so that compiled code only reads its cache
        fast_grouped_mm_gpu(device)
    for block in blocks:
        forward = block.forward
        if ckpt != "none":
            forward = partial(_checkpointed_forward, block, forward, ckpt)
        block.forward = torch.compile(forward, fullgraph=fullgraph, mode=mode, dynamic=dynamic, backend=backend)
    if ckpt != "none":
        model.activation_checkpointing = "none"
        model.compiled_checkpointing = ckpt
    return model
