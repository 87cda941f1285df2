"""Serving several LoRA adapters at once (dbrx.lora.multi, the engine, the server, `dbrx serve --adapter NAME=DIR`).

The reference for each adapter is independent of the multi-adapter code: the base with that one adapter merged into
its weights (dbrx.lora.merge_lora), generating alone by recomputing the whole sequence (conftest.reference_greedy).
Two adapters differ in rank (4 and 6, both padded to 8), targets (one has no out_proj and no v1) and scaling
(rsLoRA), with random non-zero B factors.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import randomize_, reference_greedy

from dbrx import DbrxConfig, DbrxForCausalLM
from dbrx.cli import main
from dbrx.lora import LoraConfig, apply_lora, load_adapter, merge_lora, save_adapter
from dbrx.lora.multi import MultiLoraExperts, MultiLoraLinear, adapter_set, attach_adapters
from dbrx.lora.peft_format import read_peft
from dbrx.sampling import SamplingParams
from dbrx.serve.blocks import BlockPool
from dbrx.serve.engine import Engine, EngineConfig

ALL = ["Wqkv", "out_proj", "router", "w1", "v1", "w2"]
LORAS = {"a": LoraConfig(rank=4, alpha=8, targets=ALL),
         "b": LoraConfig(rank=6, alpha=4, rslora=True, targets=["Wqkv", "router", "w1", "w2"])}
VOCAB = 512


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(directory, base model, {None | adapter name: reference model with it merged}, model serving both)."""
    d = tmp_path_factory.mktemp("adapters")
    cfg = DbrxConfig.from_preset("dbrx-tiny", vocab_size=VOCAB, max_seq_len=128)
    base = randomize_(DbrxForCausalLM.from_config(cfg), seed=11, std=0.08).eval()
    base.save_pretrained(d / "base")
    refs = {None: base}
    for i, (name, lora) in enumerate(LORAS.items()):
        torch.manual_seed(i)
        m = apply_lora(copy.deepcopy(base), lora)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
        save_adapter(m, d / name, lora)
        refs[name] = merge_lora(load_adapter(copy.deepcopy(base), d / name)).eval()
    served = copy.deepcopy(base)
    attach_adapters(served, {n: read_peft(d / n, cfg) for n in LORAS})
    return d, base, refs, served


def _prompts(n, lo=3, hi=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _greedy(n=10):
    return SamplingParams(temperature=0, max_new_tokens=n, stop_ids=())


def _run(engine):
    outs, lps, cached = {}, {}, {}
    while engine.has_unfinished():
        for o in engine.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
            lps.setdefault(o.request_id, []).extend(o.new_logprobs or [])
            if o.finished:
                cached[o.request_id] = o.num_cached_tokens
    return outs, lps, cached


@torch.no_grad()
def _reference_logprobs(model, prompt, out):
    """The log-probability of each output token under `model`, from one forward of the whole sequence."""
    logits = model(torch.tensor([prompt + out[:-1]]))[0, len(prompt) - 1 :].float()  # (len(out), V)
    return torch.log_softmax(logits[:, :VOCAB], -1).gather(1, torch.tensor(out)[:, None])[:, 0].tolist()


# ---- the modules ------------------------------------------------------------------------------------------------
def test_adapters_are_stacked_padded_and_only_where_targeted(setup):
    _, _, _, served = setup
    block = served.transformer.blocks[0]
    experts, attn = block.ffn.experts, block.norm_attn_norm.attn
    assert isinstance(experts, MultiLoraExperts) and isinstance(attn.Wqkv, MultiLoraLinear)
    E = 8
    assert experts.lora_A["w1"].shape == (E * 3, 8, 64)  # (E*S, r, D), slot 0 the base, ranks 4 and 6 padded to 8
    assert experts.lora_B["w2"].shape == (E * 3, 64, 8)
    A = experts.lora_A["v1"].view(E, 3, 8, 64)
    assert not A[:, 0].any() and A[:, 1, :4].all() and not A[:, 1, 4:].any() and not A[:, 2].any()  # b has no v1
    assert not attn.out_proj.lora_B[2].any() and attn.out_proj.lora_B[1].any()
    assert adapter_set(served).names == ["a", "b"] and adapter_set(served).slot("b") == 2
    with pytest.raises(ValueError, match="unknown adapter 'c'; known: 'a', 'b'"):
        adapter_set(served).slot("c")
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        attach_adapters(served, {"c": {}})


@pytest.mark.parametrize("backend", ["auto", "loop", "dense"])
def test_one_forward_mixes_adapters_per_token(setup, backend):
    _, _, refs, served = setup
    x = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    names = ["b", None, "a"]
    slots = torch.tensor([adapter_set(served).slot(n) for n in names]).repeat_interleave(12)  # (B*T,)
    try:
        for block in served.transformer.blocks:
            block.ffn.backend = backend
        with torch.no_grad(), adapter_set(served).active(slots):
            y = served(x)
    finally:
        for block in served.transformer.blocks:
            block.ffn.backend = "auto"
    with torch.no_grad():
        for i, n in enumerate(names):
            torch.testing.assert_close(y[i], refs[n](x[i : i + 1])[0], rtol=0, atol=2e-5)
        assert (refs["a"](x) - refs[None](x)).abs().max() > 0.1  # the adapters change the logits
        assert (refs["b"](x) - refs[None](x)).abs().max() > 0.1
        torch.testing.assert_close(served(x), refs[None](x), rtol=0, atol=0)  # no slots set: the base model


@pytest.mark.parametrize("in_f,r", [(64, 8), (5, 3)])  # aligned: grouped_mm where torch has it; else the loop
def test_segment_lora_equals_a_per_row_reference(in_f, r):
    from dbrx.kernels.experts import _gmm
    from dbrx.kernels.lora_experts import rows_backend, segment_lora

    g = torch.Generator().manual_seed(0)
    S, N, out = 3, 11, 12
    x, A = torch.randn(N, in_f, generator=g), torch.randn(S, r, in_f, generator=g)
    B = torch.randn(S, out, r, generator=g)
    slots = torch.tensor([2, 0, 1, 1, 2, 0, 0, 2, 1, 2, 2])
    want = torch.stack([B[s] @ (A[s] @ x[n]) for n, s in enumerate(slots.tolist())])  # (N, out)
    torch.testing.assert_close(segment_lora(x, A, B, slots), want, rtol=1e-5, atol=1e-5)
    assert rows_backend(x, A, out) == ("grouped_mm" if in_f == 64 and _gmm is not None else "loop")


# ---- the engine ---------------------------------------------------------------------------------------------------
def test_a_mixed_batch_gives_each_request_its_adapters_reference(setup):
    _, _, refs, served = setup
    prompts = _prompts(6)
    names = [None, "a", "b", "a", None, "b"]
    engine = Engine(served, EngineConfig(block_size=4, num_blocks=200, max_num_batched_tokens=32, max_num_seqs=6))
    for i, (p, n) in enumerate(zip(prompts, names)):
        engine.add_request(f"r{i}", p, _greedy(), logprobs=0, adapter=n)
    outs, lps, _ = _run(engine)
    for i, (p, n) in enumerate(zip(prompts, names)):
        want = reference_greedy(refs[n], p, 10)
        assert outs[f"r{i}"] == want, (i, n)
        got = [e["logprob"] for e in lps[f"r{i}"]]
        assert max(abs(a - b) for a, b in zip(got, _reference_logprobs(refs[n], p, want))) < 1e-5, (i, n)
    assert any(reference_greedy(refs[None], p, 10) != outs[f"r{i}"] for i, p in enumerate(prompts) if names[i])
    assert engine.pool.usage == 0.0
    with pytest.raises(ValueError, match="unknown adapter 'c'"):
        engine.add_request("c", [1, 2], _greedy(), adapter="c")


def test_the_prefix_cache_is_shared_within_an_adapter_never_across(setup):
    _, _, refs, served = setup
    prompt = _prompts(1, lo=26, hi=27, seed=3)[0]
    engine = Engine(served, EngineConfig(block_size=4, num_blocks=200))
    got = {}
    for rid, n in [("a1", "a"), ("b1", "b"), ("base", None), ("a2", "a"), ("b2", "b")]:
        hits = engine.pool.prefix_hits
        engine.add_request(rid, prompt, _greedy(6), adapter=n)
        outs, _, cached = _run(engine)
        got[rid] = (outs[rid], cached[rid], engine.pool.prefix_hits - hits)
    for rid, n in [("a1", "a"), ("b1", "b"), ("base", None), ("a2", "a"), ("b2", "b")]:
        assert got[rid][0] == reference_greedy(refs[n], prompt, 6), rid
    assert got["a1"][1:] == got["b1"][1:] == got["base"][1:] == (0, 0)  # the same prompt, but other weights
    assert got["a2"][1:] == got["b2"][1:] == (24, 24)  # six full blocks of the first run of the same adapter
    assert got["a1"][0] != got["b1"][0]


def test_the_pool_salts_the_chain_of_hashes():
    pool = BlockPool(20, 4)
    ids = list(range(13))
    blocks, _ = pool.allocate_prompt(ids, "x")
    pool.commit_full_blocks(blocks, ids, "x")
    pool.free(blocks)
    for salt, hit in [(None, 0), ("y", 0), ("x", 12)]:
        got, n = pool.allocate_prompt(ids, salt)
        assert n == hit, salt
        pool.free(got)


def test_prompt_logprobs_run_under_the_requests_adapter(setup):
    _, _, refs, served = setup
    prompt = _prompts(1, seed=4)[0]
    engine = Engine(served, EngineConfig(block_size=4, num_blocks=50))
    got = [e["logprob"] for e in engine.prompt_logprobs(prompt, 0, adapter="b")[1:]]
    with torch.no_grad():
        lp = torch.log_softmax(refs["b"](torch.tensor([prompt]))[0, :-1], -1)  # (T-1, V)
    want = lp.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0].tolist()
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-5


# ---- the server ---------------------------------------------------------------------------------------------------
def test_the_server_lists_the_adapters_and_picks_one_by_model_name(setup):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from conftest import serve_model

    _, _, refs, served = setup
    prompt = _prompts(1, seed=5)[0]
    with serve_model(served, "tiny") as (url, _):
        models = httpx.get(f"{url}/v1/models").json()["data"]
        assert [(m["id"], m["parent"]) for m in models] == [("tiny", None), ("a", "tiny"), ("b", "tiny")]
        for name in ["a", "b", "tiny"]:
            r = httpx.post(f"{url}/v1/completions", timeout=60, json={
                "model": name, "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 0})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model"] == name and body["usage"]["completion_tokens"] == 8
            want = reference_greedy(refs[None if name == "tiny" else name], prompt, 8)
            lps = body["choices"][0]["logprobs"]["token_logprobs"]
            ref = _reference_logprobs(refs[None if name == "tiny" else name], prompt, want)
            assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(lps, ref)), name
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "c", "messages": [{"role": "user", "content": "hi"}]})
        error = r.json()["error"]
        assert r.status_code == 404 and error["code"] == "model_not_found" and error["param"] == "model"
        assert error["message"] == "model 'c' not found; this server serves 'tiny', 'a', 'b'"
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}


# ---- the command line ---------------------------------------------------------------------------------------------
def _serve(monkeypatch, capsys, *args):
    """`dbrx serve ...` with run_server replaced: returns (exit status, the app it would serve, stderr)."""
    pytest.importorskip("fastapi")
    import dbrx.serve.api as api

    apps = []
    monkeypatch.setattr(api, "run_server", lambda app, **kw: apps.append(app))
    capsys.readouterr()
    code = main(["serve", *args, "--kv-memory", "1MiB"])
    return code, apps[0] if apps else None, capsys.readouterr().err


def test_serve_cli_names_adapters(setup, monkeypatch, capsys):
    httpx = pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    d = setup[0]
    code, app, err = _serve(monkeypatch, capsys, "--model", str(d / "base"), "--adapter", f"sql={d / 'a'}",
                            "--adapter", str(d / "b"))  # DIR alone: named "b" after the directory
    assert code == 0 and "base (+ adapters sql, b)" in err, err
    with TestClient(app) as client:
        assert [(m["id"], m["parent"]) for m in client.get("/v1/models").json()["data"]] == [
            ("base", None), ("sql", "base"), ("b", "base")]
    assert httpx  # (TestClient runs on httpx)


@pytest.mark.parametrize("adapters,match", [
    (["=DIR"], "expected NAME=DIR or DIR"),
    (["x="], "expected NAME=DIR or DIR"),
    (["a b=DIR"], "expected NAME=DIR or DIR"),
    (["x=@a", "x=@b"], "the name 'x' is given twice"),
    (["@a", "@a"], "the name 'a' is given twice"),
    (["base=@a"], "'base' is the base model's name"),
    (["@base"], "'base' is the base model's name"),
    (["x=@nowhere"], "adapter directory not found"),
    (["x=@other"], "expected [2, 64] for this base model (an adapter for another model?)"),
])
def test_serve_cli_refuses_bad_adapters_in_one_line(setup, tmp_path, monkeypatch, capsys, adapters, match):
    d = setup[0]
    if any("@other" in a for a in adapters):
        cfg = DbrxConfig.from_preset("dbrx-tiny", vocab_size=VOCAB, d_model=32, ffn_hidden_size=64)
        save_adapter(apply_lora(DbrxForCausalLM.from_config(cfg), LoraConfig(rank=2, targets=["router"])), d / "other")
    args = [x for a in adapters for x in ("--adapter", a.replace("@", f"{d}/"))]
    code, app, err = _serve(monkeypatch, capsys, "--model", str(d / "base"), *args)
    assert code == 2 and app is None
    assert err.startswith("dbrx serve: error:") and match in err and err.count("\n") == 1, err


# ---- a quantized base -------------------------------------------------------------------------------------------
def test_several_adapters_on_a_quantized_base_match_one_adapter_each(setup):
    """int8 base: the base model's rows equal the quantized model alone, each adapter's its one-adapter model (up to
    the bf16 rounding of the quantized products' inputs)."""
    from dbrx.loading import load_pretrained
    from dbrx.quant.layers import QuantExperts

    d = setup[0]
    if not (d / "q8").exists():
        assert main(["quantize", str(d / "base"), str(d / "q8"), "--bits", "8"]) == 0
    model = load_pretrained(d / "q8")
    cfg = model.config
    adapters = attach_adapters(model, {n: read_peft(d / n, cfg) for n in LORAS})
    assert isinstance(model.transformer.blocks[0].ffn.experts.base, QuantExperts)
    x = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(2))
    names = ["a", None, "b"]
    with torch.no_grad(), adapters.active(torch.tensor([adapters.slot(n) for n in names]).repeat_interleave(10)):
        y = model(x)
    with torch.no_grad():
        for i, n in enumerate(names):
            one = load_pretrained(d / "q8", adapter=d / n) if n else load_pretrained(d / "q8")
            want = one(x[i : i + 1])[0]
            if n is None:  # the base's rows are QuantExperts' own
                torch.testing.assert_close(y[i], want, rtol=0, atol=1e-5)
            else:  # the one-adapter path rounds p * h to bf16 for the quantized w2, this one h (then times p)
                assert ((y[i] - want).norm() / want.norm()).item() < 1e-2, n
