"""The `export-gguf` verb: a checkpoint as one GGUF file for llama.cpp (dbrx.gguf_export)."""

from __future__ import annotations

import sys
import time

DESCRIPTION = """Write the Hugging Face-format DBRX checkpoint DIR as OUT.gguf, the file llama.cpp (llama-cli,
llama-server, llama-cpp-python, Ollama, LM Studio, ...) loads: llama.cpp's DBRX tensor names and metadata, the cl100k
vocabulary with BPE merges and the `dbrx` pre-tokenizer, DBRX Instruct's chat template. --type f32 keeps the
weights exactly, f16 in float16; q8_0 and q4_0 quantize the matrices in blocks of 32 (the norms and the router stay
float32, a q4_0 file keeps its output head in q8_0, and a matrix whose rows are not a multiple of 32 is written in
float16, as llama.cpp's converter does). Tensors are converted one at a time; OUT is replaced only once the new
file is complete. Needs the `gguf` package: pip install -e ".[gguf]"."""


def cmd_export_gguf(args) -> int:
    try:
        from dbrx.gguf_export import export_gguf
    except ImportError as e:
        raise ValueError(str(e)) from None
    tty = sys.stderr.isatty()

    def show(msg: str) -> None:
        if tty and msg.startswith("["):
            print(f"\r\033[K{msg}", end="", file=sys.stderr, flush=True)
        else:
            print(msg, file=sys.stderr, flush=True)

    start = time.perf_counter()
    report = export_gguf(args.dir, args.out, qtype=args.type, name=args.name, progress=show)
    if tty:
        print(file=sys.stderr)
    if report["f16_fallback"]:
        print(f"note: {len(report['f16_fallback'])} matrices have rows that are not a multiple of the {args.type} "
              f"block size 32 and were written in f16: {', '.join(report['f16_fallback'])}", file=sys.stderr)
    print(f"wrote {args.out} ({args.type}, {report['tensors']} tensors, {report['bytes'] / 2**20:.1f} MiB, "
          f"{time.perf_counter() - start:.1f} s)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("export-gguf", help="write a checkpoint as a GGUF file for llama.cpp (f32, f16, q8_0, q4_0)",
                       description=DESCRIPTION)
    p.add_argument("dir", metavar="DIR", help="checkpoint directory (Hugging Face layout)")
    p.add_argument("out", metavar="OUT.gguf", help="the GGUF file to write")
    p.add_argument("--type", choices=("f32", "f16", "q8_0", "q4_0"), default="f16",
                   help="weight type (default f16)")
    p.add_argument("--name", default=None, help="general.name in the file (default: the directory's name)")
    p.set_defaults(func=cmd_export_gguf)


__all__ = ["register"]
