"""Gauntlet scoring (as the Databricks Model Gauntlet): each task's accuracy rescaled above its random baseline,
averaged per category and overall; the results file, a terminal table, a bar chart, and the comparison of two runs.

    rescaled = (accuracy - baseline) / (1 - baseline)      0 = chance, 1 = perfect (negative: below chance)
    category = mean of its tasks' rescaled scores
    overall  = mean of the categories (each category weighs the same, whatever its number of tasks)

Imports: nothing from dbrx (matplotlib, lazily, for the chart).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping

CATEGORIES = ("world_knowledge", "commonsense_reasoning", "language_understanding", "symbolic_problem_solving",
              "reading_comprehension", "programming")
FORMAT = "dbrx-eval-results/1"


def rescale(accuracy: float, baseline: float) -> float:
    if not 0 <= baseline < 1:
        raise ValueError(f"a random baseline must be in [0, 1), got {baseline}")
    return (accuracy - baseline) / (1 - baseline)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _category_order(names) -> list[str]:
    return [c for c in CATEGORIES if c in names] + sorted(set(names) - set(CATEGORIES))


def score(tasks: Mapping[str, Mapping], errors: Mapping[str, str] | None = None, meta: Mapping | None = None) -> dict:
    """Task results (label -> {"accuracy", "random_baseline", "category", ...}) -> the results document:
    {"format", "meta", "tasks" (each with "rescaled"), "categories" (name -> {"score", "tasks"}), "overall",
    "errors"}. Tasks whose accuracy is NaN (no items) count in no average."""
    out_tasks, by_cat = {}, {}
    for label, r in tasks.items():
        r = dict(r)
        acc = r["accuracy"]
        r["rescaled"] = rescale(acc, r.get("random_baseline", 0.0)) if not math.isnan(acc) else math.nan
        cat = r.setdefault("category", "uncategorized")
        out_tasks[label] = r
        if not math.isnan(r["rescaled"]):
            by_cat.setdefault(cat, []).append(label)
    categories = {c: {"score": _mean([out_tasks[t]["rescaled"] for t in by_cat[c]]), "tasks": by_cat[c]}
                  for c in _category_order(by_cat)}
    return {"format": FORMAT, "meta": dict(meta or {}), "tasks": out_tasks, "categories": categories,
            "overall": _mean([c["score"] for c in categories.values()]), "errors": dict(errors or {})}


# ---- files -----------------------------------------------------------------------------------------------------
def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def save_results(results: Mapping, path: str | os.PathLike) -> None:
    """Write the results document as JSON (NaN as null), atomically (a temporary file renamed into place)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".results-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_json_safe(results), f, indent=2, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _num(x) -> float:
    return math.nan if x is None else float(x)


def load_results(path: str | os.PathLike) -> dict:
    """A results document written by save_results; ValueError naming the file when it is not one."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("tasks"), dict):
        raise ValueError(f"{path}: not a `dbrx eval` results file (format {FORMAT})")
    for r in doc["tasks"].values():
        r["accuracy"], r["rescaled"] = _num(r.get("accuracy")), _num(r.get("rescaled"))
    for c in doc.get("categories", {}).values():
        c["score"] = _num(c.get("score"))
    doc["overall"] = _num(doc.get("overall"))
    return doc


# ---- the table, the comparison -----------------------------------------------------------------------------------
def _f(x: float, signed: bool = False) -> str:
    return "   -  " if x is None or math.isnan(x) else (f"{x:+.3f}" if signed else f"{x:6.3f}")


def format_table(results: Mapping) -> str:
    """Tasks grouped by category (accuracy, baseline, rescaled), category scores and the overall score."""
    tasks = results["tasks"]
    w = max([len(t) for t in tasks] + [len(c) for c in results["categories"]] + [24]) + 2
    lines = [f"{'task':<{w}}{'shots':>6}{'n':>6}{'accuracy':>10}{'baseline':>10}{'rescaled':>10}"]
    for cat in _category_order({r["category"] for r in tasks.values()}):
        lines.append(f"[{cat}]")
        for label, r in tasks.items():
            if r["category"] == cat:
                lines.append(f"  {label:<{w - 2}}{r.get('num_fewshot', 0):>6}{r.get('n', 0):>6}"
                             f"{_f(r['accuracy']):>10}{r.get('random_baseline', 0.0):>10.3f}{_f(r['rescaled']):>10}")
    lines.append("")
    for cat, c in results["categories"].items():
        lines.append(f"{cat:<{w}}{'':>32}{_f(c['score']):>10}")
    lines.append(f"{'overall':<{w}}{'':>32}{_f(results['overall']):>10}")
    for label, err in results.get("errors", {}).items():
        lines.append(f"{label}: failed: {err}")
    return "\n".join(lines)


def compare(a: Mapping, b: Mapping, name_a: str = "A", name_b: str = "B") -> str:
    """A table of every task, category and the overall score in both runs, with B - A."""
    w = max([len(t) for t in {*a["tasks"], *b["tasks"]}] + [24]) + 2
    lines = [f"{'':<{w}}{name_a[-12:]:>12}{name_b[-12:]:>12}{'B - A':>10}", "rescaled accuracy by task:"]

    def row(name, x, y):
        d = y - x if not (math.isnan(x) or math.isnan(y)) else math.nan
        lines.append(f"  {name:<{w - 2}}{_f(x):>12}{_f(y):>12}{_f(d, signed=True):>10}")

    for t in list(a["tasks"]) + [t for t in b["tasks"] if t not in a["tasks"]]:
        row(t, a["tasks"].get(t, {}).get("rescaled", math.nan), b["tasks"].get(t, {}).get("rescaled", math.nan))
    lines.append("categories:")
    for c in _category_order({*a["categories"], *b["categories"]}):
        row(c, a["categories"].get(c, {}).get("score", math.nan), b["categories"].get(c, {}).get("score", math.nan))
    row("overall", a["overall"], b["overall"])
    return "\n".join(lines)


# ---- the chart -------------------------------------------------------------------------------------------------
def plot(runs: list[Mapping], path: str | os.PathLike, names: list[str] | None = None) -> None:
    """A PNG with two bar charts of rescaled accuracy: by category (and overall), and by task (coloured by
    category); several runs (e.g. bf16 and int4) as grouped bars."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("the chart needs matplotlib: pip install -e '.[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = names or [f"run {i + 1}" for i in range(len(runs))]
    cats = _category_order({c for r in runs for c in r["categories"]})
    tasks = [t for c in cats for r in runs[:1] for t in r["categories"].get(c, {}).get("tasks", [])]
    tasks += [t for r in runs[1:] for t in r["tasks"] if t not in tasks]
    colors = {c: plt.get_cmap("tab10")(i % 10) for i, c in enumerate(cats)}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(6 + 0.45 * len(tasks), 5), width_ratios=[len(cats) + 1,
                                                                                        max(1, len(tasks))])
    width = 0.8 / len(runs)

    def v(x):
        return 0.0 if x is None or math.isnan(x) else x

    for k, (run, name) in enumerate(zip(runs, names)):
        xs = [i + (k - (len(runs) - 1) / 2) * width for i in range(len(cats) + 1)]
        ys = [v(run["categories"].get(c, {}).get("score")) for c in cats] + [v(run["overall"])]
        ax1.bar(xs, ys, width, label=name, color=[colors[c] for c in cats] + ["0.3"], alpha=1 - 0.45 * k,
                edgecolor="black", linewidth=0.5)
        xs = [i + (k - (len(runs) - 1) / 2) * width for i in range(len(tasks))]
        ys = [v(run["tasks"].get(t, {}).get("rescaled")) for t in tasks]
        cs = [colors.get(run["tasks"].get(t, {}).get("category"), "0.5") for t in tasks]
        ax2.bar(xs, ys, width, color=cs, alpha=1 - 0.45 * k, edgecolor="black", linewidth=0.5)
    ax1.set_xticks(range(len(cats) + 1), [c.replace("_", " ") for c in cats] + ["overall"], rotation=35,
                   ha="right")
    ax2.set_xticks(range(len(tasks)), tasks, rotation=35, ha="right")
    for ax, title in ((ax1, "by category"), (ax2, "by task")):
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(title)
        ax.set_ylabel("rescaled accuracy (0 = chance)")
        ax.grid(axis="y", alpha=0.3)
    if len(runs) > 1:
        ax1.legend(title="darker = first")
    fig.suptitle("Gauntlet scores: " + " vs ".join(names))
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=110)
    plt.close(fig)


__all__ = ["CATEGORIES", "compare", "format_table", "load_results", "plot", "rescale", "save_results", "score"]
