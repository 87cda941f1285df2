"""The `dbrx` command line: a table of verbs and the one top-level error handler.

    dbrx info NAME_OR_DIR          config, parameter counts, memory, KV cache per token
    dbrx init --preset NAME OUT    a randomly initialised Hugging Face-format checkpoint
    dbrx convert IN OUT            split <-> stacked expert layout, dtype
    dbrx export-gguf DIR OUT.gguf  one GGUF file for llama.cpp (--type f16, q8_0 or q4_0)
    dbrx quantize IN OUT --bits 8|4  a weight-only int8 / int4 checkpoint (CPU kernels; loaded by every verb)
    dbrx generate --model DIR TEXT generate (or stream) text; --chat applies the DBRX Instruct template
    dbrx chat --model DIR          interactive multi-turn chat
    dbrx serve --model DIR         OpenAI-compatible HTTP server (continuous batching, paged KV cache)
    dbrx prepare INPUT... --out D  tokenize text / JSONL / Parquet into token shards
    dbrx pretrain [CONFIG] [k=v]   train (no arguments: the demo model on the bundled corpus)
    dbrx finetune --model DIR ...  supervised fine-tuning on chat JSONL
    dbrx plot RUN_DIR              loss and expert-load pictures of a run
    dbrx export RUN_DIR OUT        a Hugging Face checkpoint from a (sharded) training checkpoint
    dbrx merge-lora BASE ADAPTER OUT  a checkpoint with a LoRA adapter (PEFT format) merged in
    dbrx eval --model DIR          ICL tasks with Gauntlet scores, HumanEval, lm-evaluation-harness
    dbrx bench train|prefill|serve throughput, TFLOP/s, MFU, memory; serving latency and throughput

Any expected failure (bad input, a missing device or file, no space left, Ctrl-C) ends in one line on stderr and
a non-zero exit; `dbrx --debug VERB ...` shows the traceback instead. Each verb lives in a module of this package
(`register(subparsers)` adds its parser); library modules hold no argparse code. This package may import every
other one; nothing imports it.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

import torch

from .common import Parser

# verb modules, in the order `dbrx --help` lists them: each has register(subparsers)
VERB_MODULES = ("model", "gguf", "quant", "generate", "serve", "prepare", "train", "lora", "eval", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dbrx", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dbrx {__import__('dbrx').__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=Parser)
    for name in VERB_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def error_message(e: BaseException) -> str | None:
    """The one-line message for an expected failure, or None for a bug (which keeps its traceback)."""
    if isinstance(e, torch.OutOfMemoryError):
        return f"out of memory on the device: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    if isinstance(e, MemoryError):
        return "out of memory"
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"no space left on the device{f' (writing {e.filename})' if e.filename else ''}"
    if isinstance(e, OSError) and e.strerror and e.filename and str(e).startswith("["):
        return f"{e.filename}: {e.strerror}"  # "[Errno 13] Permission denied: 'x'" -> "x: Permission denied"
    if isinstance(e, (ValueError, OSError)):
        return str(e) or type(e).__name__
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"\ndbrx {args.verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        message = None if args.debug else error_message(e)
        if message is None:
            raise
        print(f"dbrx {args.verb}: error: {' '.join(message.split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
