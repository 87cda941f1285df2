"""The serving engine against a recompute-everything greedy reference (conftest.reference_greedy): greedy outputs
equal each prompt generated alone (batch invariance), whatever else runs, through chunked prefill, prefix caching
and preemption."""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import randomize_, reference_greedy

from dbrx import DbrxConfig, DbrxForCausalLM
from dbrx.sampling import SamplingParams
from dbrx.serve.engine import AsyncEngine, Engine, EngineConfig, QueueFull


@pytest.fixture(scope="module")
def model():
    cfg = DbrxConfig.from_preset("dbrx-tiny", vocab_size=512, max_seq_len=256)
    return randomize_(DbrxForCausalLM.from_config(cfg), seed=11, std=0.08).eval()


def _prompts(n, lo=3, hi=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 500, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _greedy(max_new=12):
    return SamplingParams(temperature=0, max_new_tokens=max_new, stop_ids=())


def _run(engine, max_steps=10_000):
    outs: dict[str, list[int]] = {}
    reasons = {}
    steps = 0
    while engine.has_unfinished():
        for o in engine.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                reasons[o.request_id] = (o.finish_reason, o.num_cached_tokens)
        steps += 1
        assert steps < max_steps
    return outs, reasons


def test_greedy_outputs_equal_the_reference_alone(model):
    prompts = _prompts(6)
    solo = [reference_greedy(model, p, 12) for p in prompts]  # no KV cache, one prompt at a time
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=200, max_num_batched_tokens=32, max_num_seqs=4))
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, _greedy())
    outs, reasons = _run(engine)
    for i in range(len(prompts)):
        assert outs[f"r{i}"] == solo[i], i
        assert reasons[f"r{i}"][0] == "length"
    assert engine.pool.usage == 0.0  # every block freed


def test_greedy_requests_are_unaffected_by_sampled_neighbours_and_preemption(model):
    prompts = _prompts(5, seed=1)
    solo = [reference_greedy(model, p, 10) for p in prompts]
    # a pool far too small for 10 concurrent requests: the scheduler must preempt and recompute
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=20, max_num_batched_tokens=24, max_num_seqs=10))
    for i, p in enumerate(prompts):
        engine.add_request(f"g{i}", p, _greedy(10))
        engine.add_request(f"s{i}", p, SamplingParams(temperature=1.0, top_k=50, top_p=0.9, max_new_tokens=10,
                                                      seed=i, stop_ids=(), repetition_penalty=1.2))
    outs, _ = _run(engine)
    assert engine.scheduler.num_preemptions > 0
    for i in range(len(prompts)):
        assert outs[f"g{i}"] == solo[i], i
        assert len(outs[f"s{i}"]) == 10


def test_a_seeded_request_draws_the_same_tokens_whatever_runs_beside_it(model):
    p = _prompts(1, seed=2)[0]
    params = SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=12, seed=123, stop_ids=())
    alone = Engine(model, EngineConfig(block_size=4, num_blocks=100))
    alone.add_request("x", p, params)
    a, _ = _run(alone)
    crowd = Engine(model, EngineConfig(block_size=4, num_blocks=100, max_num_batched_tokens=16))
    for i, q in enumerate(_prompts(5, seed=3)):
        crowd.add_request(f"o{i}", q, SamplingParams(temperature=1.0, max_new_tokens=8, seed=i, stop_ids=()))
    crowd.add_request("x", p, params)
    b, _ = _run(crowd)
    assert a["x"] == b["x"] and len(a["x"]) == 12


def test_a_shared_system_prompt_is_computed_once(model):
    system = _prompts(1, lo=40, hi=41, seed=4)[0]
    questions = _prompts(2, lo=5, hi=8, seed=5)
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=100))
    engine.add_request("first", system + questions[0], _greedy(4))
    first, r1 = _run(engine)
    engine.add_request("second", system + questions[1], _greedy(4))
    second, r2 = _run(engine)
    assert r1["first"][1] == 0 and r2["second"][1] == 40  # ten full blocks of the system prompt from the cache
    assert second["second"] == reference_greedy(model, system + questions[1], 4)


def test_long_prompts_are_prefilled_in_chunks_while_decodes_continue(model):
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=200, max_num_batched_tokens=16, max_num_seqs=4))
    short = _prompts(2, lo=3, hi=5, seed=6)
    for i, p in enumerate(short):
        engine.add_request(f"d{i}", p, _greedy(30))
    engine.step()  # both short prompts prefilled
    engine.add_request("long", _prompts(1, lo=150, hi=151, seed=7)[0], _greedy(2))
    for _ in range(8):  # the 150-token prompt takes ~11 steps of 16 tokens; the decodes never stall
        got = {o.request_id for o in engine.step()}
        assert {"d0", "d1"} <= got


def test_bad_requests_are_refused_and_the_queue_is_bounded(model):
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=50, max_waiting=2))
    with pytest.raises(ValueError, match="max_model_len|exceeds"):
        engine.add_request("big", [1] * 250, _greedy(20))
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("v", [10**6], _greedy())
    engine.add_request("a", [1, 2], _greedy())
    engine.add_request("b", [1, 2], _greedy())
    with pytest.raises(QueueFull):
        engine.add_request("c", [1, 2], _greedy())
    with pytest.raises(ValueError, match="already"):
        engine.add_request("a", [1, 2], _greedy())


def test_async_engine_streams_and_frees_an_abandoned_request(model):
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=100))
    front = AsyncEngine(engine)

    async def main():
        got = []
        async for out in front.generate("a", [5, 6, 7], _greedy(6)):
            got += out.new_token_ids
        agen = front.generate("b", [5, 6, 7], _greedy(200))
        first = await agen.__anext__()
        await agen.aclose()  # the client went away
        return got, first

    try:
        got, first = asyncio.run(main())
    finally:
        front.shutdown()
    assert got == reference_greedy(model, [5, 6, 7], 6)
    assert first.new_token_ids and not engine.has_unfinished() and engine.pool.usage == 0.0


def test_stop_ids_end_a_request_without_being_output(model):
    p = _prompts(1, seed=8)[0]
    free = reference_greedy(model, p, 12)
    stop = free[4]
    params = SamplingParams(temperature=0, max_new_tokens=12, stop_ids=(stop,))
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=100))
    engine.add_request("s", p, params)
    outs, reasons = _run(engine)
    assert outs["s"] == free[: free.index(stop)]
    assert reasons["s"][0] == "stop"


def test_unknown_attention_backend_is_refused():
    from dbrx.serve.engine import EngineConfig

    with pytest.raises(ValueError, match="unknown attention backend 'flash'; known: reference"):
        EngineConfig(attention_backend="flash").validate()
