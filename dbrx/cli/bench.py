"""The `bench` verb: throughput, TFLOP/s, MFU and peak memory as JSON (dbrx.bench)."""

from __future__ import annotations

import argparse
import json

from dbrx.bench import __doc__ as bench_doc
from dbrx.bench import run_bench

from .common import parse_override_args


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="measure training or prefill throughput (tokens/s, TFLOP/s, MFU, memory) as JSON",
        description=bench_doc, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("kind", choices=("train", "prefill"), help="a training step (fwd + bwd) or a prefill forward")
    p.add_argument("--preset", default="dbrx-tiny", help="preset name (default dbrx-tiny)")
    p.add_argument("--override", action="append", metavar="KEY=VALUE", help="config override, e.g. n_layers=2")
    p.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32 (default bf16)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile each block with fullgraph=True (default off)")
    p.add_argument("--checkpointing", default="none", help="activation checkpointing: none, full or selective")
    p.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--backend", default="auto", help="expert backend: auto, grouped_mm, triton, dense, loop")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--compare", default=None, metavar="transformers",
                   help="also run transformers' DbrxForCausalLM on the same config and weights; print the ratio")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by GPU name)")
    p.add_argument("--seed", type=int, default=0, help="weights and tokens seed (default 0)")
    p.add_argument("--estimate-memory", action="store_true",
                   help="run nothing: trace the eager step on fake tensors and print its estimated peak memory "
                        "(any size, on any machine, in seconds)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = run_bench(
        args.kind, preset=args.preset, overrides=parse_override_args(args.override), batch=args.batch,
        seq_len=args.seq_len, dtype=args.dtype, compile=args.compile, checkpointing=args.checkpointing,
        steps=args.steps, warmup=args.warmup, backend=args.backend, device=args.device, compare=args.compare,
        peak=args.peak_tflops, seed=args.seed, estimate_memory=args.estimate_memory,
    )
    print(json.dumps(report), flush=True)
    return 0
