"""The `bench` verb and its sub-verbs: `train` and `prefill` (throughput, TFLOP/s, MFU and peak memory as JSON,
dbrx.bench), `decode` (greedy decoding: ms/step, tokens/s and weight bandwidth as JSON, float or quantized) and
`serve` (an OpenAI-compatible server under load: TTFT, TPOT, ITL, throughput; dbrx.serve.loadgen)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from dbrx.bench import DECODE_DOC, run_bench, run_decode_bench
from dbrx.bench import __doc__ as bench_doc

from .common import parse_override_args

SERVE_DOC = """Send seeded random prompts (token ids) to an OpenAI-compatible /v1/completions, streamed, and report
vLLM's serving-benchmark metrics: TTFT, TPOT, ITL and end-to-end latency (mean, median, p99 in ms), request,
output and total token throughput. Give --url of a running server, or --model DIR to start `dbrx serve` on a free
127.0.0.1 port for the run. The table goes to stderr; --json prints the report as one JSON object on stdout."""


def _add_step_args(p: argparse.ArgumentParser) -> None:
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
                        "(any size, on any machine; seconds, minutes for --qlora at dbrx-132b size)")
    p.add_argument("--lora", type=int, default=None, metavar="RANK",
                   help="the step of LoRA adapters of this rank on the frozen model (dbrx.lora)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: twice the rank)")
    p.add_argument("--lora-targets", default=None, metavar="T1,T2",
                   help="LoRA targets among Wqkv, out_proj, router, w1, v1, w2 (default Wqkv,out_proj,w1,v1,w2)")
    p.add_argument("--optimizer", default=None, choices=("adamw", "lionw"),
                   help="with --estimate-memory: add the optimizer's fp32 state of the trainable parameters")
    p.add_argument("--qlora", type=int, default=None, choices=(8, 4), metavar="BITS",
                   help="with --lora: QLoRA, the frozen base quantized first as `dbrx quantize` does, 8 (int8 per "
                        "output row) or 4 (int4 in groups); CPU kernels, as the trainer's QLoRA (measured with "
                        "--device cpu, or --estimate-memory)")
    p.add_argument("--group-size", type=int, default=None, metavar="G",
                   help="with --qlora 4: int4 group size, 32, 64, 128 or 256 (default 128 where it divides d_model)")
    p.add_argument("--quant-targets", default=None, metavar="T1,T2",
                   help="with --qlora: quantized parts among attn, experts, lm_head, embedding (default attn,experts: "
                        "what `dbrx quantize` writes without --include-head / --include-embedding)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="measure training, prefill or serving throughput and latency as JSON",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="kind", metavar="KIND", required=True, parser_class=type(p))
    for kind, what in (("train", "a training step (fwd + bwd)"), ("prefill", "a prefill forward")):
        q = sub.add_parser(kind, help=f"tokens/s, TFLOP/s, MFU and peak memory of {what}", description=bench_doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_step_args(q)
        q.set_defaults(func=run)

    q = sub.add_parser("decode", help="greedy decoding: ms/step, tokens/s and weight bandwidth, float or quantized",
                       description=DECODE_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("--preset", default="dbrx-tiny", help="preset name (default dbrx-tiny; random weights)")
    q.add_argument("--override", action="append", metavar="KEY=VALUE", help="config override, e.g. n_layers=2")
    q.add_argument("--model", default=None, metavar="DIR",
                   help="a checkpoint directory (float or quantized) instead of a preset")
    q.add_argument("--batch", default="1", metavar="B1,B2", help="batch sizes, comma-separated (default 1)")
    q.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16)")
    q.add_argument("--new-tokens", type=int, default=32, help="timed decode steps (default 32)")
    q.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default fp32 on the CPU, bf16 on GPU)")
    q.add_argument("--bits", type=int, default=None, choices=(8, 4), help="quantize in memory (dbrx.quant)")
    q.add_argument("--group-size", type=int, default=None, help="int4 group size (default 128 or what fits)")
    q.add_argument("--quant-targets", default="attn,experts,lm_head", metavar="T1,T2",
                   help="with --bits: some of attn, experts, lm_head, embedding (default attn,experts,lm_head)")
    q.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's)")
    q.add_argument("--rounds", type=int, default=3, help="timed rounds; the median is reported (default 3)")
    q.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    q.add_argument("--compare", default=None, metavar="transformers",
                   help="also run transformers' DbrxForCausalLM.generate on the same weights (float only)")
    q.add_argument("--seed", type=int, default=0, help="weights and prompt seed (default 0)")
    q.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the decode step, static shapes (default off)")
    q.set_defaults(func=run_decode)

    q = sub.add_parser("serve", help="an OpenAI-compatible server under load: TTFT, TPOT, ITL, throughput",
                       description=SERVE_DOC)
    where = q.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--model", help="checkpoint directory: start `dbrx serve` on 127.0.0.1 for the run")
    q.add_argument("--server-args", default="", metavar="ARGS",
                   help="more `dbrx serve` arguments with --model, e.g. \"--max-num-seqs 64 --dtype bf16\"")
    q.add_argument("--num-prompts", type=int, default=64, help="requests to send (default 64)")
    q.add_argument("--request-rate", default="inf", help="requests/s, Poisson arrivals; inf: all at once (default)")
    q.add_argument("--max-concurrency", type=int, default=32, help="requests in flight at most (default 32)")
    q.add_argument("--input-len", default="32:512", help="prompt tokens: N, or LO:HI drawn uniformly (default 32:512)")
    q.add_argument("--output-len", default="16:256", help="max_tokens: N, or LO:HI drawn uniformly (default 16:256)")
    q.add_argument("--seed", type=int, default=0, help="seed of prompts, lengths and arrivals (default 0)")
    q.add_argument("--served-model", default=None, metavar="NAME",
                   help="the request's `model`: the server's base name or one of its adapters (dbrx serve --adapter); "
                        "default: none sent, the base model")
    q.add_argument("--api-key", default=None, help="sent as `Authorization: Bearer KEY`")
    q.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per request (default 600)")
    q.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout")
    q.set_defaults(func=run_serve)


def _lora_config(args: argparse.Namespace):
    if args.lora is None:
        if args.lora_alpha is not None or args.lora_targets is not None:
            raise ValueError("--lora-alpha and --lora-targets need --lora RANK")
        return None
    from dbrx.lora import LoraConfig

    cfg = LoraConfig(rank=args.lora, alpha=args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora)
    if args.lora_targets is not None:
        cfg.targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    return cfg


def run(args: argparse.Namespace) -> int:
    report = run_bench(
        args.kind, preset=args.preset, overrides=parse_override_args(args.override), batch=args.batch,
        seq_len=args.seq_len, dtype=args.dtype, compile=args.compile, checkpointing=args.checkpointing,
        steps=args.steps, warmup=args.warmup, backend=args.backend, device=args.device, compare=args.compare,
        peak=args.peak_tflops, seed=args.seed, estimate_memory=args.estimate_memory, lora=_lora_config(args),
        optimizer=args.optimizer, qlora=args.qlora, group_size=args.group_size,
        quant_targets=None if args.quant_targets is None else
        tuple(t.strip() for t in args.quant_targets.split(",") if t.strip()),
    )
    print(json.dumps(report), flush=True)
    return 0


def run_decode(args: argparse.Namespace) -> int:
    try:
        batches = tuple(int(b) for b in args.batch.split(","))
    except ValueError:
        raise ValueError(f"--batch must be comma-separated integers, got {args.batch!r}") from None
    report = run_decode_bench(
        args.preset, overrides=parse_override_args(args.override), model_dir=args.model, batches=batches,
        prompt_len=args.prompt_len, new_tokens=args.new_tokens, dtype=args.dtype, bits=args.bits,
        group_size=args.group_size, quant_targets=tuple(t.strip() for t in args.quant_targets.split(",") if t.strip()),
        threads=args.threads, rounds=args.rounds, device=args.device, compare=args.compare, seed=args.seed,
        compile=args.compile,
    )
    print(json.dumps(report), flush=True)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from dbrx.serve import loadgen

    rate = loadgen.parse_rate(args.request_rate)
    if args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be a positive integer, got {args.max_concurrency}")
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be positive, got {args.timeout}")
    requests = loadgen.make_requests(args.num_prompts, loadgen.parse_length(args.input_len, "--input-len"),
                                     loadgen.parse_length(args.output_len, "--output-len"), seed=args.seed)
    kw = dict(max_concurrency=args.max_concurrency, request_rate=rate, seed=args.seed, api_key=args.api_key,
              timeout_s=args.timeout, model=args.served_model)
    if args.model is not None:
        with loadgen.local_server(args.model, shlex.split(args.server_args)) as url:
            print(f"dbrx bench serve: started dbrx serve at {url}; {len(requests)} requests ...", file=sys.stderr,
                  flush=True)
            report = loadgen.run_load(url, requests, **kw)
        report["model"] = args.model
    else:
        if args.server_args:
            raise ValueError("--server-args needs --model (the server is started here only with --model)")
        report = loadgen.run_load(args.url, requests, **kw)
    print(loadgen.format_table(report), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(report), flush=True)
    return 0 if report["completed"] else 1
