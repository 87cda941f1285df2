"""Load any checkpoint `dbrx` writes, float or quantized, as the verbs, the evaluation harness and Python callers
want it: the device checked before anything is read, eval mode, the default dtype by device.

Imports: dbrx.devices, dbrx.hf_checkpoint, dbrx.kernels, dbrx.model, dbrx.quant, dbrx.lora (adapters).
"""

from __future__ import annotations

import os

import torch

from .devices import parse_dtype, resolve_device
from .hf_checkpoint import quantization_config
from .kernels.cpu_matvec import use_matvec_linears
from .model import DbrxForCausalLM


def load_pretrained(path: str | os.PathLike, device: str | torch.device | None = None,
                    dtype: str | torch.dtype | None = None, allow_nonfinite: bool = False,
                    adapter: str | os.PathLike | None = None) -> torch.nn.Module:
    """A checkpoint directory -> the model in eval mode.

    Float checkpoints: device default cuda when available, dtype default bf16 on GPU and fp32 on the CPU.
    Quantized checkpoints (`quantization_config` in config.json, written by `dbrx quantize`): the CPU kernels of
    dbrx.quant, device default cpu, activations in `dtype` (default fp32).
    On the CPU an fp32 LM head is stored column-major (`column_major_head`: same values, same parameter shape),
    the faster layout for the few rows a decoding step multiplies, and the fp32 Linear layers become
    dbrx.kernels.cpu_matvec.MatvecLinear (same parameters; few rows split over every thread at inference).
    adapter: a PEFT-format LoRA adapter directory (as `dbrx finetune` with `lora.*` writes it, or PEFT for
    transformers' DbrxForCausalLM), applied unmerged on top of the base, float or quantized. It is read and checked
    against the base's config before the base is loaded; its factors take the base's dtype (on a quantized base:
    its activation dtype for attention and router, fp32 for the experts, whose GLU runs in fp32)."""
    factors = None
    if adapter is not None and os.path.isfile(os.path.join(path, "config.json")):
        factors = _read_adapter(path, adapter)  # a bad adapter fails before the (large) base is read
    if quantization_config(path) is not None:
        from .quant import load_quantized

        model = load_quantized(path, dtype=parse_dtype(dtype), device=device or "cpu",
                               allow_nonfinite=allow_nonfinite)
    else:
        dev = resolve_device(device)
        torch_dtype = parse_dtype(dtype) or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
        model = DbrxForCausalLM.from_pretrained(path, dtype=torch_dtype, device=dev, allow_nonfinite=allow_nonfinite)
        cpu_decoding_layout(model)
    if adapter is not None:
        from .lora.peft_format import attach_factors

        attach_factors(model, factors if factors is not None else _read_adapter(path, adapter, model.config))
    return model.eval()


def cpu_decoding_layout(model) -> dict:
    """What load_pretrained does to a float model on the CPU, for callers that build theirs (benchmarks): the fp32
    LM head column-major (`column_major_head`) and the Linear layers dbrx.kernels.cpu_matvec.MatvecLinear. Nothing
    off the CPU. Returns {"head_layout": "column-major" | "as loaded", "matvec_linears": how many}."""
    on_cpu = model.transformer.norm_f.weight.device.type == "cpu"
    return {"head_layout": "column-major" if column_major_head(model) else "as loaded",
            "matvec_linears": use_matvec_linears(model) if on_cpu else 0}


def _read_adapter(path, adapter, cfg=None):
    from .config import DbrxConfig
    from .lora.peft_format import read_peft

    return read_peft(adapter, cfg or DbrxConfig.load(os.path.join(path, "config.json")))


__all__ = ["load_pretrained", "column_major_head", "cpu_decoding_layout"]


def column_major_head(model) -> bool:
    """Store an fp32 LM head column-major on the CPU: the same (V, D) parameter (values, shape, name), its storage
    the contiguous (D, V) transpose, so that a head matmul of few rows streams V-long rows instead of V dot products
    of length D. Measured (2-core AMD EPYC, V 100352, median of 10, 1 / 2 threads): 1 row 2.97x / 3.09x faster at
    d_model 64, 1.27x / 1.31x at 1024; 32 rows 1.12x / 1.10x and 1.26x / 1.16x; 256 rows 0.97x / 1.06x and 1.03x /
    0.91x (BENCHMARKS.md, issue 11). The same layout is slower for some smaller fp32 matrices and 5-14x slower in
    bf16, so only an fp32 head gets it. Returns False, changing nothing, for another dtype, a quantized head or off
    the CPU. Saving is unaffected (save_pretrained writes contiguous copies)."""
    w = getattr(model.lm_head, "weight", None)
    if not isinstance(w, torch.nn.Parameter) or w.device.type != "cpu" or w.dtype != torch.float32:
        return False
    model.lm_head.weight = torch.nn.Parameter(w.detach().t().contiguous().t(), requires_grad=w.requires_grad)
    return True
