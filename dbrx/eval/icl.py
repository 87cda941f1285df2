"""In-context-learning tasks in llm-foundry's formats: JSONL items, few-shot prompts, a YAML list of tasks, scoring.

Task types and the fields of their JSONL items:

    language_modeling             context, continuation        correct when every continuation token is greedy
    multiple_choice               query, choices, gold         the choice with the lowest mean per-token loss wins
    schema                        context_options, continuation, gold
                                                               partial scoring: the continuation scored after
                                                               each context; the lowest mean loss wins
    generation_task_with_answers  context, answer, [aliases, chain_of_thought]
                                                               greedy generation until an early-stopping string;
                                                               after the last cot_delimiter when one is set;
                                                               exact match (after normalisation) with any answer
    code_evaluation               prompt, test, entry_point, [canonical_solution]
                                                               greedy completion; prompt + completion + test +
                                                               `check(entry_point)` must pass in the sandbox

Prompts follow llm-foundry: `prompt_string`, then the few-shot examples (each its context, the
`continuation_delimiter` and its answer, joined by `example_delimiter`), then the item's context and the
continuation delimiter. Few-shot examples are drawn with a fixed seed (`fewshot_random_seed`) from the other
items of the same file, never the item itself. Context and continuation are tokenized separately; whitespace at
the end of the continuation delimiter moves to the start of the continuation (" Paris", as BPE tokenizes text).

A YAML file lists the tasks (`icl_tasks:`, as llm-foundry's), each with `label`, `dataset_uri` (relative to the
YAML file), `icl_task_type`, `num_fewshot` (an int or a list: one entry per value), and this project's
`category` and `random_baseline` (or llm-foundry's `eval_gauntlet:` section, whose benchmarks set them).
Every malformed file is reported in one line naming the file and line; a task whose items are bad or whose
icl_task_type is unknown fails alone (`check_tasks`, `run_tasks`): the other tasks still run and keep their scores.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml
from torch import nn

from . import scoring

TASK_TYPES: dict[str, tuple[str, ...]] = {  # required fields of each type's items
    "language_modeling": ("context", "continuation"),
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "generation_task_with_answers": ("context", "answer"),
    "code_evaluation": ("prompt", "test", "entry_point"),
}
CODE_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")  # HumanEval's usual stop strings
DEMO_YAML = Path(__file__).resolve().parent.parent / "data" / "eval" / "demo.yaml"


# ---- the task list ---------------------------------------------------------------------------------------------
@dataclass
class TaskSpec:
    label: str
    dataset_uri: str  # an absolute path once loaded
    icl_task_type: str
    num_fewshot: int = 0
    category: str = "uncategorized"
    random_baseline: float = 0.0
    prompt_string: str = ""
    example_delimiter: str = "\n"
    continuation_delimiter: str = " "
    question_prelimiter: str = ""
    cot_delimiter: str = ""
    early_stopping_criteria: list[str] | None = None  # generation stops before any of these (default: "\n")
    do_normalization: bool = True
    max_new_tokens: int = 32
    fewshot_random_seed: int = 1234
    timeout_s: float = 5.0  # code_evaluation: per program
    source: str = ""  # "file:line" of the task's entry, for messages
    error: str = ""  # why the task cannot run (an unknown icl_task_type): it fails alone, the others still run

    @property
    def stops(self) -> list[str]:
        if self.early_stopping_criteria is not None:
            return list(self.early_stopping_criteria)
        return list(CODE_STOPS) if self.icl_task_type == "code_evaluation" else ["\n"]


class _LineLoader(yaml.SafeLoader):
    """Safe YAML that records each mapping's line (as `__line__`) for error messages."""

    def construct_mapping(self, node, deep=False):
        mapping = super().construct_mapping(node, deep)
        mapping["__line__"] = node.start_mark.line + 1
        return mapping


_SPEC_FIELDS = {f.name: f for f in fields(TaskSpec) if f.name not in ("source", "error")}
_TYPES = {"str": str, "int": int, "float": (int, float), "bool": bool}


def _check_field(where: str, name: str, value):
    kind = str(_SPEC_FIELDS[name].type)
    if name == "early_stopping_criteria":
        if value is not None and (not isinstance(value, list) or not all(isinstance(s, str) and s for s in value)):
            raise ValueError(f"{where}: early_stopping_criteria must be a list of non-empty strings")
        return value
    expected = _TYPES[kind.split(" ")[0]]
    if isinstance(value, bool) and kind != "bool" or not isinstance(value, expected):
        raise ValueError(f"{where}: {name} must be a {kind}, got {value!r}")
    if name == "random_baseline" and not 0 <= value < 1:
        raise ValueError(f"{where}: random_baseline must be in [0, 1), got {value!r}")
    if name in ("max_new_tokens",) and value < 1 or name in ("timeout_s",) and not value > 0:
        raise ValueError(f"{where}: {name} must be positive, got {value!r}")
    return value


def load_task_file(path: str | os.PathLike) -> list[TaskSpec]:
    """The tasks a YAML file lists (checked, datasets not read yet); ValueError naming the file and line."""
    path = Path(path)
    try:
        doc = yaml.load(path.read_text(), Loader=_LineLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ValueError(f"{path}{f':{mark.line + 1}' if mark else ''}: not valid YAML "
                         f"({getattr(e, 'problem', None) or e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("icl_tasks"), list) or not doc["icl_tasks"]:
        raise ValueError(f"{path}: expected a mapping with a non-empty `icl_tasks:` list")
    specs: list[TaskSpec] = []
    for entry in doc["icl_tasks"]:
        line = entry.get("__line__", "?") if isinstance(entry, dict) else "?"
        where = f"{path}:{line}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: each task must be a mapping")
        entry = {k: v for k, v in entry.items() if k != "__line__"}
        unknown = sorted(set(entry) - set(_SPEC_FIELDS) - {"metric_names", "has_categories"})
        if unknown:
            raise ValueError(f"{where}: unknown task field(s) {', '.join(unknown)} (known: {', '.join(_SPEC_FIELDS)})")
        for name in ("label", "dataset_uri", "icl_task_type"):
            if not isinstance(entry.get(name), str) or not entry[name]:
                raise ValueError(f"{where}: the task needs `{name}` (a string)")
        error = "" if entry["icl_task_type"] in TASK_TYPES else (
            f"{where}: unknown icl_task_type {entry['icl_task_type']!r} (known: {', '.join(TASK_TYPES)})")
        shots = entry.pop("num_fewshot", 0)
        shots = shots if isinstance(shots, list) else [shots]
        if not shots or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in shots):
            raise ValueError(f"{where}: num_fewshot must be a non-negative integer or a list of them")
        kwargs = {k: _check_field(where, k, v) for k, v in entry.items() if k in _SPEC_FIELDS}
        uri = Path(kwargs["dataset_uri"])
        kwargs["dataset_uri"] = str(uri if uri.is_absolute() else path.parent / uri)
        for k in shots:
            label = kwargs["label"] if len(shots) == 1 else f"{kwargs['label']}/{k}-shot"
            specs.append(TaskSpec(**{**kwargs, "label": label, "num_fewshot": k}, source=where, error=error))
    _apply_gauntlet_section(path, doc.get("eval_gauntlet"), specs)
    seen = set()
    for s in specs:
        if s.label in seen:
            raise ValueError(f"{s.source}: task label {s.label!r} appears twice")
        seen.add(s.label)
    return specs


def _apply_gauntlet_section(path: Path, section, specs: list[TaskSpec]) -> None:
    """llm-foundry's `eval_gauntlet: {categories: [{name, benchmarks: [{name, num_fewshot, random_baseline}]}]}`
    sets the category and baseline of the tasks it names."""
    if section is None:
        return
    cats = section.get("categories") if isinstance(section, dict) else None
    if not isinstance(cats, list):
        raise ValueError(f"{path}: eval_gauntlet needs a `categories:` list")
    for cat in cats:
        where = f"{path}:{cat.get('__line__', '?') if isinstance(cat, dict) else '?'}"
        if not isinstance(cat, dict) or not isinstance(cat.get("name"), str) or not isinstance(
                cat.get("benchmarks"), list):
            raise ValueError(f"{where}: each category needs a `name` and a `benchmarks` list")
        for b in cat["benchmarks"]:
            if not isinstance(b, dict) or not isinstance(b.get("name"), str):
                raise ValueError(f"{where}: each benchmark needs a `name`")
            base = _check_field(f"{path}:{b.get('__line__', '?')}", "random_baseline", b.get("random_baseline", 0.0))
            for s in specs:
                if s.label.split("/")[0] == b["name"] and b.get("num_fewshot", s.num_fewshot) == s.num_fewshot:
                    s.category, s.random_baseline = cat["name"], float(base)


def select_tasks(spec: str) -> list[TaskSpec]:
    """Comma-separated parts, each `demo` (the bundled set), a YAML file, or the name of a bundled task."""
    bundled = {s.label: s for s in load_task_file(DEMO_YAML)}
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    specs: list[TaskSpec] = []
    for part in parts:
        if part == "demo":
            specs += bundled.values()
        elif part.endswith((".yaml", ".yml")) or os.path.sep in part:
            if not os.path.isfile(part):
                raise ValueError(f"{part}: no such task file")
            specs += load_task_file(part)
        elif part in bundled:
            specs.append(bundled[part])
        else:
            raise ValueError(f"unknown task {part!r} (known: demo, {', '.join(bundled)}, or a YAML file)")
    if not specs:
        raise ValueError(f"no tasks in {spec!r} (known: demo, {', '.join(bundled)}, or a YAML file)")
    labels = [s.label for s in specs]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise ValueError(f"task(s) {', '.join(twice)} selected twice")
    return specs


# ---- items -----------------------------------------------------------------------------------------------------
def _is_str_list(v, min_len: int = 1) -> bool:
    return isinstance(v, list) and len(v) >= min_len and all(isinstance(s, str) for s in v)


def _check_item(item: dict, task_type: str) -> str | None:
    """What is wrong with an item, or None."""
    need = TASK_TYPES[task_type]
    missing = [f for f in need if f not in item]
    if missing:
        return f"missing field(s) {', '.join(missing)} (a {task_type} item needs {', '.join(need)})"
    for f in ("context", "continuation", "query", "answer", "prompt", "test", "entry_point", "chain_of_thought"):
        if f in item and not isinstance(item[f], str):
            return f"field {f!r} must be a string"
    if task_type == "language_modeling" and not item["continuation"]:
        return "the continuation is empty"
    options = "choices" if task_type == "multiple_choice" else "context_options"
    if task_type in ("multiple_choice", "schema"):
        if not _is_str_list(item[options], 2) or not all(item[options]):
            return f"{options!r} must be a list of at least 2 non-empty strings"
        gold = item["gold"]
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(item[options]):
            return f"gold {gold!r} is out of range for {len(item[options])} {options}"
    if task_type == "generation_task_with_answers" and not _is_str_list(item.get("aliases", []), 0):
        return "'aliases' must be a list of strings"
    if task_type == "code_evaluation" and not item["entry_point"].isidentifier():
        return f"entry_point {item['entry_point']!r} is not a Python identifier"
    return None


def read_items(path: str | os.PathLike, task_type: str) -> list[dict]:
    """A task's JSONL items, checked: ValueError naming the file and line of the first bad one."""
    items = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(item, dict):
            raise ValueError(f"{path}:{n}: each line must be a JSON object")
        problem = _check_item(item, task_type)
        if problem:
            raise ValueError(f"{path}:{n}: {problem}")
        items.append(item)
    if not items:
        raise ValueError(f"{path}: no items (the file is empty)")
    return items


# ---- prompts ---------------------------------------------------------------------------------------------------
def fewshot_indices(n_items: int, shots: int, seed: int) -> list[list[int]]:
    """For each item, `shots` other items (fewer when the file is smaller), drawn with one seeded generator."""
    rng = random.Random(seed)
    k = min(shots, n_items - 1)
    return [rng.sample([j for j in range(n_items) if j != i], k) if k > 0 else [] for i in range(n_items)]


def _context_of(spec: TaskSpec, item: dict, gold_option: bool = True) -> str:
    t = spec.icl_task_type
    if t == "multiple_choice":
        return spec.question_prelimiter + item["query"]
    if t == "schema":
        return item["context_options"][item["gold"]] if gold_option else ""
    if t == "code_evaluation":
        return item["prompt"]
    return spec.question_prelimiter + item["context"]


def _answer_of(spec: TaskSpec, item: dict) -> str:
    t = spec.icl_task_type
    if t == "multiple_choice":
        return item["choices"][item["gold"]]
    if t == "generation_task_with_answers":
        cot = item.get("chain_of_thought", "")
        return f"{cot}{spec.cot_delimiter}{item['answer']}" if spec.cot_delimiter and cot else item["answer"]
    if t == "code_evaluation":
        return item.get("canonical_solution", "")
    return item["continuation"]


def _preamble(spec: TaskSpec, items: list[dict], shots: list[int]) -> str:
    """The prompt string and the few-shot examples, ending where the item's context starts."""
    text = spec.prompt_string
    for j in shots:
        ex = items[j]
        if spec.icl_task_type == "code_evaluation":
            example = ex["prompt"] + ex.get("canonical_solution", "")
        else:
            example = f"{_context_of(spec, ex)}{spec.continuation_delimiter}{_answer_of(spec, ex)}"
        text += (spec.example_delimiter if text else "") + example
    return text + (spec.example_delimiter if text else "")


def _split_delimiter(spec: TaskSpec) -> tuple[str, str]:
    """The continuation delimiter as (the context's end, the continuation's start): trailing whitespace moves."""
    d = spec.continuation_delimiter
    stripped = d.rstrip(" ")
    return stripped, d[len(stripped):]


# ---- scoring ---------------------------------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces (SQuAD's normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def extract_answer(spec: TaskSpec, generated: str) -> str:
    """The final answer in a generation: after the last cot delimiter, before any early-stopping string."""
    if spec.cot_delimiter and spec.cot_delimiter in generated:
        generated = generated.rsplit(spec.cot_delimiter, 1)[1]
    for s in spec.stops:
        generated = generated.split(s, 1)[0]
    return generated


def _mean_loss_argmin(scores: Sequence[scoring.Score]) -> int:
    return min(range(len(scores)), key=lambda i: -scores[i].logprob / max(1, scores[i].n_tokens))


Checker = Callable[..., tuple[bool, str]]


def item_requests(tokenizer, spec: TaskSpec, items: list[dict], limit: int | None = None
                  ) -> list[list[tuple[list[int], list[int]]]]:
    """The (context ids, continuation ids) requests of each of the first `limit` items of a language_modeling,
    multiple_choice or schema task: one per continuation, choice or context option, in the item's order."""
    t = spec.icl_task_type
    if t not in ("language_modeling", "multiple_choice", "schema"):
        raise ValueError(f"{t} items are generated, not scored by log-likelihood")
    shots = fewshot_indices(len(items), spec.num_fewshot, spec.fewshot_random_seed)
    ctx_end, cont_start = _split_delimiter(spec)
    enc = tokenizer.encode
    out = []
    for i in range(len(items) if limit is None else min(limit, len(items))):
        item, pre = items[i], _preamble(spec, items, shots[i])
        if t == "schema":
            pairs = [(pre + opt + ctx_end, item["continuation"]) for opt in item["context_options"]]
        else:
            ctx = pre + _context_of(spec, item) + ctx_end
            pairs = [(ctx, x) for x in (item["choices"] if t == "multiple_choice" else [item["continuation"]])]
        out.append([(enc(c), enc(cont_start + x)) for c, x in pairs])
    return out


def item_scores(model: nn.Module, tokenizer, spec: TaskSpec, items: list[dict], limit: int | None = None,
                batch_tokens: int = 4096) -> list[list[scoring.Score]]:
    """The Score (log-likelihood, greedy, token count) of each request of `item_requests`, all items batched
    together."""
    per_item = item_requests(tokenizer, spec, items, limit)
    flat = scoring.loglikelihood(model, [r for reqs in per_item for r in reqs], batch_tokens=batch_tokens)
    out, k = [], 0
    for reqs in per_item:
        out.append(flat[k : k + len(reqs)])
        k += len(reqs)
    return out


def item_results(model: nn.Module, tokenizer, spec: TaskSpec, items: list[dict], limit: int | None = None,
                 batch_tokens: int = 4096, checker: Checker | None = None) -> list[bool]:
    """Whether the model gets each of the first `limit` items right (few-shot examples come from all items).
    `checker`: (program, timeout_s=...) -> (passed, message) for code (default: dbrx.eval.code's sandbox)."""
    shots = fewshot_indices(len(items), spec.num_fewshot, spec.fewshot_random_seed)
    chosen = range(len(items) if limit is None else min(limit, len(items)))
    enc = tokenizer.encode
    t = spec.icl_task_type
    correct: list[bool] = []
    if t in ("language_modeling", "multiple_choice", "schema"):
        per_item = item_scores(model, tokenizer, spec, items, limit, batch_tokens)
        for i in chosen:
            s = per_item[i]
            correct.append(s[0].greedy if t == "language_modeling" else _mean_loss_argmin(s) == items[i]["gold"])
    else:
        requests = []
        for i in chosen:
            item, pre = items[i], _preamble(spec, items, shots[i])
            if t == "code_evaluation":
                prompt = pre + item["prompt"]
            else:
                prompt = (pre + _context_of(spec, item) + spec.continuation_delimiter).rstrip(" ")
            requests.append(scoring.GenerationRequest(enc(prompt), stop=spec.stops, max_new_tokens=spec.max_new_tokens))
        outputs = scoring.generate_until(model, tokenizer, requests)
        if t == "code_evaluation":
            programs = [f"{items[i]['prompt']}{out}\n\n{items[i]['test']}\n\ncheck({items[i]['entry_point']})\n"
                        for i, out in zip(chosen, outputs)]
            if checker is None:  # the sandbox, several programs at a time
                from dbrx.eval.code import check_programs

                correct = [bool(ok) for ok, _ in check_programs(programs, timeout_s=spec.timeout_s)]
            else:
                correct = [bool(checker(p, timeout_s=spec.timeout_s)[0]) for p in programs]
        else:
            for i, out in zip(chosen, outputs):
                answers = [items[i]["answer"], *items[i].get("aliases", [])]
                got = extract_answer(spec, out)
                if spec.do_normalization:
                    got, answers = normalize_answer(got), [normalize_answer(a) for a in answers]
                else:
                    got, answers = got.strip(), [a.strip() for a in answers]
                correct.append(got in answers)
    return correct


def run_task(model: nn.Module, tokenizer, spec: TaskSpec, items: list[dict] | None = None, limit: int | None = None,
             batch_tokens: int = 4096, checker: Checker | None = None) -> dict:
    """Score one task: {"accuracy", "correct", "n", "seconds"} with the spec's type, shots, category and baseline
    (items: read from the spec's file when not given)."""
    start = time.perf_counter()
    if spec.error:
        raise ValueError(spec.error)
    items = read_items(spec.dataset_uri, spec.icl_task_type) if items is None else items
    correct = item_results(model, tokenizer, spec, items, limit, batch_tokens, checker)
    n = len(correct)
    t = spec.icl_task_type
    return {"type": t, "category": spec.category, "num_fewshot": spec.num_fewshot,
            "random_baseline": spec.random_baseline, "accuracy": sum(correct) / n if n else math.nan,
            "correct": sum(correct), "n": n, "seconds": round(time.perf_counter() - start, 3)}


@dataclass
class TaskFailure:
    label: str
    error: str


@dataclass
class RunReport:
    results: dict[str, dict] = field(default_factory=dict)  # label -> run_task's dict
    failures: list[TaskFailure] = field(default_factory=list)


def check_tasks(specs: Sequence[TaskSpec]) -> tuple[dict[str, list[dict]], list[TaskFailure]]:
    """Read every task's items before anything runs: the good ones, and a one-line failure per bad file."""
    good, bad = {}, []
    for s in specs:
        if s.error:
            bad.append(TaskFailure(s.label, s.error))
            continue
        try:
            good[s.label] = read_items(s.dataset_uri, s.icl_task_type)
        except (ValueError, OSError) as e:
            bad.append(TaskFailure(s.label, f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.strerror
                                   else str(e)))
    return good, bad


def run_tasks(model: nn.Module, tokenizer, specs: Sequence[TaskSpec], limit: int | None = None,
              log: Callable[[str], None] | None = None, checker: Checker | None = None,
              batch_tokens: int = 4096, checked: tuple[dict, list[TaskFailure]] | None = None) -> RunReport:
    """Run tasks one by one; a task that fails (bad data, an error in its run) is reported and the others still
    run. `log` gets one line per task; `checked`: check_tasks(specs), when the caller has it already."""
    report = RunReport()
    items, failures = checked if checked is not None else check_tasks(specs)
    report.failures = list(failures)
    for f in report.failures:
        if log:
            log(f"{f.label}: error: {f.error}")
    for s in specs:
        if s.label not in items:
            continue
        try:
            r = run_task(model, tokenizer, s, items[s.label], limit, batch_tokens, checker)
        except (ValueError, OSError, RuntimeError, ImportError) as e:
            report.failures.append(TaskFailure(s.label, str(e)))
            if log:
                log(f"{s.label}: error: {e}")
            continue
        report.results[s.label] = r
        if log:
            log(f"{s.label:<28} {s.icl_task_type:<28} {s.num_fewshot}-shot  {r['correct']:>3}/{r['n']:<3}  "
                f"accuracy {r['accuracy']:.3f}  ({r['seconds']:.1f} s)")
    return report


__all__ = ["DEMO_YAML", "TASK_TYPES", "RunReport", "TaskSpec", "check_tasks", "extract_answer", "fewshot_indices",
           "item_requests", "item_results", "item_scores", "load_task_file", "normalize_answer", "read_items",
           "run_task", "run_tasks", "select_tasks"]
