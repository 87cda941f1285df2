"""Serving throughput on the CPU: `dbrx serve` (continuous batching) against transformers' `generate`.

One process, one run, the same seeded requests for everyone (all arriving at t = 0): 64 prompts of random token
ids, prompt lengths uniform in 32..512, max_tokens uniform in 16..256, greedy, at most 32 in flight.

(a) dbrx serve: started in a subprocess on 127.0.0.1 and driven by `dbrx bench serve`'s machinery
    (dbrx.serve.loadgen, streamed /v1/completions); the server is stopped before (b) starts.
(b) transformers static batches: `transformers.DbrxForCausalLM.from_pretrained(dir)` on the same weights, the
    requests in arrival order in batches of 32, left-padded; each batch runs to its longest max_tokens and each
    request keeps its own max_tokens (and stops at a DBRX stop id, as the server does).
(c) transformers one request at a time, likewise (a seeded subset when --sequential-requests is below the total).

For each: output tokens/s over the run's wall time and TTFT (mean, p99). For transformers a request's TTFT is the
time from t = 0 (all requests waiting) to the first new token of its batch, taken by a logits processor's first
call. Writes one JSON object to stdout and a table to stderr.

    python benchmarks/serve_vs_transformers.py [--model DIR] [--sequential-requests 16]
    python benchmarks/serve_vs_transformers.py --preset dbrx-9b --device cuda --input-len 512:512 \
        --output-len 128:128 --sequential-requests 4      # the GPU target (benchmarks/run_gpu_serve.sh)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import sys
import tempfile
import time

import numpy as np

from dbrx.serve import loadgen
from dbrx.tokens import PAD_ID, STOP_IDS


def _ttft(ttft_s: list[float]) -> dict:
    return {"mean": float(np.mean(ttft_s)) * 1000, "p99": float(np.percentile(ttft_s, 99)) * 1000}


def _count(new_ids: list[int], max_tokens: int) -> int:
    """Output tokens of one row: up to its own max_tokens, ending before its first stop id (as the server counts)."""
    row = new_ids[:max_tokens]
    stops = [i for i, t in enumerate(row) if t in STOP_IDS]
    return stops[0] if stops else len(row)


def run_transformers(model, requests: list[loadgen.BenchRequest], batch_size: int) -> dict:
    """Serve `requests` (all waiting at t = 0) in arrival-ordered static batches; throughput and TTFT."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class FirstToken(LogitsProcessor):  # its first call is when the batch's first new token's logits exist
        def __init__(self) -> None:
            self.at: float | None = None

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if self.at is None:
                self.at = time.perf_counter()
            return scores

    ttft, n_out, n_in = [], 0, 0
    device = next(model.parameters()).device
    start = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        batch = requests[i:i + batch_size]
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.tensor([[PAD_ID] * (width - len(r.prompt_ids)) + r.prompt_ids for r in batch])
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in batch])
        ids, mask = ids.to(device), mask.to(device)
        first = FirstToken()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(r.max_tokens for r in batch),
                                 do_sample=False, eos_token_id=list(STOP_IDS), pad_token_id=PAD_ID,
                                 logits_processor=LogitsProcessorList([first]))
        for row, r in zip(out[:, width:].tolist(), batch):
            n_out += _count(row, r.max_tokens)
        n_in += sum(len(r.prompt_ids) for r in batch)
        ttft += [first.at - start] * len(batch)
    duration = time.perf_counter() - start
    return {"requests": len(requests), "batch_size": batch_size, "duration_s": duration, "total_input_tokens": n_in,
            "total_output_tokens": n_out, "output_throughput": n_out / duration, "ttft_ms": _ttft(ttft)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: dbrx init --preset PRESET)")
    p.add_argument("--preset", default="dbrx-demo", help="the preset initialised when --model is not given")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 (default: bf16 on cuda, fp32 on the CPU)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", default="32:512")
    p.add_argument("--output-len", default="16:256")
    p.add_argument("--max-concurrency", type=int, default=32, help="server concurrency and static batch size")
    p.add_argument("--sequential-requests", type=int, default=16,
                   help="requests timed one at a time: a seeded subset (default 16; 0 = all)")
    p.add_argument("--server-args", default="", help="more `dbrx serve` arguments")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch
    import transformers

    from dbrx.cli import main as dbrx_main
    from dbrx.devices import parse_dtype, resolve_device

    device = resolve_device(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = parse_dtype(dtype_name)
    tmp = tempfile.TemporaryDirectory(prefix="dbrx-serve-bench-")
    model_dir = args.model
    if model_dir is None:
        model_dir = os.path.join(tmp.name, args.preset)
        if dbrx_main(["init", "--preset", args.preset, "--seed", str(args.seed), "--dtype", dtype_name,
                      model_dir]) != 0:
            return 1
    server_args = ["--device", str(device), "--dtype", dtype_name, "--max-num-seqs", str(args.max_concurrency),
                   *shlex.split(args.server_args)]
    requests = loadgen.make_requests(args.num_prompts, loadgen.parse_length(args.input_len, "--input-len"),
                                     loadgen.parse_length(args.output_len, "--output-len"), seed=args.seed)
    wall = time.perf_counter()

    # (a) ours, alone on the machine: nothing else computes in this process while the server runs
    with loadgen.local_server(model_dir, server_args) as url:
        print(f"(a) dbrx serve at {url}: {len(requests)} requests ...", file=sys.stderr, flush=True)
        ours = loadgen.run_load(url, requests, args.max_concurrency, float("inf"), args.seed)

    # (b), (c) transformers, after the server has stopped
    model = transformers.DbrxForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    warm = loadgen.make_requests(2, (8, 8), (2, 2), seed=-1)
    run_transformers(model, warm, 2)  # untimed, as the server's warm-up request
    print(f"(b) transformers, static batches of {args.max_concurrency} ...", file=sys.stderr, flush=True)
    static = run_transformers(model, requests, args.max_concurrency)
    n_seq = args.sequential_requests or len(requests)
    subset = sorted(random.Random(args.seed).sample(range(len(requests)), min(n_seq, len(requests))))
    print(f"(c) transformers, one at a time: {len(subset)} requests ...", file=sys.stderr, flush=True)
    single = run_transformers(model, [requests[i] for i in subset], 1)
    single["subset"] = len(subset) < len(requests)
    single["subset_indices"] = subset

    rows = {"dbrx_serve": ours, "transformers_static": static, "transformers_one_at_a_time": single}
    ratio_static = ours["output_throughput"] / static["output_throughput"]
    ratio_single = ours["output_throughput"] / single["output_throughput"]
    report = {
        "setup": {"model": args.model or f"dbrx-demo (dbrx init, seed {args.seed})", "num_prompts": len(requests),
                  "input_len": args.input_len, "output_len": args.output_len, "max_concurrency": args.max_concurrency,
                  "seed": args.seed, "dtype": str(next(model.parameters()).dtype), "torch": torch.__version__,
                  "transformers": transformers.__version__, "cpu_threads": torch.get_num_threads(),
                  "wall_s": time.perf_counter() - wall},
        **rows,
        "ratio_vs_static": ratio_static, "ratio_vs_one_at_a_time": ratio_single,
        "target_3x_static_met": ratio_static >= 3, "target_10x_one_at_a_time_met": ratio_single >= 10,
    }
    if device.type == "cuda":
        report["target_gpu_4x_static_met"] = ratio_static >= 4
        report["target_gpu_tpot_p99_under_30ms_met"] = ours["tpot_ms"]["p99"] < 30
    print(f"{'':<30}{'requests':>9}{'out tokens':>11}{'seconds':>9}{'out tok/s':>11}{'TTFT mean ms':>14}"
          f"{'TTFT p99 ms':>13}", file=sys.stderr)
    for name, r in rows.items():
        print(f"{name:<30}{r.get('requests', r.get('completed')):>9}{r['total_output_tokens']:>11}"
              f"{r['duration_s']:>9.1f}{r['output_throughput']:>11.1f}{r['ttft_ms']['mean']:>14.0f}"
              f"{r['ttft_ms']['p99']:>13.0f}", file=sys.stderr)
    which = f" (a subset of {len(subset)})" if single["subset"] else ""
    print(f"ours / static-{args.max_concurrency}: {ratio_static:.2f}x; "
          f"ours / one-at-a-time{which}: {ratio_single:.2f}x", file=sys.stderr)
    print(json.dumps(report), flush=True)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
