"""llama.cpp against dbrx on the same weights: greedy tokens and CPU decode speed, through `dbrx export-gguf`.

The checkpoint (--model DIR, or a random one of --preset written to a temporary directory) is exported to GGUF in
each --types and run by llama.cpp through llama-cpp-python on the CPU; dbrx runs the same checkpoint in fp32 with a
plain greedy loop over the model's forward and its KV cache. Both get the same prompt ids (llama.cpp's own
tokenization of the prompt is checked against ours too) and generate --new-tokens tokens by argmax over the whole
vocabulary, without stopping at end-of-text. For each type: how many leading tokens agree with ours (f16 should
agree throughout, up to near-ties; q8_0 and q4_0 drift later or sooner), and prefill time and decode tokens/s of
both, with the same number of threads. One JSON object on stdout, a table on stderr.

    pip install llama-cpp-python   # builds llama.cpp from source: about half an hour on 2 cores; not in CI
    python benchmarks/gguf_vs_llamacpp.py --model runs/demo/final --threads 1 --new-tokens 64

Without llama-cpp-python the script says so and exits 0 without running anything.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from dbrx import DbrxConfig, DbrxForCausalLM
from dbrx.gguf_export import TYPES, export_gguf
from dbrx.tokenizer import get_tokenizer

PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks? It is the east, and Juliet is the sun."


@torch.no_grad()
def dbrx_greedy(model: DbrxForCausalLM, ids: list[int], n_new: int) -> tuple[list[int], float, float]:
    """(new ids, prefill seconds (prompt to first token), decode tokens/s over the other n_new - 1 tokens)."""
    slots = len(ids) + n_new
    model.setup_cache(1, slots)
    every = torch.ones(1, slots, dtype=torch.bool)  # cache slots holding real tokens (causality from cache_pos)
    try:
        t0 = time.perf_counter()
        logits = model(torch.tensor([ids]), every, cache_pos=torch.arange(len(ids)))[0, -1]  # (V,)
        out = [int(logits.argmax())]
        t1 = time.perf_counter()
        for pos in range(len(ids), len(ids) + n_new - 1):
            logits = model(torch.tensor([[out[-1]]]), every, cache_pos=torch.tensor([pos]))[0, -1]
            out.append(int(logits.argmax()))
        t2 = time.perf_counter()
    finally:
        model.clear_cache()
    return out, t1 - t0, (n_new - 1) / max(t2 - t1, 1e-9)


def llama_greedy(llm, ids: list[int], n_new: int) -> tuple[list[int], float, float]:
    """The same for a llama_cpp.Llama: its sampler at temperature 0 is argmax."""
    out: list[int] = []
    t0 = time.perf_counter()
    t1 = None
    for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if t1 is None:
            t1 = time.perf_counter()
        out.append(int(tok))
        if len(out) == n_new:
            break
    t2 = time.perf_counter()
    return out, t1 - t0, (n_new - 1) / max(t2 - t1, 1e-9)


def agree(a: list[int], b: list[int]) -> int:
    """Length of the common prefix."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: a random --preset model)")
    ap.add_argument("--preset", default="dbrx-demo", help="preset of the random model (default dbrx-demo)")
    ap.add_argument("--types", default=",".join(TYPES), help=f"GGUF types to run (default {','.join(TYPES)})")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each side; the best is kept")
    ap.add_argument("--keep", default=None, metavar="DIR", help="write the GGUF files here (default: temporary)")
    args = ap.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        print("skipped: llama-cpp-python is not installed (pip install llama-cpp-python builds llama.cpp, about "
              "half an hour on 2 cores); nothing was run", file=sys.stderr)
        return 0
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    for t in types:
        if t not in TYPES:
            ap.error(f"unknown type {t!r}; choose from {', '.join(TYPES)}")
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="gguf-bench-") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        ckpt = Path(args.model) if args.model else work / "model"
        if not args.model:
            DbrxForCausalLM.from_config(DbrxConfig.from_preset(args.preset), seed=0).save_pretrained(ckpt)
        model = DbrxForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        ids = get_tokenizer().encode(args.prompt)
        if len(ids) + args.new_tokens > model.config.max_seq_len:
            ap.error(f"prompt ({len(ids)} tokens) + --new-tokens exceeds max_seq_len {model.config.max_seq_len}")
        runs = [dbrx_greedy(model, ids, args.new_tokens) for _ in range(args.repeats)]
        ours = runs[0][0]
        report = {"model": str(ckpt), "threads": args.threads, "prompt_tokens": len(ids), "new_tokens":
                  args.new_tokens, "dbrx": {"prefill_s": min(r[1] for r in runs), "tok_s": max(r[2] for r in runs)},
                  "llama_cpp": {}}
        for qtype in types:
            path = work / f"model-{qtype}.gguf"
            export_gguf(ckpt, path, qtype)
            llm = Llama(model_path=str(path), n_ctx=len(ids) + args.new_tokens + 8, n_threads=args.threads,
                        n_threads_batch=args.threads, n_gpu_layers=0, verbose=False)
            text_ids = llm.tokenize(args.prompt.encode("utf-8"), add_bos=False, special=False)
            runs = [llama_greedy(llm, ids, args.new_tokens) for _ in range(args.repeats)]
            report["llama_cpp"][qtype] = {
                "file_bytes": path.stat().st_size, "tokenizer_agrees": list(text_ids) == ids,
                "greedy_agree": agree(runs[0][0], ours), "prefill_s": min(r[1] for r in runs),
                "tok_s": max(r[2] for r in runs), "tokens": runs[0][0]}
            del llm
    report["dbrx"]["tokens"] = ours
    n = args.new_tokens
    print(f"{'':8} {'agree':>8} {'tokenizer':>9} {'prefill ms':>10} {'tok/s':>8}", file=sys.stderr)
    d = report["dbrx"]
    print(f"{'dbrx':8} {'-':>8} {'-':>9} {d['prefill_s'] * 1e3:10.1f} {d['tok_s']:8.1f}", file=sys.stderr)
    for qtype, r in report["llama_cpp"].items():
        print(f"{qtype:8} {r['greedy_agree']:>4}/{n:<3} {str(r['tokenizer_agrees']):>9} {r['prefill_s'] * 1e3:10.1f} "
              f"{r['tok_s']:8.1f}", file=sys.stderr)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
