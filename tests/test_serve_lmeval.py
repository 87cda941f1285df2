"""lm-evaluation-harness's `local-completions` scores a small local multiple-choice task through `dbrx serve` with
the same accuracy as scoring it in process.

The task (tests/data/lmeval: ten questions of four choices, JSON lines) is found through a TaskManager over that
folder. lm-eval tokenizes with the server's own tokenizer (vLLM's /tokenize, "remote" backend: offline, the
project's cl100k), sends token ids in batches to /v1/completions (echo, logprobs 1, max_tokens 1) and sums the
continuation's prompt log-probabilities. The reference scores the same (context, continuation) pairs with one plain
forward of the model each and applies lm-eval's multiple-choice rules: acc picks the largest log-likelihood,
acc_norm the largest per character of the choice.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
lm_eval = pytest.importorskip("lm_eval")
httpx = pytest.importorskip("httpx")

import torch  # noqa: E402
from conftest import SERVED_NAME, randomize_, serve_model  # noqa: E402
from lm_eval.models.openai_completions import LocalCompletionsAPI  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import check_remote_tokenizer_support  # noqa: E402

from dbrx import DbrxConfig, DbrxForCausalLM  # noqa: E402
from dbrx.tokenizer import get_tokenizer  # noqa: E402
from dbrx.tokens import REAL_VOCAB_SIZE, STOP_IDS, UNUSED_IDS  # noqa: E402

TASK_DIR = Path(__file__).parent / "data" / "lmeval"
TASK = "dbrx_tiny_mc"


def model_args(url: str, context: int) -> dict:
    """`local-completions` offline against our server: its tokenizer endpoints ("remote") give the token ids, which
    are sent as ids (tokenized_requests) so that the server scores exactly what lm-eval split into context and
    continuation. max_retries 1: a failing request fails the test at once instead of after back-off."""
    return {"model": SERVED_NAME, "base_url": f"{url}/v1/completions", "tokenizer_backend": "remote",
            "tokenized_requests": True, "batch_size": 4, "num_concurrent": 1, "max_length": context,
            "max_retries": 1, "timeout": 120}


def log_softmax_real(logits: torch.Tensor) -> torch.Tensor:
    """(T, V) log-probabilities over the ids that are tokens (as the server: no padding rows, no cl100k gaps)."""
    logits = logits[:, :REAL_VOCAB_SIZE].double()
    logits[:, list(UNUSED_IDS)] = -math.inf
    return torch.log_softmax(logits, -1)


@torch.no_grad()
def score(model: torch.nn.Module, context: str, continuation: str) -> tuple[float, bool]:
    """(log-likelihood of `continuation` after `context`, whether greedy decoding makes it), in process.

    Split as lm-eval does for a causal model: trailing spaces of the context go to the continuation, the whole text
    is encoded once and the continuation is what follows the context's own encoding.
    """
    tok = get_tokenizer()
    stripped = context.rstrip()
    continuation, context = context[len(stripped):] + continuation, stripped
    whole, n_ctx = tok.encode(context + continuation), len(tok.encode(context))
    lp = log_softmax_real(model(torch.tensor([whole]))[0])  # (T, V): position t predicts token t + 1
    targets = torch.tensor(whole[n_ctx:])
    rows = lp[n_ctx - 1 : len(whole) - 1]
    loglik = float(rows.gather(1, targets[:, None]).sum())
    return loglik, bool((rows.argmax(-1) == targets).all())


def reference(model: torch.nn.Module, docs: list[dict]) -> list[dict]:
    """Per document: the requests' (context, continuation), their scores, and acc and acc_norm by lm-eval's rules."""
    out = []
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"  # the task's doc_to_text; target_delimiter " "
        args = [(context, f" {choice}") for choice in doc["choices"]]
        scores = [score(model, *a) for a in args]
        lls = [ll for ll, _ in scores]
        pred = max(range(len(lls)), key=lambda i: lls[i])
        pred_norm = max(range(len(lls)), key=lambda i: lls[i] / len(doc["choices"][i]))
        out.append({"arguments": args, "scores": scores, "acc": float(pred == doc["label"]),
                    "acc_norm": float(pred_norm == doc["label"])})
    return out


def test_local_completions_through_the_server_equals_scoring_in_process(served, monkeypatch, tmp_path):
    model, url, _ = served
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path))  # the JSON task's cache stays here
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(TASK_DIR)  # the task's data_files is relative

    # lm-eval's default tokenizer_backend ("auto") would find the remote tokenizer too
    assert check_remote_tokenizer_support(f"{url}/v1/completions")
    out = lm_eval.simple_evaluate(model="local-completions", model_args=model_args(url, model.config.max_seq_len),
                                  tasks=[TASK], task_manager=TaskManager(include_path=str(TASK_DIR),
                                                                         include_defaults=False),
                                  log_samples=True, bootstrap_iters=0, random_seed=0)

    docs = [json.loads(line) for line in (TASK_DIR / "items.jsonl").read_text().splitlines()]
    ref = reference(model, docs)
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(len(docs)))
    for s, r in zip(samples, ref, strict=True):
        assert [tuple(a) for a in s["arguments"]] == r["arguments"], s["doc_id"]  # the requests scored
        for (ll, greedy), (ref_ll, ref_greedy) in zip([resp[0] for resp in s["resps"]], r["scores"], strict=True):
            assert math.isclose(ll, ref_ll, abs_tol=1e-4), (s["doc_id"], ll, ref_ll)
            assert greedy == ref_greedy, s["doc_id"]
        assert (s["acc"], s["acc_norm"]) == (r["acc"], r["acc_norm"]), s["doc_id"]
    metrics = out["results"][TASK]
    assert metrics["acc,none"] == pytest.approx(sum(r["acc"] for r in ref) / len(ref), abs=1e-12)
    assert metrics["acc_norm,none"] == pytest.approx(sum(r["acc_norm"] for r in ref) / len(ref), abs=1e-12)


def test_tokenizer_endpoints(served):
    _, url, _ = served
    tok = get_tokenizer()
    text = "Question: What do bees make?<|endoftext|>"
    got = httpx.post(f"{url}/tokenize", json={"prompt": text, "add_special_tokens": False}, timeout=10).json()
    assert got["tokens"] == tok.encode(text, allow_special=True) and got["tokens"][-1] == tok.eos_id
    assert got["count"] == len(got["tokens"]) and got["max_model_len"] == 256
    back = httpx.post(f"{url}/detokenize", json={"tokens": got["tokens"]}, timeout=10).json()
    assert back == {"prompt": text}
    info = httpx.get(f"{url}/tokenizer_info", timeout=10).json()
    assert info["eos_token"] == "<|endoftext|>" and info["pad_token"] == "<|pad|>"
    bad = httpx.post(f"{url}/detokenize", json={"tokens": [100256]}, timeout=10)  # a gap in cl100k's ids
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    for path, body, status in (("tokenize", {"prompt": "hi", "model": "gpt-4"}, 404), ("tokenize", {"prompt": 5}, 400),
                               ("detokenize", {"tokens": [-1]}, 400), ("detokenize", {"tokens": "12"}, 400)):
        response = httpx.post(f"{url}/{path}", json=body, timeout=10)
        assert response.status_code == status and response.json()["error"]["message"], (path, body)


@torch.no_grad()
def test_a_stop_id_as_the_one_generated_token_keeps_its_entry():
    """lm-eval drops the last logprobs entry as the generated token; when that token is a stop id (likely after the
    end of a text) the entry must still be there, or the continuation's last token goes unscored."""
    cfg = DbrxConfig.from_preset("dbrx-tiny", max_seq_len=64)
    model = randomize_(DbrxForCausalLM.from_config(cfg), seed=1, std=0.08).eval()
    tok = get_tokenizer()
    ids, n_ctx = tok.encode("The end."), len(tok.encode("The end"))  # scoring "." after "The end"
    hidden = {}
    hook = model.lm_head.register_forward_hook(lambda m, args, out: hidden.update(h=args[0][0, -1]))
    model(torch.tensor([ids]))
    hook.remove()
    model.lm_head.weight[STOP_IDS[0]] = 10 * hidden["h"]  # the model now ends this text greedily
    lp = log_softmax_real(model(torch.tensor([ids]))[0])
    assert int(lp[-1].argmax()) == STOP_IDS[0]

    with serve_model(model) as (url, _):
        body = {"model": SERVED_NAME, "prompt": [ids], "max_tokens": 1, "echo": True, "logprobs": 1,
                "temperature": 0, "seed": 1234}  # lm-eval's log-likelihood request
        out = httpx.post(f"{url}/v1/completions", json=body, timeout=30).json()
    assert len(out["choices"][0]["logprobs"]["token_logprobs"]) == len(ids) + 1, "the stop id has no entry"
    assert out["choices"][0]["text"] == "The end."  # a stop id is no text
    [(loglik, _)] = LocalCompletionsAPI.parse_logprobs(outputs=out, tokens=[ids], ctxlens=[n_ctx])
    expected = sum(float(lp[t - 1, ids[t]]) for t in range(n_ctx, len(ids)))
    assert math.isclose(loglik, expected, abs_tol=1e-4), (loglik, expected)
