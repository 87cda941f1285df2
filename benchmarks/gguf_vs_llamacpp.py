"""llama.cpp against dbrx on the same weights: greedy tokens, CPU decode speed and peak memory (issue 11's targets).

One checkpoint (--model DIR, or a random --preset model with --override, written to --workdir) is run by
  dbrx          fp32 eager (the LM head column-major, as dbrx.loading.load_pretrained stores it on the CPU);
                `--compile`: fp32, int8, int4 with the decode step under torch.compile (dbrx.bench's
                compiled_decode_step); int8 (per output row) and int4 (asymmetric, groups of 32 along the input, the
                size of a Q4_0 block), both from dbrx.quant.quantize_model in memory on attention, experts, LM head
                and embedding (what a q8_0 / q4_0 GGUF file quantizes; the router and norms stay fp32 in both)
  transformers  fp32, its DbrxForCausalLM with the same weights running `generate` (dbrx.bench's adapter);
                `--no-transformers` skips it
  llama.cpp     the checkpoint exported by `dbrx export-gguf` in each of --types (default f32, f16, q8_0, q4_0),
                through llama-cpp-python's C API: a greedy sampler and one llama_decode per token, the library's
                default context (flash attention auto, f16 KV cache), n_threads = n_threads_batch = --threads
dbrx's loop is dbrx.bench.decode_greedy, the loop of `dbrx bench decode`, imported rather than copied. Every
contender gets the same prompt ids (ours; llama.cpp's tokenization of the text is checked against them), prefills
them, takes the argmax, then runs --new-tokens timed decode steps of one token each (prefill excluded), argmax over
the whole vocabulary, no stopping at end-of-text. After a warm-up round (which also compiles), --rounds rounds run
every contender once each, in turn (alternating, so that load on a shared machine falls on all alike); tok/s is
new tokens / the median time. Agreement: how many leading tokens equal dbrx fp32's, and the share of equal
positions. Pairs: dbrx fp32 / llama.cpp f32, dbrx fp32 / transformers (target 1.5x), int8 / q8_0, int4 / q4_0.

Peak memory (unless --no-memory): each contender once more in a fresh child process (spawned before the timed
rounds): RSS is read after the imports, the high-water mark is reset (/proc/self/clear_refs), the model is loaded
and one greedy run made; reported is the peak RSS above that baseline (weights, KV cache, activations, llama.cpp's
compute buffers; file pages of memory-mapped weights count). dbrx int8 / int4 load there the checkpoint that
`dbrx quantize` writes with the same settings (load_quantized equals quantize_model; the child's tokens are checked
against the timed ones). `weight_mb` is the weights' size in memory: dbrx's parameters and buffers without the
KV cache, llama.cpp's llama_model_size. transformers and the compiled step get no memory figure.
`checkpoint_same_tokens` compares the child's greedy tokens with the timed ones: the checkpoint's weights are
memory-mapped at offsets that are not 64-byte aligned, which can change a batch-1 int8 result by one bf16 rounding
step, so on near-ties (random weights) it can be false without any difference in the weights.

A q8_0 / q4_0 file keeps a matrix whose rows are not a multiple of 32 in f16 (the demo preset's ffn_down_exps:
ffn_hidden_size 112), as llama.cpp's converter does; the JSON lists them.

llama-cpp-python is not a dependency of dbrx. Either `pip install llama-cpp-python` (builds llama.cpp from source:
about half an hour on 2 cores), or build llama.cpp's shared libraries yourself and point the Python bindings at
them without installing:
    tar xf llama_cpp_python-0.3.36.tar.gz && cd llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -B build -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF && cmake --build build -j --config Release
    export PYTHONPATH=$PWD/../.. LLAMA_CPP_LIB_PATH=$PWD/build/bin     # then `import llama_cpp` works
(the bindings need diskcache, numpy, typing-extensions and jinja2 importable). Without llama_cpp the script says so
and exits 0 without running anything.

    python benchmarks/gguf_vs_llamacpp.py --model runs/demo/final --threads 1 --new-tokens 64 --rounds 3
    python benchmarks/gguf_vs_llamacpp.py --preset dbrx-demo --override d_model=1024 --override n_heads=16 \\
        --override kv_n_heads=8 --override ffn_hidden_size=1792 --override n_layers=4 --workdir /tmp/mid --threads 2

One JSON object on stdout (--out FILE writes it there too), a table on stderr.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks? It is the east, and Juliet is the sun."
TYPES = ("f32", "f16", "q8_0", "q4_0")
QUANT_TARGETS = ("attn", "experts", "lm_head", "embedding")
INT4_GROUP = 32  # a Q4_0 block
PAIRS = (("dbrx fp32", "llama.cpp f32", 1.0), ("dbrx fp32", "transformers fp32", 1.5),
         ("dbrx int8", "llama.cpp q8_0", 1.0), (f"dbrx int4 g{INT4_GROUP}", "llama.cpp q4_0", 1.0))


# ---- llama.cpp through its C API ---------------------------------------------------------------------------------
class LlamaCpp:
    """One GGUF file loaded by llama.cpp (llama-cpp-python's ctypes bindings): tokenize, and greedy decoding with
    one llama_decode per token, as llama-cli runs."""

    log: list[str] = []
    _callback = None

    def __init__(self, path: Path, n_ctx: int, n_batch: int, threads: int):
        import llama_cpp as L

        self.L = L
        if LlamaCpp._callback is None:  # keep llama.cpp's log (buffer sizes) instead of printing it
            LlamaCpp._callback = L.llama_log_callback(lambda level, text, _: LlamaCpp.log.append(text.decode(
                "utf-8", "replace")))
            L.llama_log_set(LlamaCpp._callback, ctypes.c_void_p(0))
            L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}: {''.join(LlamaCpp.log[-5:]).strip()}")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_batch, n_batch
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not make a context for {path}")
        self.flash_attn_type, self.type_k = int(cp.flash_attn_type), int(cp.type_k)
        self.vocab = L.llama_model_get_vocab(self.model)
        self.sampler = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        L.llama_sampler_chain_add(self.sampler, L.llama_sampler_init_greedy())
        self.weight_bytes = int(L.llama_model_size(self.model))

    def tokenize(self, text: str) -> list[int]:
        b = text.encode("utf-8")
        buf = (self.L.llama_token * (len(b) + 8))()
        n = self.L.llama_tokenize(self.vocab, b, len(b), buf, len(buf), False, False)
        return list(buf[:n])

    def greedy(self, ids: list[int], new_tokens: int) -> tuple[list[int], float]:
        """(new_tokens + 1 ids: the prefill's argmax, then one per step; seconds of the new_tokens steps)."""
        L = self.L
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        prompt = (L.llama_token * len(ids))(*ids)
        if L.llama_decode(self.ctx, L.llama_batch_get_one(prompt, len(ids))):
            raise RuntimeError("llama_decode failed on the prompt")
        tok = L.llama_sampler_sample(self.sampler, self.ctx, -1)
        out, one = [tok], (L.llama_token * 1)()
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            one[0] = tok
            if L.llama_decode(self.ctx, L.llama_batch_get_one(one, 1)):
                raise RuntimeError("llama_decode failed")
            tok = L.llama_sampler_sample(self.sampler, self.ctx, -1)
            out.append(tok)
        return out, time.perf_counter() - t0

    def close(self) -> None:
        self.L.llama_sampler_free(self.sampler)
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)


def _llama_args(ids: list[int], new_tokens: int) -> tuple[int, int]:
    """(n_ctx, n_batch): room for the prompt and the new tokens; the prompt in one batch."""
    return len(ids) + new_tokens + 8, max(len(ids), 8)


# ---- dbrx -------------------------------------------------------------------------------------------------------
def _ours_greedy(model, ids: list[int], new_tokens: int, step=None) -> tuple[list[int], float]:
    from dbrx.bench import decode_greedy

    toks, seconds = decode_greedy(model, torch.tensor([ids]), new_tokens, step)
    return toks[0].tolist(), seconds


def _load_float(ckpt: Path):
    from dbrx import DbrxForCausalLM

    return DbrxForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


def _weight_bytes(model) -> int:
    from dbrx.bench import decode_weight_bytes

    return decode_weight_bytes(model, 1)["weight_bytes"]


# ---- peak memory in a child process -----------------------------------------------------------------------------
def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _peak_memory(kind: str, path: str, ids: list[int], new_tokens: int, threads: int) -> dict:
    """In a fresh process: peak RSS above the post-import baseline of loading `path` and one greedy run."""
    torch.set_num_threads(threads)
    if kind == "llama.cpp":
        import llama_cpp  # noqa: F401  (imported before the baseline, as torch is)
    else:
        from dbrx.bench import decode_greedy  # noqa: F401
        from dbrx.loading import load_pretrained
    gc.collect()
    base = _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        how = "VmHWM after clear_refs"
    except OSError:
        how = "VmHWM since start (clear_refs not writable)"
    if kind == "llama.cpp":
        llm = LlamaCpp(Path(path), *_llama_args(ids, new_tokens), threads)
        toks, _ = llm.greedy(ids, new_tokens)
    else:
        model = load_pretrained(path, device="cpu", dtype=torch.float32)
        toks, _ = _ours_greedy(model, ids, new_tokens)
    return dict(peak_mb=(_status_kb("VmHWM") - base) / 1024, after_mb=(_status_kb("VmRSS") - base) / 1024,
                how=how, tokens=toks)


def _in_child(*args) -> dict:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        return ex.submit(_peak_memory, *args).result()


# ---- the run ----------------------------------------------------------------------------------------------------
def agree(a: list[int], b: list[int]) -> int:
    """Length of the common prefix."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _prepare(args, work: Path) -> tuple[Path, dict, dict]:
    """(float checkpoint, GGUF type -> (file, f16 fallback list), bits -> quantized checkpoint); reused when present
    in --workdir."""
    from dbrx import DbrxConfig, DbrxForCausalLM
    from dbrx.config import parse_overrides
    from dbrx.gguf_export import export_gguf
    from dbrx.quant import quantize_checkpoint

    if args.model:
        ckpt = Path(args.model)
    else:
        ckpt = work / "model"
        if not (ckpt / "config.json").exists():
            cfg = DbrxConfig.from_preset(args.preset, **parse_overrides(args.override or []))
            DbrxForCausalLM.from_config(cfg, seed=args.seed).save_pretrained(ckpt, dtype=torch.float32)
    ggufs = {}
    for t in args.types:
        f = work / f"model-{t}.gguf"
        meta = work / f"model-{t}.gguf.json"
        if not (f.exists() and meta.exists()):
            print(f"exporting {f.name} ...", file=sys.stderr, flush=True)
            meta.write_text(json.dumps(export_gguf(ckpt, f, t)["f16_fallback"]))
        ggufs[t] = (f, json.loads(meta.read_text()))
    quantized = {}
    if args.memory:
        for bits, group in ((8, None), (4, INT4_GROUP)):
            q = work / f"model-int{bits}"
            if not (q / "config.json").exists():
                print(f"writing {q.name} (dbrx quantize) ...", file=sys.stderr, flush=True)
                quantize_checkpoint(ckpt, q, bits, group, QUANT_TARGETS)
            quantized[bits] = q
    return ckpt, ggufs, quantized


def run(args, work: Path) -> dict:
    from dbrx.bench import compiled_decode_step
    from dbrx.loading import cpu_decoding_layout
    from dbrx.quant import quantize_model
    from dbrx.tokenizer import get_tokenizer

    torch.set_num_threads(args.threads)
    ckpt, ggufs, quantized = _prepare(args, work)
    ids = get_tokenizer().encode(args.prompt)
    n = args.new_tokens

    memory = {}
    if args.memory:  # before any model is loaded here
        jobs = {"dbrx fp32": ("dbrx", ckpt), "dbrx int8": ("dbrx", quantized[8]),
                f"dbrx int4 g{INT4_GROUP}": ("dbrx", quantized[4])}
        jobs.update({f"llama.cpp {t}": ("llama.cpp", f) for t, (f, _) in ggufs.items()})
        for name, (kind, path) in jobs.items():
            print(f"peak memory: {name} ...", file=sys.stderr, flush=True)
            memory[name] = _in_child(kind, str(path), ids, n, args.threads)

    contenders, info = {}, {}
    fp32 = _load_float(ckpt)
    if fp32.config.max_seq_len < len(ids) + n + 1:
        raise SystemExit(f"prompt ({len(ids)} tokens) + --new-tokens exceeds max_seq_len {fp32.config.max_seq_len}")
    contenders["dbrx fp32"] = lambda: _ours_greedy(fp32, ids, n)
    info["dbrx fp32"] = dict(weight_mb=_weight_bytes(fp32) / 2**20)
    if args.compile:
        step = compiled_decode_step(fp32)
        contenders["dbrx fp32 compiled"] = lambda: _ours_greedy(fp32, ids, n, step)
        info["dbrx fp32 compiled"] = dict(info["dbrx fp32"])
    if args.transformers:
        import transformers

        from dbrx.bench import _hf_greedy, transformers_model

        hf = transformers_model(fp32, torch.device("cpu"), torch.float32).eval()

        def theirs():
            toks, seconds = _hf_greedy(hf, torch.tensor([ids]), n)
            return toks[0].tolist(), seconds

        contenders["transformers fp32"] = theirs
        info["transformers fp32"] = dict(version=transformers.__version__)
    cpu_decoding_layout(fp32)  # as load_pretrained does on the CPU (after transformers got its own copy of the weights)
    for bits, group in ((8, None), (4, INT4_GROUP)):
        name = "dbrx int8" if bits == 8 else f"dbrx int4 g{INT4_GROUP}"
        q = quantize_model(_load_float(ckpt), bits, group, QUANT_TARGETS)
        gc.collect()
        contenders[name] = lambda q=q: _ours_greedy(q, ids, n)
        info[name] = dict(weight_mb=_weight_bytes(q) / 2**20, quantization=q.quantization.to_json())
        if args.compile:
            contenders[name + " compiled"] = lambda q=q, step=compiled_decode_step(q): _ours_greedy(q, ids, n, step)
            info[name + " compiled"] = dict(info[name])
    llamas = {}
    for t, (f, fallback) in ggufs.items():
        llm = llamas[t] = LlamaCpp(f, *_llama_args(ids, n), args.threads)
        contenders[f"llama.cpp {t}"] = lambda llm=llm: llm.greedy(ids, n)
        info[f"llama.cpp {t}"] = dict(weight_mb=llm.weight_bytes / 2**20, file_mb=f.stat().st_size / 2**20,
                                      f16_fallback=fallback, tokenizer_agrees=llm.tokenize(args.prompt) == ids,
                                      flash_attn_type=llm.flash_attn_type, kv_type=llm.type_k)

    print(f"warm-up round, then {args.rounds} alternating rounds of {len(contenders)} contenders ...",
          file=sys.stderr, flush=True)
    times: dict[str, list[float]] = {k: [] for k in contenders}
    tokens = {}
    load = [round(x, 2) for x in os.getloadavg()]
    for r in range(args.rounds + 1):
        if r:
            print(f"round {r}/{args.rounds} ...", file=sys.stderr, flush=True)
        for name, fn in contenders.items():
            tokens[name], seconds = fn()
            if r:
                times[name].append(seconds)
    for llm in llamas.values():
        llm.close()

    ref = tokens["dbrx fp32"]
    results = {}
    for name in contenders:
        med = statistics.median(times[name])
        results[name] = dict(tok_s=n / med, ms_per_step=med / n * 1e3, seconds=times[name],
                             agree_prefix=agree(tokens[name], ref),
                             agree_share=sum(a == b for a, b in zip(tokens[name], ref)) / len(ref),
                             **info[name], tokens=tokens[name])
        if name in memory:
            m = memory.pop(name)
            results[name].update(peak_rss_mb=m["peak_mb"], rss_after_mb=m["after_mb"], memory_how=m["how"])
            if name.startswith("dbrx"):  # the checkpoint `dbrx quantize` writes runs as quantize_model does
                results[name]["checkpoint_same_tokens"] = m["tokens"] == tokens[name]
    pairs = []
    for ours, theirs, target in [(o + c, t, x) for o, t, x in PAIRS for c in ("", " compiled")]:
        if ours in results and theirs in results:
            ratio = results[ours]["tok_s"] / results[theirs]["tok_s"]
            pairs.append(dict(ours=ours, theirs=theirs, ratio=ratio, target=target, met=ratio >= target))
    import llama_cpp

    return dict(
        model=str(ckpt) if args.model else dict(preset=args.preset, overrides=args.override or [], seed=args.seed),
        threads=args.threads, prompt_tokens=len(ids), new_tokens=n, rounds=args.rounds,
        date=datetime.date.today().isoformat(), machine=platform.processor() or platform.machine(),
        torch=torch.__version__, llama_cpp_python=llama_cpp.__version__,
        llama_cpp_system=llama_cpp.llama_print_system_info().decode().strip(),
        load_average_before_after=[load, [round(x, 2) for x in os.getloadavg()]], int4_group_size=INT4_GROUP,
        quant_targets=list(QUANT_TARGETS), results=results, pairs=pairs)


def print_table(report: dict) -> None:
    n = report["new_tokens"]
    p = sys.stderr
    print(f"\nthreads {report['threads']}, {report['prompt_tokens']}-token prompt, {n} new tokens, median of "
          f"{report['rounds']} alternating rounds", file=p)
    print(f"{'':22} {'tok/s':>8} {'ms/step':>8} {'agree':>7} {'same':>5} {'weights MB':>10} {'peak RSS MB':>11}",
          file=p)
    for name, r in report["results"].items():
        peak = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "-"
        wmb = f"{r['weight_mb']:.0f}" if "weight_mb" in r else "-"
        print(f"{name:22} {r['tok_s']:8.1f} {r['ms_per_step']:8.2f} {r['agree_prefix']:>3}/{n + 1:<3} "
              f"{r['agree_share']:5.2f} {wmb:>10} {peak:>11}", file=p)
    for q in report["pairs"]:
        print(f"{q['ours']} / {q['theirs']}: {q['ratio']:.2f}x (target {q['target']}x: "
              f"{'met' if q['met'] else 'NOT met'})", file=p)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: a random --preset model)")
    ap.add_argument("--preset", default="dbrx-demo", help="preset of the random model (default dbrx-demo)")
    ap.add_argument("--override", action="append", metavar="KEY=VALUE", help="config override of the random model")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random model")
    ap.add_argument("--types", default=",".join(TYPES), help=f"GGUF types for llama.cpp (default {','.join(TYPES)})")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up (median reported)")
    ap.add_argument("--compile", action="store_true", help="add dbrx fp32, int8 and int4 with the decode step compiled")
    ap.add_argument("--no-transformers", dest="transformers", action="store_false", help="skip transformers")
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory children")
    ap.add_argument("--workdir", default=None, metavar="DIR",
                    help="keep the random checkpoint, GGUF files and quantized checkpoints here and reuse them "
                         "(default: a temporary directory)")
    ap.add_argument("--out", default=None, metavar="FILE", help="also write the JSON report here")
    args = ap.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError, RuntimeError) as e:  # OSError, RuntimeError: no llama.cpp shared library
        print(f"skipped: llama_cpp is not importable ({e}); pip install llama-cpp-python, or see this script's "
              f"docstring for a llama.cpp built with cmake; nothing was run", file=sys.stderr)
        return 0
    args.types = [t.strip() for t in args.types.split(",") if t.strip()]
    bad = [t for t in args.types if t not in TYPES]
    if bad:
        ap.error(f"unknown type {bad[0]!r}; choose from {', '.join(TYPES)}")
    if args.model and args.override:
        ap.error("--override applies to the random --preset model, not to --model")
    for name in ("new_tokens", "threads", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    with tempfile.TemporaryDirectory(prefix="gguf-bench-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        report = run(args, work)
    print_table(report)
    text = json.dumps(report)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
