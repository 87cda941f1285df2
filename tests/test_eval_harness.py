"""dbrx.eval.harness: the lm-evaluation-harness adapter on local tasks (tests/data/eval_harness: multiple choice,
generation, rolling perplexity; data files named relative to the repository root), by name through lm-eval's
Python API, and against lm-eval's own `hf` model on the same checkpoint loaded by transformers (slow)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import randomize_, tiny_config

from dbrx import DbrxForCausalLM
from dbrx.tokens import PADDED_VOCAB_SIZE

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from dbrx.eval.harness import DbrxLM, run_lm_eval, transformers_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data" / "eval_harness"
TASKS = ["dbrx_test_mc", "dbrx_test_gen", "dbrx_test_ppl"]


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """Offline, in the repository root (the task files' data paths are relative to it), and datasets' cache in a
    temporary folder rather than the user's home."""
    import datasets

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("datasets_cache"))
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
        yield


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine threads that spin-wait for each other
    make every forward many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random DBRX with the full cl100k vocabulary (max_seq_len 64: rolling windows and context cuts happen),
    saved by DbrxForCausalLM.save_pretrained."""
    cfg = tiny_config(vocab_size=PADDED_VOCAB_SIZE, max_seq_len=64)
    torch.manual_seed(0)
    model = randomize_(DbrxForCausalLM.from_config(cfg), seed=0, std=0.05)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    model.save_pretrained(path)
    return path


def _samples(out: dict, task: str) -> list:
    return [s["resps"] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]


def _loglikelihoods(out: dict, task: str) -> list[tuple[float, bool]]:
    return [tuple(r[0]) for resps in _samples(out, task) for r in resps]


def test_registered_by_name():
    from lm_eval.api.registry import get_model

    assert get_model("dbrx") is DbrxLM
    assert get_model("hf").__name__ == "HFLM"  # lm-eval's own models are still found


def test_run_lm_eval_on_local_tasks(checkpoint):
    path = checkpoint
    out = run_lm_eval(str(path), TASKS, include_path=str(DATA), limit=4, batch_size=8, device="cpu", dtype="fp32",
                      log_samples=True)
    res = out["results"]
    assert 0.0 <= res["dbrx_test_mc"]["acc,none"] <= 1.0 and "acc_norm,none" in res["dbrx_test_mc"]
    assert res["dbrx_test_gen"]["exact_match,none"] == 0.0  # a random model
    assert res["dbrx_test_ppl"]["word_perplexity,none"] > 1.0 and res["dbrx_test_ppl"]["bits_per_byte,none"] > 0
    assert out["n-shot"]["dbrx_test_mc"] == 1
    assert [len(r) for r in _samples(out, "dbrx_test_mc")] == [3, 4, 3, 3]  # one request per choice
    gens = [r[0][0] for r in _samples(out, "dbrx_test_gen")]
    assert all(isinstance(g, str) and "\n" not in g for g in gens)

    # by name through lm-eval's registry, as simple_evaluate(model="dbrx", model_args=...) builds it
    from lm_eval.api.registry import get_model

    lm = get_model("dbrx").create_from_arg_string(f"pretrained={path},dtype=fp32", {"batch_size": 2, "device": "cpu"})
    assert isinstance(lm, DbrxLM) and lm.batch_size == 2 and lm.max_length == 64
    reqs = [Instance("loglikelihood", {}, ("Question: What do bees make?\nAnswer:", " honey"), 0),
            Instance("loglikelihood", {}, ("", "A short note."), 1)]
    direct = DbrxLM(pretrained=str(path), dtype="fp32").loglikelihood(reqs, disable_tqdm=True)
    by_name = lm.loglikelihood(reqs, disable_tqdm=True)
    assert [x for x, _ in by_name] == pytest.approx([x for x, _ in direct], abs=1e-5)
    assert [g for _, g in by_name] == [g for _, g in direct]


def test_batching_and_padding_do_not_change_scores():
    cfg = tiny_config(vocab_size=PADDED_VOCAB_SIZE, max_seq_len=64)
    torch.manual_seed(0)
    model = randomize_(DbrxForCausalLM.from_config(cfg), seed=5).eval()
    texts = ["A much longer context that has quite a few more tokens in it than the others", "The cat", ""]
    reqs = [Instance("loglikelihood", {}, (ctx, cont), i)
            for i, (ctx, cont) in enumerate((t, c) for t in texts for c in (" on the mat", " yes"))]
    one = DbrxLM(model=model, batch_size=1).loglikelihood(reqs, disable_tqdm=True)
    many = DbrxLM(model=model, batch_size=64).loglikelihood(reqs, disable_tqdm=True)
    assert [x for x, _ in one] == pytest.approx([x for x, _ in many], abs=1e-5)
    assert [g for _, g in one] == [g for _, g in many]
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate([texts[0] * 3, ""])]
    assert DbrxLM(model=model).loglikelihood_rolling(rolling, disable_tqdm=True)[1] == 0.0  # no tokens, no loss


def test_bad_arguments(checkpoint, tmp_path):
    model = DbrxForCausalLM.from_config(tiny_config(vocab_size=PADDED_VOCAB_SIZE))
    with pytest.raises(ValueError, match="exactly one of"):
        DbrxLM()
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        DbrxLM(pretrained=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unknown argument"):
        DbrxLM(model=model, temperature=3)
    with pytest.raises(ValueError, match="batch_size"):
        DbrxLM(model=model, batch_size="lots")
    assert DbrxLM(model=model, batch_size="auto").batch_size == 64
    with pytest.raises(ValueError, match="is not a directory"):
        run_lm_eval(str(checkpoint), TASKS, include_path=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="non-empty list"):
        run_lm_eval(str(checkpoint), "dbrx_test_mc", include_path=str(DATA))


def test_chat_template():
    lm = DbrxLM(model=DbrxForCausalLM.from_config(tiny_config(vocab_size=PADDED_VOCAB_SIZE)))
    chat = [{"role": "user", "content": "2+2?"}]
    assert lm.apply_chat_template(chat) == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    prefill = lm.apply_chat_template(chat + [{"role": "assistant", "content": "It is"}], add_generation_prompt=False)
    assert prefill.endswith("<|im_start|>assistant\nIt is")
    assert lm.tok_encode("<|im_start|>") == [100278]


@pytest.mark.slow
def test_unknown_task_is_named():
    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\) \['no_such_task_xyz'\]"):
        run_lm_eval("unused", ["no_such_task_xyz"], include_path=str(DATA))


@pytest.mark.slow
def test_parity_with_lm_eval_hf_model(checkpoint, request):
    """Per-request log-likelihoods within 1e-4 (1e-6 relative for the long rolling sums, which hf adds up in fp32),
    identical greedy flags and generations, identical accuracies, perplexities within 1e-6 relative."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from dbrx.eval.harness import task_manager

    transformers = pytest.importorskip("transformers")
    path = checkpoint
    hf_model = transformers.DbrxForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tokenizer = transformers_tokenizer(request.config.cache.mkdir("dbrx_hf_tokenizer"))
    ours = DbrxLM(pretrained=str(path), dtype="fp32", device="cpu", batch_size=16)
    for text in ["Question: How many legs?\nAnswer: eight", " leading spaces  and\n\nnew lines", "<|endoftext|>x"]:
        assert tokenizer.encode(text) == ours.tok_encode(text)
    ref = HFLM(pretrained=hf_model, tokenizer=tokenizer, batch_size=8, max_length=64, device="cpu")
    manager = task_manager(TASKS, DATA)
    a = simple_evaluate(model=ours, tasks=TASKS, task_manager=manager, log_samples=True)
    b = simple_evaluate(model=ref, tasks=TASKS, task_manager=manager, log_samples=True)
    for task in TASKS:
        for ra, rb in zip(_samples(a, task), _samples(b, task), strict=True):
            for (x,), (y,) in zip(ra, rb, strict=True):
                if task == "dbrx_test_gen":
                    assert x == y
                elif task == "dbrx_test_mc":
                    assert x[0] == pytest.approx(y[0], abs=1e-4) and x[1] == y[1]
                else:
                    assert math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-4), (x, y)
    ra, rb = a["results"], b["results"]
    for key in ("acc,none", "acc_norm,none"):
        assert ra["dbrx_test_mc"][key] == rb["dbrx_test_mc"][key]
    assert ra["dbrx_test_gen"]["exact_match,none"] == rb["dbrx_test_gen"]["exact_match,none"]
    for key in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ra["dbrx_test_ppl"][key] == pytest.approx(rb["dbrx_test_ppl"][key], rel=1e-6)


@torch.no_grad()
def _direct(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """The reference: one full forward of context + continuation alone, log-softmax in float64."""
    seq = ctx + cont
    lp = torch.log_softmax(model(torch.tensor([seq[:-1]])).double(), -1)[0]  # (T, V)
    pos = torch.arange(len(ctx) - 1, len(seq) - 1)
    t = torch.tensor(cont)
    return float(lp[pos, t].sum()), bool((lp[pos].argmax(-1) == t).all())


def test_icl_multiple_choice_and_the_adapter_agree(checkpoint):
    """The same zero-shot questions (mc_icl.jsonl) through dbrx's ICL `multiple_choice` type and through lm-eval with
    the dbrx adapter (dbrx_test_mc_icl.yaml): both score each choice as a direct forward of the hand-built prompt does,
    and each path's rule gives what the reference log-likelihoods give under that rule: llm-foundry's lowest mean
    per-token loss (ICL accuracy), lm-eval's highest sum (acc) and highest sum per character (acc_norm)."""
    import json

    from lm_eval import simple_evaluate

    from dbrx.eval import icl
    from dbrx.eval.harness import task_manager
    from dbrx.tokenizer import get_tokenizer

    items = [json.loads(line) for line in (DATA / "mc_icl.jsonl").read_text().splitlines()]
    tok = get_tokenizer()
    lm = DbrxLM(pretrained=str(checkpoint), dtype="fp32", device="cpu", batch_size=8)
    model = lm.model
    # the reference: the prompt built by hand, each choice scored alone
    ref = [[_direct(model, tok.encode(f"Question: {it['query']}\nAnswer:"), tok.encode(" " + c)) for c in it["choices"]]
           for it in items]
    n_tokens = [[len(tok.encode(" " + c)) for c in it["choices"]] for it in items]

    spec = icl.TaskSpec("mc_icl", str(DATA / "mc_icl.jsonl"), "multiple_choice", num_fewshot=0,
                        question_prelimiter="Question: ", continuation_delimiter="\nAnswer: ")
    scores = icl.item_scores(model, tok, spec, items)
    out = simple_evaluate(model=lm, tasks=["dbrx_test_mc_icl"], task_manager=task_manager(["dbrx_test_mc_icl"], DATA),
                          log_samples=True)
    adapter = [[tuple(r[0]) for r in resps] for resps in _samples(out, "dbrx_test_mc_icl")]
    assert len(scores) == len(adapter) == len(items)
    for it, s, a, r, n in zip(items, scores, adapter, ref, n_tokens, strict=True):
        assert [x.n_tokens for x in s] == n
        assert [x.logprob for x in s] == pytest.approx([lp for lp, _ in r], abs=1e-4)
        assert [lp for lp, _ in a] == pytest.approx([lp for lp, _ in r], abs=1e-4)
        assert [x.greedy for x in s] == [g for _, g in a] == [g for _, g in r]

    def argmax(values):
        return max(range(len(values)), key=values.__getitem__)

    mean_rule = [argmax([lp / k for (lp, _), k in zip(r, n)]) == it["gold"] for it, r, n in zip(items, ref, n_tokens)]
    sum_rule = [argmax([lp for lp, _ in r]) == it["gold"] for it, r in zip(items, ref)]
    char_rule = [argmax([lp / len(c) for (lp, _), c in zip(r, it["choices"])]) == it["gold"]
                 for it, r in zip(items, ref)]
    assert icl.item_results(model, tok, spec, items) == mean_rule
    assert icl.run_task(model, tok, spec, items)["accuracy"] == sum(mean_rule) / len(items)
    res = out["results"]["dbrx_test_mc_icl"]
    assert res["acc,none"] == pytest.approx(sum(sum_rule) / len(items), abs=1e-12)
    assert res["acc_norm,none"] == pytest.approx(sum(char_rule) / len(items), abs=1e-12)
    # the adapter's log-likelihoods under llm-foundry's rule give the ICL path's answers
    adapter_mean = [argmax([lp / k for (lp, _), k in zip(a, n)]) == it["gold"]
                    for it, a, n in zip(items, adapter, n_tokens)]
    assert adapter_mean == mean_rule
