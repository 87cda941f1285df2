"""Devices and dtypes: the one home of the device and dtype names users type, and of GPU peak FLOP/s.

Imports: torch only.
"""

from __future__ import annotations

import torch

# Dense bf16 peak FLOP/s (tensor cores, no sparsity; vendor datasheets, SXM unless named). The longest name found
# in the device name wins: "H100 PCIe" before "H100", "GH200" before "H200", "L40S" before "L4".
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "H800": 989e12, "B200": 2250e12,
    "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12,
}

_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """None, a torch.dtype, or a name such as 'bf16' / 'float32' -> torch.dtype | None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of bf16, fp16, fp32")
    return _DTYPES[key]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(name: str | torch.device | None) -> torch.device:
    """A device name as users type it ('cpu', 'cuda', 'cuda:1'; None: cuda when available) -> a usable device.

    ValueError, naming the problem, for an unknown name, CUDA without a GPU, or a GPU index that does not exist.
    """
    if name is None:
        name = default_device()
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: CUDA is not available here (no GPU, or a CPU-only torch); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {name!r}: MPS is not available here; use cpu")
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {name!r}; use cpu, cuda or cuda:N")
    return dev


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak FLOP/s, or None (CPU, or a GPU not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


__all__ = ["PEAK_BF16_FLOPS", "parse_dtype", "default_device", "resolve_device", "peak_flops"]
