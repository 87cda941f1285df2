"""Our CPU kernels for products with few rows (decoding), compiled from `cpu/matvec.cpp` on first use.

torch's CPU kernels (MKL) for an (M, K) @ (K, N) product with few rows M run on one core and reach a third of the
core's peak at 4-32 rows, and its weight-only int8/int4 kernels read the weights at 3-12 GB/s. These split the N
outputs over torch's intra-op threads; for int8 and int4 weights they write each block of 32 activations as two int8
codes per element (x ~ d (254 hi + lo), about 15 bits) and take integer dot products (AVX2 maddubs), fp32 sums:

  q8_linear(x, q, scale)              int8 q (N, K), scale (N,) bf16 (dbrx.quant.formats, per output row)
  q4_linear(x, q, scale, zero, G)     the int4 checkpoint layout: q uint8 (N, K/2), scale and zero (N, K/G) bf16
  f32_rows(x, w)                      fp32 w (N, K) with contiguous rows: AVX2 dot products, rows over threads
  f32_linear(x, wt)                   fp32 wt (K, N), any strides; torch's own matmul on each thread's columns

Each returns fp32 (M, N). Under torch.compile they are custom ops (dbrx::...), opaque to the graph. They need an
x86-64 CPU with AVX2 and FMA, a C++ compiler and ninja (torch's extension builder; the first build takes about a
minute and is cached); `kernels()` is None where any is missing or the build fails, and callers keep torch's
kernels. DBRX_CPU_KERNELS=0 turns them off. Imports torch only.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

_SRC = Path(__file__).with_name("cpu") / "matvec.cpp"
_NAME = "dbrx_cpu_matvec"  # torch's extension cache (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions)
BLOCK = 32  # activations per int8 block: the input dim must be a multiple of it
# Narrower inputs stay on torch's kernels: at K = 64 (the demo's d_model) ours were 1.1-1.4x slower on the
# 100352-row head, at K >= 1024 1.2-2.8x faster, at every M from 1 to 256 (BENCHMARKS.md, issue 11).
MIN_QUANT_IN_FEATURES = 256
MAX_F32_ROWS = 32  # fp32: up to this many rows (torch's own above)
MIN_F32_OUT = 256  # fp32: at least this many outputs (the router's 16 are not worth a parallel region)


def _cpu_has_avx2() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    return "avx2" in flags and "fma" in flags


@functools.cache
def kernels():
    """The compiled extension, or None where it cannot be built here (then torch's kernels are used)."""
    if os.environ.get("DBRX_CPU_KERNELS", "1") == "0" or not _cpu_has_avx2():
        return None
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        if not any(Path(_get_build_directory(_NAME, False)).glob("*.so")):
            print("dbrx: building the CPU kernels (once; about a minute on 2 cores) ...", file=sys.stderr, flush=True)
        return load(name=_NAME, sources=[str(_SRC)],
                    extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as e:  # no compiler, no ninja, a read-only cache ...
        warnings.warn(f"dbrx's CPU kernels could not be built ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                      f"using torch's kernels", stacklevel=2)
        return None


def quant_fits(in_features: int) -> bool:
    """Whether a quantized matrix with this input dim runs on our kernels on the CPU."""
    return in_features % BLOCK == 0 and in_features >= MIN_QUANT_IN_FEATURES and kernels() is not None


_FLAGS = {"available": False, "threaded": False}  # set by each eager call, read as constants under torch.compile
# (a decorator such as torch.compiler.assume_constant_result would import torch._dynamo, and Triton, at import)


def _available() -> bool:
    if not torch.compiler.is_compiling():
        _FLAGS["available"] = kernels() is not None
    return _FLAGS["available"]


def _threaded() -> bool:
    if not torch.compiler.is_compiling():
        _FLAGS["threaded"] = torch.get_num_threads() > 1
    return _FLAGS["threaded"]


def _f32_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (x.dtype == torch.float32 and w.dtype == torch.float32 and x.device.type == "cpu"
            and w.device.type == "cpu" and x.dim() == 2 and x.shape[0] <= MAX_F32_ROWS and w.shape[-1] >= MIN_F32_OUT
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)) and _available())


# ---- the ops: the extension's functions directly in eager mode (no dispatcher cost), custom ops under compile and
# on fake or meta tensors (dbrx.memory's estimates trace a step on them)
def _traced(x: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() or x.is_meta or isinstance(x, FakeTensor)


@torch.library.custom_op("dbrx::q8_linear", mutates_args=())
def _q8_op(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return kernels().q8_linear(x, q, scale)


@torch.library.custom_op("dbrx::q4_linear", mutates_args=())
def _q4_op(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    return kernels().q4_linear(x, q, scale, zero, group)


@torch.library.custom_op("dbrx::f32_linear", mutates_args=())
def _f32_op(x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    return kernels().f32_linear(x, wt)


@torch.library.custom_op("dbrx::f32_rows", mutates_args=())
def _f32_rows_op(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return kernels().f32_rows(x, w)


@_f32_rows_op.register_fake
def _(x, w):
    return x.new_empty(x.shape[0], w.shape[0], dtype=torch.float32)


@_q8_op.register_fake
def _(x, q, scale):
    return x.new_empty(x.shape[0], q.shape[0], dtype=torch.float32)


@_q4_op.register_fake
def _(x, q, scale, zero, group):
    return x.new_empty(x.shape[0], q.shape[0], dtype=torch.float32)


@_f32_op.register_fake
def _(x, wt):
    return x.new_empty(x.shape[0], wt.shape[1], dtype=torch.float32)


def q8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) float @ (q * scale)^T -> (M, N) fp32."""
    return _q8_op(x, q, scale) if _traced(x) else kernels().q8_linear(x, q, scale)


def q4_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """x (M, K) float @ ((codes - 8) * scale + zero)^T, the int4 checkpoint layout -> (M, N) fp32."""
    if _traced(x):
        return _q4_op(x, q, scale, zero, group)
    return kernels().q4_linear(x, q, scale, zero, group)


def matmul(x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ wt (K, N) for few fp32 rows at inference on our kernels, else torch's matmul. 2-32 rows and wt
    the transpose of a row-major W (N, K): dot products per row of W (f32_rows); one row, or another layout (a
    column-major LM head), with more than one thread: torch's matmul on each thread's slice of the columns
    (f32_linear). Measured (2-core AMD EPYC, BENCHMARKS.md): at 4-32 rows f32_rows is 1.6-6x torch's (MKL's) at
    d_model 1024 and on a par at 64; at one row MKL streams a cold matrix faster than our dot products, and its
    slices over two threads are 1.2-1.6x its own single-threaded product."""
    return _kernel_matmul(x, wt) if _f32_fits(x, wt) else x @ wt


def _kernel_matmul(x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """`matmul` once _f32_fits(x, wt) holds."""
    compiling = _traced(x)
    if wt.stride(0) == 1 and x.shape[0] > 1:  # W = wt.T has contiguous rows
        return _f32_rows_op(x, wt.T) if compiling else kernels().f32_rows(x, wt.T)
    if not _threaded():
        return x @ wt
    return _f32_op(x, wt) if compiling else kernels().f32_linear(x, wt)


class MatvecLinear(nn.Linear):
    """nn.Linear whose inference on few fp32 rows on the CPU runs `matmul` (our kernels, every thread);
    training, other dtypes and devices, and many rows go to F.linear. Same parameters and state dict."""

    @classmethod
    def from_linear(cls, m: nn.Linear) -> MatvecLinear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = m.in_features, m.out_features
        new.weight, new.bias = m.weight, m.bias  # the same Parameters
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, in)
        if self.bias is not None or not _f32_fits(x2, self.weight):
            return F.linear(x, self.weight, self.bias)
        return _kernel_matmul(x2, self.weight.T).view(*x.shape[:-1], self.out_features)


def use_matvec_linears(model: nn.Module) -> int:
    """Replace the plain nn.Linear modules of `model` by MatvecLinear (same parameters) where the kernels exist;
    returns how many. Nothing changes on a machine without them."""
    if kernels() is None:
        return 0
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Linear]
    for parent, name, child in swaps:
        setattr(parent, name, MatvecLinear.from_linear(child))
    return len(swaps)


__all__ = ["BLOCK", "MIN_QUANT_IN_FEATURES", "MAX_F32_ROWS", "kernels", "quant_fits", "q8_linear", "q4_linear",
           "matmul", "MatvecLinear", "use_matvec_linears"]
