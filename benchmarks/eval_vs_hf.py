"""lm-eval on the CPU: the `dbrx` adapter (dbrx.eval.harness.DbrxLM) against lm-eval's own `hf` model on the same
checkpoint (loaded by `transformers`, with the same tokenizer as a transformers object).

The tasks are written here, deterministically, as local lm-eval tasks (``dataset_path: json``) in a temporary folder:

    bench_mc    multiple choice, 2-shot: 160 one-line questions, 4 choices each (acc, acc_norm)
    bench_gen   generation until "\\n", at most 16 new tokens, 1-shot: 32 questions (exact_match)
    bench_ppl   rolling log-likelihood: 24 documents of 150-600 words (word/byte perplexity, bits per byte)

Each task runs through `lm_eval.evaluator.evaluate` with the dbrx model and with the hf model in turn (the order
alternating between repeats; the task objects are built before the clock starts), the median of `--repeats` runs is
reported, and the metrics of the two must agree (accuracies and exact match identical, perplexities within 1e-5
relative). Both run in fp32 with the same batch size and torch thread count. Prints a table to stderr and one JSON
object to stdout.

    python benchmarks/eval_vs_hf.py                      # runs/demo/final when it exists, else a fresh dbrx-demo
    python benchmarks/eval_vs_hf.py --model DIR --repeats 5 --threads 2 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "runs" / "demo" / "final"

# ---- the tasks ----------------------------------------------------------------------------------------------------
_NOUNS = ["river", "lantern", "orchard", "harbour", "meadow", "engine", "library", "garden", "mountain", "kitchen",
          "window", "forest", "bridge", "market", "island", "violin", "tractor", "candle", "village", "compass"]
_ADJ = ["quiet", "bright", "ancient", "narrow", "golden", "heavy", "gentle", "crowded", "distant", "frozen"]
_VERBS = ["carried", "painted", "watched", "repaired", "followed", "visited", "counted", "described", "found", "built"]
_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
            "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]


def _sentence(rng: random.Random) -> str:
    return (f"The {rng.choice(_ADJ)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} the {rng.choice(_ADJ)} "
            f"{rng.choice(_NOUNS)} near the {rng.choice(_NOUNS)}.")


def write_tasks(folder: Path, n_mc: int = 160, n_gen: int = 32, n_ppl: int = 24, seed: int = 0) -> list[str]:
    """The three tasks' JSONL data and YAML configs in `folder`; returns the task names."""
    rng = random.Random(seed)
    mc, gen, ppl = [], [], []
    for i in range(n_mc):
        a, b = rng.randrange(10), rng.randrange(11)
        right = _NUMBERS[a + b]
        wrong = rng.sample([w for w in _NUMBERS if w != right], 3)
        choices = [right, *wrong]
        rng.shuffle(choices)
        if i % 2:  # some longer choices, so that sum, per-token and per-character rules differ
            choices = [f"{c} {rng.choice(_NOUNS)}s in the {rng.choice(_ADJ)} {rng.choice(_NOUNS)}" for c in choices]
        mc.append({"question": f"What is {_NUMBERS[a]} plus {_NUMBERS[b]}? {_sentence(rng)}", "choices": choices,
                   "gold": choices.index(next(c for c in choices if c.split()[0] == right))})
    for _ in range(n_gen):
        a, b = rng.randrange(10), rng.randrange(11)
        gen.append({"question": f"{_sentence(rng)} What is {_NUMBERS[a]} plus {_NUMBERS[b]}?",
                    "answer": _NUMBERS[a + b]})
    for _ in range(n_ppl):
        words = rng.randint(150, 600)
        text, count = [], 0
        while count < words:
            s = _sentence(rng)
            text.append(s)
            count += len(s.split())
        ppl.append({"text": " ".join(text)})
    for name, rows in (("mc", mc), ("gen", gen), ("ppl", ppl)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
    (folder / "bench_mc.yaml").write_text(
        "task: bench_mc\n" + common.format(path=folder / "mc.jsonl") +
        "fewshot_split: test\nnum_fewshot: 2\noutput_type: multiple_choice\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_choice: choices\ndoc_to_target: gold\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\nmetadata:\n  version: 1.0\n")
    (folder / "bench_gen.yaml").write_text(
        "task: bench_gen\n" + common.format(path=folder / "gen.jsonl") +
        "fewshot_split: test\nnum_fewshot: 1\noutput_type: generate_until\n"
        "doc_to_text: \"Q: {{question}}\\nA:\"\ndoc_to_target: answer\ntarget_delimiter: \" \"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 16\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n")
    (folder / "bench_ppl.yaml").write_text(
        "task: bench_ppl\n" + common.format(path=folder / "ppl.jsonl") +
        "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
        "metadata:\n  version: 1.0\n")
    return ["bench_mc", "bench_gen", "bench_ppl"]


# ---- running ------------------------------------------------------------------------------------------------------
def _checkpoint(model: str | None, work: Path) -> Path:
    if model is not None:
        return Path(model)
    if (DEMO / "config.json").is_file():
        return DEMO
    from dbrx.cli import main

    path = work / "dbrx-demo"
    if main(["init", "--preset", "dbrx-demo", str(path), "--seed", "0"]) != 0:
        raise SystemExit("dbrx init failed")
    return path


def _run(lm, task: str, manager, seed: int = 1234) -> tuple[float, dict]:
    """One task through lm-eval's evaluator: (seconds, metrics). The task object is built before the clock starts."""
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import get_task_dict

    with warnings.catch_warnings():  # get_task_dict: deprecated in favour of TaskManager.load, whose result differs
        warnings.simplefilter("ignore", DeprecationWarning)
        task_dict = get_task_dict([task], manager)
    for t in task_dict.values():
        t.set_fewshot_seed(seed=seed)
    start = time.perf_counter()
    out = evaluate(lm=lm, task_dict=task_dict, bootstrap_iters=0, log_samples=False, verbosity="ERROR")
    seconds = time.perf_counter() - start
    metrics = {k.split(",")[0]: v for k, v in out["results"][task].items()
               if "," in k and not k.split(",")[0].endswith("_stderr")}
    return seconds, metrics


def _same(task: str, a: dict, b: dict) -> list[str]:
    problems = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if not isinstance(x, float | int) or not isinstance(y, float | int):
            problems.append(f"{task} {k}: {x!r} vs {y!r}")
        elif "perplexity" in k or "bits_per_byte" in k:
            if not math.isclose(x, y, rel_tol=1e-5):
                problems.append(f"{task} {k}: {x} vs {y}")
        elif x != y:
            problems.append(f"{task} {k}: {x} vs {y}")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help=f"a dbrx checkpoint directory (default: {DEMO} when it exists, else a fresh "
                                    "`dbrx init --preset dbrx-demo`)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads, for both (default 1)")
    ap.add_argument("--batch-size", type=int, default=16, help="rows per batch, for both (default 16)")
    ap.add_argument("--tasks", default="bench_mc,bench_gen,bench_ppl")
    ap.add_argument("--tokenizer-cache", default=str(Path.home() / ".cache" / "dbrx" / "hf_tokenizer"),
                    help="where the transformers form of the tokenizer is kept between runs")
    args = ap.parse_args()

    import datasets
    import torch
    import transformers
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from dbrx.eval.harness import DbrxLM, transformers_tokenizer

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        datasets.config.HF_DATASETS_CACHE = work / "datasets_cache"
        (work / "tasks").mkdir()
        names = write_tasks(work / "tasks")
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not set(tasks) <= set(names):
            raise SystemExit(f"--tasks: choose from {', '.join(names)}")
        ckpt = _checkpoint(args.model, work)
        manager = TaskManager(include_path=str(work / "tasks"), include_defaults=False)
        t0 = time.perf_counter()
        ours = DbrxLM(pretrained=str(ckpt), device="cpu", dtype="fp32", batch_size=args.batch_size)
        load_ours = time.perf_counter() - t0
        tokenizer = transformers_tokenizer(args.tokenizer_cache)
        t0 = time.perf_counter()
        hf_model = transformers.DbrxForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
        ref = HFLM(pretrained=hf_model, tokenizer=tokenizer, batch_size=args.batch_size,
                   max_length=ours.max_length, device="cpu")
        load_hf = time.perf_counter() - t0
        print(f"checkpoint {ckpt}: {sum(p.numel() for p in ours.model.parameters()) / 1e6:.1f} M parameters, "
              f"max_seq_len {ours.max_length}; threads {args.threads}, batch size {args.batch_size}",
              file=sys.stderr)
        for t in tasks:  # warm-up (one run each, not timed): datasets' cache, lazy imports, first allocations
            _run(ours, t, manager)
            _run(ref, t, manager)
        times: dict[str, dict[str, list[float]]] = {t: {"dbrx": [], "hf": []} for t in tasks}
        metrics: dict[str, dict[str, dict]] = {t: {} for t in tasks}
        for r in range(args.repeats):
            order = [("dbrx", ours), ("hf", ref)] if r % 2 == 0 else [("hf", ref), ("dbrx", ours)]
            for t in tasks:
                for name, lm in order:
                    s, m = _run(lm, t, manager)
                    times[t][name].append(s)
                    metrics[t][name] = m
                    print(f"  run {r + 1}/{args.repeats} {t:<10} {name:<5} {s:8.2f} s", file=sys.stderr)
    problems = [p for t in tasks for p in _same(t, metrics[t]["dbrx"], metrics[t]["hf"])]
    med = {t: {k: statistics.median(v) for k, v in times[t].items()} for t in tasks}
    total = {k: sum(med[t][k] for t in tasks) for k in ("dbrx", "hf")}
    rows = [(t, med[t]["dbrx"], med[t]["hf"]) for t in tasks] + [("total", total["dbrx"], total["hf"])]
    print(f"\n{'task':<10} {'dbrx s':>9} {'hf s':>9} {'hf/dbrx':>8}", file=sys.stderr)
    for t, a, b in rows:
        print(f"{t:<10} {a:9.2f} {b:9.2f} {b / a:7.2f}x", file=sys.stderr)
    print("metrics identical" if not problems else "METRICS DIFFER:\n  " + "\n  ".join(problems), file=sys.stderr)
    print(json.dumps({
        "checkpoint": str(ckpt), "threads": args.threads, "batch_size": args.batch_size, "repeats": args.repeats,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "lm_eval": __import__("lm_eval").__version__, "load_seconds": {"dbrx": load_ours, "hf": load_hf},
        "median_seconds": med, "total_seconds": total, "ratio_hf_over_dbrx": total["hf"] / total["dbrx"],
        "ratio_per_task": {t: med[t]["hf"] / med[t]["dbrx"] for t in tasks}, "metrics": metrics,
        "metrics_identical": not problems, "differences": problems}, indent=2))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
