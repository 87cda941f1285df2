"""The `dbrx` command line: one verb per job.

    dbrx info NAME_OR_DIR          config, parameter counts, memory, KV cache per token
    dbrx init --preset NAME OUT    a randomly initialised Hugging Face-format checkpoint
    dbrx generate --model DIR TEXT generate (or stream) text; --chat applies the DBRX Instruct template
    dbrx chat --model DIR          interactive multi-turn chat
    dbrx convert IN OUT            split <-> stacked expert layout, dtype
    dbrx prepare INPUT... --out D  tokenize text / JSONL / Parquet into token shards
    dbrx pretrain [CONFIG] [k=v]   train (no arguments: the demo model on the bundled corpus)
    dbrx finetune --model DIR ...  supervised fine-tuning on chat JSONL
    dbrx plot RUN_DIR              loss and expert-load pictures of a run
    dbrx bench train|prefill       throughput, TFLOP/s, MFU, memory (optionally against transformers)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .checkpoint import parse_dtype  # one dtype parser for the package (dbrx.bench imports it from here)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_overrides(items: list[str] | None) -> dict:
    """['n_layers=2', 'clip_qkv=null'] -> {'n_layers': 2, 'clip_qkv': None} (values parsed as JSON when possible)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_config(name_or_dir: str, overrides: dict | None = None):
    """A preset name or a checkpoint directory (its config.json) -> DbrxConfig."""
    from .config import PRESETS, DbrxConfig

    if name_or_dir in PRESETS:
        return DbrxConfig.from_preset(name_or_dir, **(overrides or {}))
    if os.path.isdir(name_or_dir):
        cfg = DbrxConfig.load(os.path.join(name_or_dir, "config.json"))
        if overrides:
            raise ValueError("overrides apply to presets only, not to a checkpoint directory")
        return cfg
    raise ValueError(f"{name_or_dir!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint directory")


def _human(n: float) -> str:
    """Bytes in binary units: 163840 -> '160.0 KiB'."""
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for prefix in ("Ki", "Mi", "Gi", "Ti"):
        n /= 1024
        if abs(n) < 1024:
            break
    return f"{n:.1f} {prefix}B"


# ---- info -----------------------------------------------------------------------------------------------
def info_report(cfg) -> dict:
    n = cfg.num_params()
    norms = n["norms"]
    matmul = n["total"] - norms  # weights that weight-only quantization stores in int8 / int4
    group = 128  # int4 groups along the input dim, one bf16 scale and one bf16 zero point per group
    return {
        "config": cfg.to_hf_dict(),
        "params_total": n["total"],
        "params_active_per_token": n["active"],
        "params_by_part": {k: v for k, v in n.items() if k not in ("total", "active")},
        "memory_bytes": {
            "bf16": 2 * n["total"],
            "int8": matmul + 2 * (matmul // cfg.d_model) + 2 * norms,  # one bf16 scale per output row
            "int4": matmul // 2 + 4 * (matmul // group) + 2 * norms,
        },
        "kv_cache_bytes_per_token_bf16": cfg.kv_cache_bytes_per_token(2),
        "kv_cache_bytes_full_context_bf16": cfg.kv_cache_bytes_per_token(2) * cfg.max_seq_len,
        "train_flops_per_token": cfg.flops_per_token(cfg.max_seq_len, training=True),
    }


def cmd_info(args) -> int:
    cfg = resolve_config(args.model, parse_overrides(args.override))
    rep = info_report(cfg)
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    a, f = cfg.attn_config, cfg.ffn_config
    print(f"{args.model}")
    print(f"  d_model {cfg.d_model} · n_heads {cfg.n_heads} (kv {a.kv_n_heads}, head_dim {cfg.head_dim}) · "
          f"n_layers {cfg.n_layers} · max_seq_len {cfg.max_seq_len} · vocab {cfg.vocab_size}")
    print(f"  experts {f.moe_num_experts} top-{f.moe_top_k} · ffn_hidden_size {f.ffn_hidden_size} · "
          f"clip_qkv {a.clip_qkv} · rope_theta {a.rope_theta:g}")
    print(f"  parameters: {rep['params_total'] / 1e9:.2f}B total, {rep['params_active_per_token'] / 1e9:.2f}B "
          f"active per token")
    for k, v in rep["params_by_part"].items():
        print(f"    {k:<11} {v / 1e9:8.3f}B")
    m = rep["memory_bytes"]
    print(f"  weights: bf16 {_human(m['bf16'])} · int8 {_human(m['int8'])} · int4 {_human(m['int4'])} "
          "(weight-only; int8 per-row scales, int4 groups of 128)")
    print(f"  KV cache (bf16): {_human(rep['kv_cache_bytes_per_token_bf16'])} per token, "
          f"{_human(rep['kv_cache_bytes_full_context_bf16'])} per sequence at {cfg.max_seq_len} tokens")
    return 0


# ---- init -----------------------------------------------------------------------------------------------
def cmd_init(args) -> int:
    from .model import DbrxForCausalLM

    cfg = resolve_config(args.preset, parse_overrides(args.override))
    if os.path.exists(os.path.join(args.out, "config.json")) and not args.force:
        raise ValueError(f"{args.out} already holds a checkpoint (use --force to overwrite)")
    total = cfg.num_params()["total"]
    print(f"initialising {args.preset} ({total / 1e6:.1f}M parameters, seed {args.seed}) ...", file=sys.stderr)
    model = DbrxForCausalLM.from_config(cfg, seed=args.seed, dtype=parse_dtype(args.dtype))
    model.save_pretrained(args.out)
    print(f"saved to {args.out}", file=sys.stderr)
    return 0


# ---- generate / chat ------------------------------------------------------------------------------------
def _load_for_inference(args):
    from .model import DbrxForCausalLM
    from .tokenizer import get_tokenizer

    device = args.device or default_device()
    dtype = parse_dtype(args.dtype) or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    model = DbrxForCausalLM.from_pretrained(args.model, dtype=dtype, device=device).eval()
    return model, get_tokenizer()


def _sampling(args):
    from .generate import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
        stop_strings=tuple(args.stop or ()), seed=args.seed,
    )


def cmd_generate(args) -> int:
    from .generate import stream_text

    params = _sampling(args)  # validate before the (slow) model load
    if args.system is not None and not args.chat:
        raise ValueError("--system only applies with --chat")
    model, tok = _load_for_inference(args)
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    if args.chat and args.system is not None:
        prompt.insert(0, {"role": "system", "content": args.system})
    if not args.chat:
        sys.stdout.write(args.prompt)
    for piece in stream_text(model, tok, prompt, params, chat=args.chat):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args) -> int:
    from .generate import stream_text

    params = _sampling(args)
    model, tok = _load_for_inference(args)
    messages = [] if args.system is None else [{"role": "system", "content": args.system}]
    print("dbrx chat: type a message; /reset clears the conversation, /exit (or Ctrl-D) quits.", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if messages and messages[0]["role"] == "system" else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        sys.stdout.write("dbrx> ")
        reply = []
        try:
            for piece in stream_text(model, tok, messages, params, chat=True):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except ValueError as e:  # e.g. the conversation no longer fits in max_seq_len: keep the session
            messages.pop()
            print(f"\ndbrx chat: error: {e} (/reset starts over)", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


def _add_sampling_args(p):
    p.add_argument("--model", required=True, help="checkpoint directory (Hugging Face layout)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold in (0, 1] (default 1.0: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1.0)")
    p.add_argument("--stop", action="append", help="stop string (repeatable); EOS ids always stop")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--system", default=None, help="system prompt for --chat (default: DBRX Instruct's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dbrx", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dbrx {__import__('dbrx').__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)

    p = sub.add_parser("info", help="show a preset's or checkpoint's config, parameters and memory")
    p.add_argument("model", help="a preset name (dbrx-132b, dbrx-9b, ...) or a checkpoint directory")
    p.add_argument("--override", action="append", metavar="KEY=VALUE", help="preset override, e.g. n_layers=2")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("init", help="write a randomly initialised checkpoint of a preset")
    p.add_argument("out", help="output directory")
    p.add_argument("--preset", required=True, help="preset name (see `dbrx info`)")
    p.add_argument("--override", action="append", metavar="KEY=VALUE", help="preset override, e.g. n_layers=2")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default fp32)")
    p.add_argument("--force", action="store_true", help="overwrite an existing checkpoint")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the DBRX Instruct chat template")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_chat, max_new_tokens=512)

    from . import bench, checkpoint
    from .train import cli as train_cli
    from .train import data

    checkpoint.register(sub)
    data.register(sub)
    train_cli.register(sub)
    bench.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as e:  # user mistakes, missing or unreadable files
        print(f"dbrx {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dbrx {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
