"""dbrx's CPU kernels (dbrx.kernels.cpu_matvec) against torch's on single matrices: ms per call, median of
alternating calls, 1 and 2 threads.

    python benchmarks/cpu_kernels.py [--rounds 15]

Shapes: the mid model's LM head (100352 x 1024), the demo's (100352 x 64), an expert's gate/up (3584 x 1024) and
down (1024 x 1792); rows 1, 4, 32. int8 per output row and int4 in groups of 32, quantized by dbrx.quant.formats;
torch's kernels get bf16 activations (the dtype they are fast in), ours fp32. fp32: torch's matmul on the row-major
and the column-major weight against ours (f32_rows and the column-sliced f32_linear). One JSON line per shape.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dbrx.kernels.cpu_matvec import kernels
from dbrx.quant.formats import int4_kernel_layout, int4_mm, int8_mm, quantize_int4, quantize_int8

SHAPES = [(100352, 1024), (100352, 64), (3584, 1024), (1024, 1792)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    k = kernels()
    if k is None:
        raise SystemExit("dbrx's CPU kernels cannot be built here")
    torch.manual_seed(0)
    for N, K in SHAPES:
        w = torch.randn(N, K) * 0.02
        wc = w.T.contiguous().T  # column-major storage, same values
        q8, s8 = quantize_int8(w)
        q4, s4, z4 = quantize_int4(w, 32)
        w4, sz = int4_kernel_layout(q4, s4, z4, K, 32)
        for M in (1, 4, 32):
            x = torch.randn(M, K)
            xb = x.bfloat16()
            fns = {"torch_int8": lambda: int8_mm(xb, q8, s8), "ours_int8": lambda: k.q8_linear(x, q8, s8),
                   "torch_int4": lambda: int4_mm(xb, w4, sz, 32, N),
                   "ours_int4": lambda: k.q4_linear(x, q4, s4, z4, 32),
                   "torch_f32": lambda: x @ w.T, "torch_f32_colmajor": lambda: x @ wc.T,
                   "ours_f32_rows": lambda: k.f32_rows(x, w), "ours_f32_sliced_colmajor": lambda: k.f32_linear(x, wc.T)}
            for threads in (1, 2):
                torch.set_num_threads(threads)
                times = {name: [] for name in fns}
                for _ in range(args.rounds):
                    for name, f in fns.items():
                        t = time.perf_counter()
                        f()
                        times[name].append(time.perf_counter() - t)
                print(json.dumps({"N": N, "K": K, "M": M, "threads": threads,
                                  "ms": {n: round(statistics.median(v) * 1e3, 3) for n, v in times.items()}}),
                      flush=True)


if __name__ == "__main__":
    main()
