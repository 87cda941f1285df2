"""Per-block torch.compile, applied to a built model from outside (the model file never learns about it).

Each transformer block is compiled on its own: the blocks are identical, so one compilation serves all layers
(dynamo re-uses the code for each block instance), compile time stays that of one block, and the MoE has no host
sync, so `fullgraph=True` holds. Activation checkpointing, applied before (`activation_checkpoint.py`), replaced
each block's forward by a checkpointed one, which is what gets compiled: dynamo traces the checkpoint and, for
'selective', its save/recompute policy, so the compiled backward recomputes only what the policy allows.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.experts import fast_grouped_mm_gpu


def compile_blocks(model: nn.Module, fullgraph: bool = True, mode: str | None = None, dynamic: bool | None = False,
                   backend: str = "inductor") -> nn.Module:
    """Compile every block of `model.transformer.blocks` in place; returns the model (state dict keys unchanged).

    Call after `apply_activation_checkpointing(model, ...)`: the checkpointed forwards are compiled.
    """
    blocks = getattr(getattr(model, "transformer", None), "blocks", None)
    if blocks is None:
        raise ValueError("compile_blocks needs a DbrxForCausalLM-like model with `transformer.blocks`")
    device = next(model.parameters()).device
    if device.type == "cuda":  # the device query made now, in eager, so that compiled code only reads its cache
        fast_grouped_mm_gpu(device)
    for block in blocks:
        block.forward = torch.compile(block.forward, fullgraph=fullgraph, mode=mode, dynamic=dynamic, backend=backend)
        block._compiled = True
    return model
