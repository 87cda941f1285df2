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
