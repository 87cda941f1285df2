"""Selective activation checkpointing: keep the matmul and attention outputs, recompute the cheap rest.

Full checkpointing keeps only each block's input and recomputes the whole block in backward (least memory,
about a third more compute). The selective policy saves the outputs of the expensive ops (matmuls, grouped
expert matmuls including the Triton ones, SDPA attention) and recomputes only element-wise work (norms, rope,
SiLU, clamps, routing math).
"""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

_aten = torch.ops.aten
_SAVE = {
    _aten.mm.default,
    _aten.bmm.default,
    _aten.addmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
}
if hasattr(_aten, "_grouped_mm"):
    _SAVE.add(_aten._grouped_mm.default)


def _policy(ctx, op, *args, **kwargs):
    # ops in the "dbrx" namespace are the Triton grouped GEMMs (dbrx.kernels.triton_grouped_gemm)
    if op in _SAVE or getattr(op, "namespace", None) == "dbrx":
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def selective_checkpoint(fn, *args):
    """Run `fn(*args)` under activation checkpointing that saves matmul/attention outputs."""
    return checkpoint(fn, *args, use_reentrant=False, context_fn=partial(create_selective_checkpoint_contexts, _policy))
