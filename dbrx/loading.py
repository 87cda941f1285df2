"""Load any checkpoint `dbrx` writes, float or quantized, as the verbs, the evaluation harness and Python callers
want it: the device checked before anything is read, eval mode, the default dtype by device.

Imports: dbrx.devices, dbrx.hf_checkpoint, dbrx.model, dbrx.quant.
"""

from __future__ import annotations

import os

import torch

from .devices import parse_dtype, resolve_device
from .hf_checkpoint import quantization_config
from .model import DbrxForCausalLM


def load_pretrained(path: str | os.PathLike, device: str | torch.device | None = None,
                    dtype: str | torch.dtype | None = None, allow_nonfinite: bool = False) -> torch.nn.Module:
    """A checkpoint directory -> the model in eval mode.

    Float checkpoints: device default cuda when available, dtype default bf16 on GPU and fp32 on the CPU.
    Quantized checkpoints (`quantization_config` in config.json, written by `dbrx quantize`): the CPU kernels of
    dbrx.quant, device default cpu, activations in `dtype` (default fp32)."""
    if quantization_config(path) is not None:
        from .quant import load_quantized

        return load_quantized(path, dtype=parse_dtype(dtype), device=device or "cpu",
                              allow_nonfinite=allow_nonfinite).eval()
    dev = resolve_device(device)
    torch_dtype = parse_dtype(dtype) or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    return DbrxForCausalLM.from_pretrained(path, dtype=torch_dtype, device=dev,
                                           allow_nonfinite=allow_nonfinite).eval()


__all__ = ["load_pretrained"]
