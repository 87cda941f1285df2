"""dbrx.eval: scoring primitives against direct forwards, ICL task types on data whose answers a stub model forces,
Gauntlet arithmetic by hand, bad input, and `dbrx eval` end to end on a tiny random checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import randomize_, tiny_config
from torch import nn

from dbrx import DbrxForCausalLM
from dbrx.eval import gauntlet, icl, scoring
from dbrx.tokenizer import get_tokenizer
from dbrx.tokens import EOS_ID, PADDED_VOCAB_SIZE

MAX_LEN = 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine threads that spin-wait for
    each other make every forward 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    """A tiny random model (vocab 128, max_seq_len 16) in fp32."""
    torch.manual_seed(0)
    return randomize_(DbrxForCausalLM.from_config(tiny_config(max_seq_len=MAX_LEN)), seed=1).eval()


def _rand(n: int, g: torch.Generator) -> list[int]:
    return torch.randint(0, 128, (n,), generator=g).tolist()


@torch.no_grad()
def direct(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """The reference: one full forward of this request alone (context cut from the left to fit)."""
    seq = (ctx + cont)[-(model.config.max_seq_len + 1):]
    lp = torch.log_softmax(model(torch.tensor([seq[:-1]])).double(), -1)[0]  # (T, V)
    pos = torch.arange(len(seq) - 1 - len(cont), len(seq) - 1)
    t = torch.tensor(cont)
    return float(lp[pos, t].sum()), bool((lp[pos].argmax(-1) == t).all())


def _requests():
    g = torch.Generator().manual_seed(0)
    shared = _rand(6, g)
    return [(shared, _rand(3, g)), (shared, _rand(1, g)), (shared, _rand(5, g)), (_rand(4, g), _rand(2, g)),
            (_rand(11, g), _rand(6, g)), (_rand(30, g), _rand(4, g)),  # cut from the left to fit max_seq_len
            (_rand(2, g), _rand(1, g)), (shared, _rand(2, g)), (shared, _rand(1, g))]


# ---- scoring ----------------------------------------------------------------------------------------------------
def test_loglikelihood_equals_a_direct_forward_per_request(model):
    reqs = _requests()
    reqs.append(reqs[0])  # a duplicate
    got = scoring.loglikelihood(model, reqs)
    for (c, x), s in zip(reqs, got):
        ref, greedy = direct(model, c, x)
        assert s.n_tokens == len(x)
        assert s.logprob == pytest.approx(ref, abs=1e-5)
        assert s.greedy == greedy
    assert scoring.loglikelihood(model, [([1, 2], [])]) == [scoring.Score(0.0, True, 0)]


def test_blocked_head_equals_log_softmax_over_the_whole_vocabulary():
    g = torch.Generator().manual_seed(3)
    weight, x = torch.randn(130, 16, generator=g), torch.randn(9, 16, generator=g)
    t = torch.tensor([0, 129, 7, 64, 63, 127, 128, 1, 50])
    logits = (x.double() @ weight.double().T)
    t[4] = int(logits[4].argmax())  # one greedy target
    lp, hit = scoring._blocked_head(weight, x, t, block=7)  # 19 blocks, the last one short
    assert lp.tolist() == pytest.approx(torch.log_softmax(logits, -1)[torch.arange(9), t].tolist(), abs=1e-5)
    assert hit.tolist() == (logits.argmax(-1) == t).tolist() and bool(hit[4])


def test_greedy_flag_on_the_models_own_greedy_continuation(model):
    ctx = [5, 9, 17]
    with torch.no_grad():
        seq = list(ctx)
        for _ in range(3):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    other = (seq[-1] + 1) % 128
    a, b = scoring.loglikelihood(model, [(ctx, seq[3:]), (ctx, seq[3:5] + [other])])
    assert a.greedy and not b.greedy


def test_padding_and_batching_never_change_a_score(model):
    reqs = _requests()
    alone = [scoring.loglikelihood(model, [r], share_contexts=False)[0] for r in reqs]
    for kwargs in (dict(), dict(batch_tokens=20), dict(max_batch=2), dict(share_contexts=False, batch_tokens=10_000)):
        for a, b in zip(alone, scoring.loglikelihood(model, reqs, **kwargs)):
            assert b.logprob == pytest.approx(a.logprob, abs=1e-5) and b.greedy == a.greedy, kwargs


def test_shared_contexts_run_once_and_score_as_separate_requests(model):
    g = torch.Generator().manual_seed(3)
    ctx = _rand(9, g)
    reqs = [(ctx, _rand(n, g)) for n in (1, 3, 4, 2)]
    seen = []
    hook = model.transformer.wte.register_forward_hook(lambda m, i, o: seen.append(i[0].numel()))
    try:
        grouped = scoring.loglikelihood(model, reqs)
        n_grouped = sum(seen)
        seen.clear()
        separate = scoring.loglikelihood(model, reqs, share_contexts=False)
        n_separate = sum(seen)
    finally:
        hook.remove()
    for a, b in zip(grouped, separate):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5) and a.greedy == b.greedy
    assert n_grouped == len(ctx) + 4 * 3  # the context once, then the continuations (padded to 3 tokens each)
    assert n_separate > 4 * len(ctx)


@torch.no_grad()
def test_rolling_loglikelihood_predicts_each_token_once(model):
    g = torch.Generator().manual_seed(4)
    doc = _rand(3 * MAX_LEN + 5, g)
    prefix = 7
    # with full overlap, token i is predicted from the max_seq_len tokens before it ([prefix] + doc before it)
    ref = 0.0
    for i in range(len(doc)):
        inp = ([prefix] + doc[:i])[-MAX_LEN:]
        ref += float(torch.log_softmax(model(torch.tensor([inp]))[0, -1].double(), -1)[doc[i]])
    s = scoring.rolling_loglikelihood(model, [doc], context_len=MAX_LEN, prefix_token=prefix)[0]
    assert s.n_tokens == len(doc) and s.logprob == pytest.approx(ref, abs=1e-4)
    for context_len in (1, 5):  # fewer, longer windows: every token still predicted exactly once
        windows = scoring.rolling_windows(doc, MAX_LEN, context_len, prefix)
        assert sum((w[1] for w in windows), []) == doc
        assert all(len(c) + len(x) - 1 <= MAX_LEN for c, x in windows)
        assert all(len(c) >= context_len for c, _ in windows[1:])
        s2 = scoring.rolling_loglikelihood(model, [doc, doc[:5]], context_len=context_len, prefix_token=prefix)
        expect = sum(direct(model, c, x)[0] for c, x in windows)
        assert s2[0].logprob == pytest.approx(expect, abs=1e-4) and s2[1].n_tokens == 5


# ---- a stub model whose predictions the test sets ------------------------------------------------------------------
class _Head(nn.Module):
    def __init__(self, nxt: dict[int, int]):
        super().__init__()
        self.nxt = nxt

    def forward(self, h):  # h (N, 1): the current token id -> logits favouring its successor (else end-of-text)
        logits = torch.zeros(h.shape[0], PADDED_VOCAB_SIZE)
        succ = torch.tensor([self.nxt.get(int(t), EOS_ID) for t in h[:, 0].tolist()], dtype=torch.long)
        return logits.scatter_(1, succ[:, None], 12.0)


class BigramStub(nn.Module):
    """Predicts the successor of the current token from a table: scored and generated like a real model, through
    the same code paths (hidden_states + lm_head for scoring, forward_paged for the serving engine)."""

    def __init__(self, max_seq_len: int = 512):
        super().__init__()
        self.config = SimpleNamespace(max_seq_len=max_seq_len, vocab_size=PADDED_VOCAB_SIZE, n_layers=1, head_dim=8,
                                      attn_config=SimpleNamespace(kv_n_heads=1))
        self.anchor = nn.Parameter(torch.zeros(1))
        self.nxt: dict[int, int] = {}
        self.lm_head = _Head(self.nxt)

    def force(self, tokens: list[int]) -> None:
        """Make the model continue tokens[0] with tokens[1:], then end the text."""
        for a, b in zip(tokens, tokens[1:] + [EOS_ID]):
            assert self.nxt.get(a, b) == b, "the test's chains must not collide"
            self.nxt[a] = b

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, doc_ids=None, cache_pos=None):
        return input_ids[..., None].float(), []

    def setup_cache(self, batch, max_len):
        pass

    def clear_cache(self):
        pass

    def forward_paged(self, input_ids, positions, meta, kv_caches, logits_indices):
        return self.lm_head(input_ids[logits_indices][:, None].float())


def _write(tmp_path: Path, name: str, items: list) -> str:
    path = tmp_path / name
    path.write_text("".join((json.dumps(i) if not isinstance(i, str) else i) + "\n" for i in items))
    return str(path)


def _spec(path: str, task_type: str, **kw) -> icl.TaskSpec:
    return icl.TaskSpec(label="t", dataset_uri=path, icl_task_type=task_type, **kw)


def test_language_modeling_is_right_when_every_token_is_greedy(tmp_path):
    tok, stub = get_tokenizer(), BigramStub()
    items = [{"context": "alpha beta", "continuation": "gamma delta"}, {"context": "red green", "continuation": "blue"}]
    stub.force(tok.encode("alpha beta")[-1:] + tok.encode(" gamma delta"))
    stub.force(tok.encode(" green")[-1:] + tok.encode(" yellow"))  # not the item's continuation
    spec = _spec(_write(tmp_path, "lm.jsonl", items), "language_modeling")
    assert icl.item_results(stub, tok, spec, items) == [True, False]
    r = icl.run_task(stub, tok, spec)
    assert (r["accuracy"], r["correct"], r["n"]) == (0.5, 1, 2)


def test_multiple_choice_lowest_mean_loss_wins(tmp_path):
    tok, stub = get_tokenizer(), BigramStub()
    items = [{"query": "Pick one", "choices": ["apple pie", "banana split long", "cherry"], "gold": 1},
             {"query": "Choose now", "choices": ["dog", "cat"], "gold": 0}]
    stub.force(tok.encode("Pick one")[-1:] + tok.encode(" banana split"))  # 2 of 3 tokens of the gold choice
    stub.force(tok.encode(" now")[-1:] + tok.encode(" cat"))  # the wrong one
    spec = _spec(_write(tmp_path, "mc.jsonl", items), "multiple_choice")
    assert icl.item_results(stub, tok, spec, items) == [True, False]


def test_schema_scores_the_continuation_after_each_context(tmp_path):
    tok, stub = get_tokenizer(), BigramStub()
    items = [{"context_options": ["The dog", "The owl"], "continuation": "flew away", "gold": 1},
             {"context_options": ["A lake", "A road"], "continuation": "froze over", "gold": 0}]
    stub.force(tok.encode(" owl")[-1:] + tok.encode(" flew away"))
    stub.force(tok.encode(" road")[-1:] + tok.encode(" froze over"))
    spec = _spec(_write(tmp_path, "schema.jsonl", items), "schema")
    assert icl.item_results(stub, tok, spec, items) == [True, False]


def test_generation_exact_match_with_aliases_and_chain_of_thought(tmp_path):
    tok, stub = get_tokenizer(), BigramStub()
    items = [{"context": "Q: zebra", "answer": "Yes", "aliases": ["yep"]},
             {"context": "Q: walrus", "answer": "No"},
             {"context": "Q: heron", "answer": "maybe"}]
    stub.force(tok.encode("Q: zebra")[-1:] + tok.encode(" Yep!\nnever"))  # normalised "yep", cut at "\n"
    stub.force(tok.encode("Q: walrus")[-1:] + tok.encode(" No way"))  # "no way" is not "no"
    stub.force(tok.encode("Q: heron")[-1:] + tok.encode(" The maybe"))  # articles go
    spec = _spec(_write(tmp_path, "qa.jsonl", items), "generation_task_with_answers")
    assert icl.item_results(stub, tok, spec, items) == [True, False, True]

    cot = [{"context": "Sum of two and two?", "chain_of_thought": "two plus two", "answer": "four"}]
    stub.force(tok.encode("Sum of two and two?")[-1:] + tok.encode(" I add three then two. So the answer: four"))
    spec = _spec(_write(tmp_path, "cot.jsonl", cot), "generation_task_with_answers", cot_delimiter="answer:")
    assert icl.item_results(stub, tok, spec, cot) == [True]  # "four" after the last delimiter, not "three"
    assert icl.extract_answer(spec, " a answer: b answer: c\nd") == " c"
    assert icl.normalize_answer("  The  Cat's  hat! ") == "cats hat"


def test_code_evaluation_runs_prompt_completion_and_test(tmp_path):
    tok, stub = get_tokenizer(), BigramStub()
    items = [{"prompt": "def one():\n", "test": "def check(f):\n    assert f() == 1\n", "entry_point": "one"},
             {"prompt": "def two():\n", "test": "def check(f):\n    assert f() == 2\n", "entry_point": "two"}]
    body = tok.encode("    return 1\n\ndef junk")  # generation stops before "\ndef "
    stub.force(tok.encode("def one():\n")[-1:] + body)
    programs = []

    def checker(program, timeout_s):
        programs.append(program)
        scope: dict = {}
        try:
            exec(program, scope)  # the test's own trusted programs
        except Exception as e:
            return False, repr(e)
        return True, "passed"

    spec = _spec(_write(tmp_path, "code.jsonl", items), "code_evaluation")
    assert icl.item_results(stub, tok, spec, items, checker=checker) == [True, False]
    assert programs[0] == "def one():\n    return 1\n\n\ndef check(f):\n    assert f() == 1\n\n\ncheck(one)\n"


def test_prompts_follow_llm_foundry():
    items = [{"query": f"Q{i}", "choices": [f"a{i}", f"b{i}"], "gold": i % 2} for i in range(5)]
    spec = _spec("x", "multiple_choice", num_fewshot=2, prompt_string="Intro", continuation_delimiter="\nA: ",
                 example_delimiter="\n\n")
    shots = icl.fewshot_indices(5, 2, spec.fewshot_random_seed)
    assert shots == icl.fewshot_indices(5, 2, spec.fewshot_random_seed)  # a fixed seed
    assert all(i not in s and len(set(s)) == 2 for i, s in enumerate(shots))  # never the item itself
    assert [sorted(s) for s in icl.fewshot_indices(3, 5, 0)] == [[1, 2], [0, 2], [0, 1]]  # at most the others
    j, k = shots[0]
    expect = f"Intro\n\nQ{j}\nA: {items[j]['choices'][j % 2]}\n\nQ{k}\nA: {items[k]['choices'][k % 2]}\n\nQ0\nA:"
    assert icl._preamble(spec, items, shots[0]) + "Q0" + icl._split_delimiter(spec)[0] == expect
    assert icl._split_delimiter(spec) == ("\nA:", " ")


# ---- the Gauntlet -------------------------------------------------------------------------------------------------
def test_gauntlet_arithmetic_by_hand(tmp_path):
    tasks = {"a": dict(accuracy=0.625, random_baseline=0.25, category="world_knowledge"),
             "b": dict(accuracy=0.5, random_baseline=0.5, category="world_knowledge"),
             "c": dict(accuracy=0.3, random_baseline=0.0, category="programming"),
             "d": dict(accuracy=0.25, random_baseline=0.5, category="commonsense_reasoning"),
             "e": dict(accuracy=math.nan, random_baseline=0.0, category="programming")}  # no items: no score
    r = gauntlet.score(tasks, errors={"f": "broken"})
    assert r["tasks"]["a"]["rescaled"] == pytest.approx(0.5)  # (0.625 - 0.25) / 0.75
    assert r["tasks"]["d"]["rescaled"] == pytest.approx(-0.5)
    assert r["categories"]["world_knowledge"]["score"] == pytest.approx(0.25)  # (0.5 + 0) / 2
    assert r["categories"]["programming"]["score"] == pytest.approx(0.3)
    assert list(r["categories"]) == ["world_knowledge", "commonsense_reasoning", "programming"]
    assert r["overall"] == pytest.approx((0.25 - 0.5 + 0.3) / 3)  # each category weighs the same
    path = tmp_path / "r.json"
    gauntlet.save_results(r, path)
    back = gauntlet.load_results(path)
    assert back["overall"] == pytest.approx(r["overall"]) and math.isnan(back["tasks"]["e"]["rescaled"])
    table = gauntlet.format_table(back)
    assert "world_knowledge" in table and "f: failed: broken" in table
    other = gauntlet.score({**tasks, "c": dict(accuracy=0.5, random_baseline=0.0, category="programming")})
    diff = gauntlet.compare(back, other)
    line = next(ln for ln in diff.splitlines() if ln.strip().startswith("c "))
    assert "+0.200" in line
    pytest.importorskip("matplotlib")
    gauntlet.plot([back, other], tmp_path / "r.png", names=["x", "y"])
    assert (tmp_path / "r.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="baseline"):
        gauntlet.rescale(0.5, 1.0)


# ---- bad input ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task_type, lines, message", [
    ("multiple_choice", ['{"query": "q", "choices": ["a", "b"], "gold": 0}', '{"query": "q", "choices": ["a", "b"]}'],
     r"mc\.jsonl:2: missing field\(s\) gold"),
    ("multiple_choice", ['{"query": "q", "choices": ["a", "b"], "gold": 2}'], r"mc\.jsonl:1: gold 2 is out of range"),
    ("schema", ['{"context_options": ["a"], "continuation": "c", "gold": 0}'], r"mc\.jsonl:1: 'context_options'"),
    ("language_modeling", ['', '{"context": "c", "continuation": "x"', ], r"mc\.jsonl:2: not valid JSON"),
    ("language_modeling", ['[1, 2]'], r"mc\.jsonl:1: each line must be a JSON object"),
    ("language_modeling", [], r"mc\.jsonl: no items"),
    ("generation_task_with_answers", ['{"context": "c", "answer": "a", "aliases": "x"}'], r"mc\.jsonl:1: 'aliases'"),
])
def test_bad_items_name_the_file_and_line(tmp_path, task_type, lines, message):
    path = _write(tmp_path, "mc.jsonl", lines)
    with pytest.raises(ValueError, match=message):
        icl.read_items(path, task_type)


def test_bad_task_files_name_the_file_and_line(tmp_path):
    good = _write(tmp_path, "lm.jsonl", [{"context": "a", "continuation": "b"}])
    y = tmp_path / "tasks.yaml"
    y.write_text(f"icl_tasks:\n  - label: ok\n    dataset_uri: {good}\n    icl_task_type: language_modeling\n"
                 "  - label: bad\n    dataset_uri: lm.jsonl\n    icl_task_type: summarisation\n")
    ok, bad = icl.load_task_file(y)  # an unknown type fails its own task only, when the tasks are checked
    items, failures = icl.check_tasks([ok, bad])
    assert list(items) == ["ok"] and [f.label for f in failures] == ["bad"]
    assert failures[0].error.startswith(f"{y}:5: unknown icl_task_type 'summarisation' (known: lang")
    with pytest.raises(ValueError, match=r"tasks\.yaml:5: unknown icl_task_type"):
        icl.run_task(None, None, bad)
    y.write_text("icl_tasks:\n  - label: x\n    dataset_uri: lm.jsonl\n    icl_task_type: language_modeling\n"
                 "    random_baseline: 1.5\n")
    with pytest.raises(ValueError, match=r"tasks\.yaml:2: random_baseline must be in \[0, 1\)"):
        icl.load_task_file(y)
    y.write_text("icl_tasks: [\n")
    with pytest.raises(ValueError, match=r"tasks\.yaml:\d+: not valid YAML"):
        icl.load_task_file(y)
    with pytest.raises(ValueError, match=r"unknown task 'nope' \(known: demo, demo_world_knowledge, "):
        icl.select_tasks("demo_schema,nope")


def test_llm_foundry_task_lists_with_a_gauntlet_section(tmp_path):
    _write(tmp_path, "lm.jsonl", [{"context": "a", "continuation": "b"}])
    y = tmp_path / "t.yaml"
    y.write_text("icl_tasks:\n- label: lm\n  dataset_uri: lm.jsonl\n  icl_task_type: language_modeling\n"
                 "  num_fewshot: [0, 3]\n"
                 "eval_gauntlet:\n  categories:\n  - name: language_understanding\n    benchmarks:\n"
                 "    - name: lm\n      num_fewshot: 3\n      random_baseline: 0.1\n")
    a, b = icl.load_task_file(y)
    assert (a.label, a.num_fewshot, a.category) == ("lm/0-shot", 0, "uncategorized")
    assert (b.label, b.category, b.random_baseline) == ("lm/3-shot", "language_understanding", 0.1)
    assert a.dataset_uri == str(tmp_path / "lm.jsonl")


def test_a_failed_task_keeps_the_others(tmp_path):
    tok, stub = get_tokenizer(), BigramStub()
    good = _spec(_write(tmp_path, "lm.jsonl", [{"context": "a b", "continuation": "c"}]), "language_modeling")
    bad = icl.TaskSpec("broken", _write(tmp_path, "bad.jsonl", ['{"context": 1}']), "language_modeling")
    missing = icl.TaskSpec("missing", str(tmp_path / "nope.jsonl"), "language_modeling")
    lines = []
    report = icl.run_tasks(stub, tok, [bad, good, missing], log=lines.append)
    assert list(report.results) == ["t"] and report.results["t"]["n"] == 1
    assert [f.label for f in report.failures] == ["broken", "missing"]
    assert "bad.jsonl:1: missing field(s) continuation" in report.failures[0].error
    assert "nope.jsonl" in report.failures[1].error


def test_the_demo_set_is_well_formed():
    specs = icl.select_tasks("demo")
    items, failures = icl.check_tasks(specs)
    assert failures == [] and len(specs) >= 9
    assert {s.icl_task_type for s in specs} == set(icl.TASK_TYPES)
    assert {s.category for s in specs} == set(gauntlet.CATEGORIES)
    for s in specs:  # canonical solutions pass their own tests (in-process: our own trusted code)
        if s.icl_task_type == "code_evaluation":
            for it in items[s.label]:
                exec(f"{it['prompt']}{it['canonical_solution']}\n{it['test']}\ncheck({it['entry_point']})\n", {})


# ---- the CLI ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from dbrx.cli import main

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    assert main(["init", "--preset", "dbrx-tiny", str(out), "--seed", "0"]) == 0
    return out


def test_cli_end_to_end(checkpoint, tmp_path, capsys):
    from dbrx.cli import main

    out, png = tmp_path / "r.json", tmp_path / "r.png"
    tasks = "demo_commonsense,demo_schema,demo_completion,demo_arithmetic"
    assert main(["eval", "--model", str(checkpoint), "--tasks", tasks, "--limit", "2", "--out", str(out),
                 "--plot", str(png)]) == 0
    res = json.loads(out.read_text())
    assert list(res["tasks"]) == tasks.split(",") and all(t["n"] == 2 for t in res["tasks"].values())
    assert set(res["categories"]) == {"commonsense_reasoning", "language_understanding", "symbolic_problem_solving"}
    assert png.stat().st_size > 1000
    cap = capsys.readouterr()
    assert "overall" in cap.out and "demo_schema" in cap.err
    assert main(["eval", "--compare", str(out), str(out)]) == 0
    assert "+0.000" in capsys.readouterr().out


def test_cli_bad_input_gives_one_line_errors(checkpoint, tmp_path, capsys):
    from dbrx.cli import main

    assert main(["eval", "--model", str(checkpoint), "--tasks", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown task 'nope' (known: demo, demo_world_knowledge" in err
    _write(tmp_path, "mc.jsonl", ['{"query": "q", "choices": ["a", "b"], "gold": 5}'])
    (tmp_path / "t.yaml").write_text("icl_tasks:\n- {label: mc, dataset_uri: mc.jsonl, icl_task_type: "
                                     "multiple_choice}\n")
    assert main(["eval", "--model", str(checkpoint), "--tasks", str(tmp_path / "t.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mc.jsonl:1: gold 5 is out of range" in err
    assert main(["eval", "--tasks", "demo"]) == 2
    assert "--model DIR is required" in capsys.readouterr().err
    assert main(["eval", "--model", str(checkpoint), "--threads", "0"]) == 2
    assert "--threads must be positive" in capsys.readouterr().err
    assert main(["eval", "--tasks", "demo"]) == 2
    assert "--model DIR is required" in capsys.readouterr().err
    (tmp_path / "x.json").write_text("{}")
    assert main(["eval", "--compare", str(tmp_path / "x.json"), str(tmp_path / "x.json")]) == 2
    assert "not a `dbrx eval` results file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "--compare" in capsys.readouterr().out


def test_cli_bad_tasks_fail_alone_with_one_line_each(checkpoint, tmp_path, capsys):
    """Missing fields, a gold index out of range, an empty file and an unknown task type: each task fails with one
    line naming its file and line; the good task still runs and its score is kept (exit status 1)."""
    from dbrx.cli import main

    _write(tmp_path, "good.jsonl", [{"query": "Pick", "choices": ["yes", "no"], "gold": 0}] * 3)
    _write(tmp_path, "missing.jsonl", [{"query": "q", "choices": ["a", "b"], "gold": 0}, {"query": "q", "gold": 1}])
    _write(tmp_path, "gold.jsonl", [{"query": "q", "choices": ["a", "b"], "gold": 0}] * 2 +
           [{"query": "q", "choices": ["a", "b"], "gold": 2}])
    (tmp_path / "empty.jsonl").write_text("")
    mc = "icl_task_type: multiple_choice, category: world_knowledge, random_baseline: 0.5"
    (tmp_path / "t.yaml").write_text(
        "icl_tasks:\n"
        f"- {{label: missing, dataset_uri: missing.jsonl, {mc}}}\n"
        f"- {{label: good, dataset_uri: good.jsonl, {mc}}}\n"
        f"- {{label: gold, dataset_uri: gold.jsonl, {mc}}}\n"
        f"- {{label: empty, dataset_uri: empty.jsonl, {mc}}}\n"
        "- {label: essay, dataset_uri: good.jsonl, icl_task_type: essay_grading}\n")
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(checkpoint), "--tasks", str(tmp_path / "t.yaml"), "--out", str(out)]) == 1
    err = capsys.readouterr().err.splitlines()
    expect = {"missing": "missing.jsonl:2: missing field(s) choices", "gold": "gold.jsonl:3: gold 2 is out of range",
              "empty": "empty.jsonl: no items (the file is empty)", "essay": "t.yaml:6: unknown icl_task_type"}
    for label, message in expect.items():
        lines = [ln for ln in err if ln.startswith(f"{label}: error: ")]
        assert len(lines) == 1 and message in lines[0], (label, err)
    res = json.loads(out.read_text())
    assert list(res["tasks"]) == ["good"] and res["tasks"]["good"]["n"] == 3
    assert set(res["errors"]) == set(expect) and all(m in res["errors"][k] for k, m in expect.items())
    acc = res["tasks"]["good"]["accuracy"]
    assert res["categories"]["world_knowledge"]["score"] == pytest.approx((acc - 0.5) / 0.5)


# ---- during training -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_training_scores_icl_tasks_at_each_evaluation(tmp_path):
    from test_trainer import tiny_train_config, train

    from dbrx.train.plot import plot_run

    _write(tmp_path, "mc.jsonl", [{"query": f"Is {w} a colour?", "choices": ["yes", "no"], "gold": i % 2}
                                  for i, w in enumerate(["red", "bread", "blue"])])
    _write(tmp_path, "qa.jsonl", [{"context": "Q: one plus one?", "answer": "two"}])
    (tmp_path / "t.yaml").write_text(
        "icl_tasks:\n- {label: mc, dataset_uri: mc.jsonl, icl_task_type: multiple_choice, random_baseline: 0.5,"
        " category: commonsense_reasoning}\n- {label: qa, dataset_uri: qa.jsonl, icl_task_type: "
        "generation_task_with_answers, max_new_tokens: 3, category: symbolic_problem_solving}\n")
    cfg = tiny_train_config(tmp_path, train={"steps": 4},
                            eval={"interval": 2, "icl_tasks": str(tmp_path / "t.yaml"), "icl_limit": 2})
    trainer, summary = train(cfg)
    evals = [json.loads(x) for x in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e.get("event") == "eval"]
    assert [e["step"] for e in evals] == [2, 4]
    for e in evals:
        assert e["icl/task/mc"] in (0.0, 0.5, 1.0) and e["icl/task/qa"] in (0.0, 1.0)
        assert e["icl/overall"] == pytest.approx((e["icl/commonsense_reasoning"] + e["icl/symbolic_problem_solving"])
                                                 / 2)
    assert trainer.model.training and "icl/overall" in summary["eval"]
    assert "icl.png" in {p.name for p in plot_run(cfg.run_dir)}

    (tmp_path / "mc.jsonl").write_text('{"query": "q"}\n')
    with pytest.raises(ValueError, match=r"eval.icl_tasks: .*mc\.jsonl:1: missing field"):
        train(tiny_train_config(tmp_path / "again", eval={"interval": 2, "icl_tasks": str(tmp_path / "t.yaml")}))
