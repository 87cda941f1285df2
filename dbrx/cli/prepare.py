"""The `prepare` verb: tokenize documents into training shards (dbrx.train.data.prepare)."""

from __future__ import annotations

import argparse
import sys
import time

from dbrx.train.data import DEFAULT_SHARD_TOKENS, FORMATS, prepare


def register(subparsers) -> None:
    """Add the ``prepare`` verb."""
    p = subparsers.add_parser(
        "prepare",
        help="tokenise text / JSONL / Parquet files into training shards",
        description="Tokenise documents into uint32 shards (each document followed by EOS) with an index of counts "
        "and checksums. Text files are one document each (or split with --split), JSONL one per line, Parquet one "
        "per row. Re-running with unchanged inputs does nothing.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files or directories")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", dest="fmt", choices=FORMATS, default="auto", help="input format (default: by suffix)")
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text")
    p.add_argument("--split", default=None, help="regex that separates documents inside a text file")
    p.add_argument("--workers", type=int, default=None, help="tokeniser processes (default: all CPUs)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard (about)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    tty = sys.stderr.isatty()

    last = [0.0]

    def show(done: int, total: int, tokens: int) -> None:
        if done < total and time.perf_counter() - last[0] < 0.5:
            return
        last[0] = time.perf_counter()
        line = f"prepare: {100 * done / max(total, 1):5.1f}% of {total / 1e6:.1f} MB, {tokens:,} tokens"
        print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)

    result = prepare(args.inputs, args.out, fmt=args.fmt, text_field=args.text_field, split=args.split,
                     workers=args.workers, shard_tokens=args.shard_tokens, progress=show)
    if tty and result["status"] == "written":
        print(file=sys.stderr)
    print(f"{args.out}: {result['status']}: {result['documents']:,} documents, {result['tokens']:,} tokens in "
          f"{len(result['shards'])} shard(s) ({time.perf_counter() - start:.1f} s)")
    return 0
