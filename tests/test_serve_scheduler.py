"""The serving engine's bookkeeping: the block pool's prefix cache and refcounts, and the scheduler's steps.

The engine is simulated: a "KV cache" array holds token ids at their slots, and a request's next token is a
deterministic function of the ids read back from its slots, so a wrong block table, a wrong prefix-cache hit or a
lost or duplicated token under preemption changes the outputs.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from dbrx.serve.blocks import NULL_BLOCK, BlockPool, NoFreeBlocks
from dbrx.serve.scheduler import Request, Scheduler, SchedulerOutput, Status


def snapshot(pool: BlockPool) -> tuple:
    return (pool.num_free, [pool.ref_count(b) for b in range(pool.num_blocks)],
            [pool.cached_hash(b) for b in range(pool.num_blocks)], pool.prefix_hits, pool.prefix_queries,
            list(pool._fresh), list(pool._evictable))


def next_token(ids: list[int]) -> int:
    return (sum(ids) * 31 + len(ids)) % 1000 + 1


def alone(prompt: list[int], max_tokens: int) -> list[int]:
    """The outputs a request produces with nobody else around."""
    ids = list(prompt)
    for _ in range(max_tokens):
        ids.append(next_token(ids))
    return ids[len(prompt):]


class FakeEngine:
    """Writes each scheduled token into its slot and samples from the ids read back through the block table."""

    def __init__(self, sched: Scheduler):
        self.sched = sched
        pool = sched.pool
        self.kv: list[int | None] = [None] * (pool.num_blocks * pool.block_size)

    def step(self) -> tuple[SchedulerOutput, list[Request]]:
        sched, pool = self.sched, self.sched.pool
        out = sched.schedule()
        # FCFS order: running and waiting each by arrival, every running request ahead of every waiting one
        order = [r.arrival for r in sched.running] + [r.arrival for r in sched.waiting]
        assert order == sorted(order)
        assert 0 < out.num_batched_tokens <= sched.max_num_batched_tokens
        assert len(out.scheduled) <= sched.max_num_seqs
        sampled = {}
        for req, n in out.scheduled:
            assert req.status is Status.RUNNING
            start = req.num_computed
            for pos, slot in zip(range(start, start + n), pool.slots(req.block_ids, start, start + n)):
                assert slot // pool.block_size != NULL_BLOCK
                assert pool.ref_count(slot // pool.block_size) == 1, "writing into a shared block"
                self.kv[slot] = req.all_ids[pos]
            if start + n == req.num_tokens:
                cached = [self.kv[s] for s in pool.slots(req.block_ids, 0, req.num_tokens)]
                assert cached == req.all_ids
                sampled[req.request_id] = next_token(cached)
            else:
                sampled[req.request_id] = None
        return out, sched.update(out, sampled)


def run_to_end(sched: Scheduler, engine: FakeEngine | None = None, max_steps: int = 10_000) -> int:
    engine = engine or FakeEngine(sched)
    steps = 0
    while sched.has_unfinished():
        engine.step()
        steps += 1
        assert steps < max_steps
    return steps


# ---- the block pool ------------------------------------------------------------------------------------------


def test_shared_prefix_reuses_the_same_blocks():
    pool = BlockPool(num_blocks=16, block_size=4)
    a = list(range(100, 110))  # 2 full blocks + 2 tokens
    blocks_a, computed_a = pool.allocate_prompt(a)
    assert computed_a == 0 and len(blocks_a) == 3
    pool.commit_full_blocks(blocks_a, a)
    b = a[:8] + [7, 7, 7]
    blocks_b, computed_b = pool.allocate_prompt(b)
    assert blocks_b[:2] == blocks_a[:2] and blocks_b[2] not in blocks_a
    assert computed_b == 2 * 4
    assert [pool.ref_count(x) for x in blocks_a[:2]] == [2, 2]
    assert pool.prefix_hits == 8 and pool.prefix_queries == len(a) + len(b)


def test_a_whole_cached_prompt_still_computes_its_last_token():
    pool = BlockPool(num_blocks=16, block_size=4)
    a = list(range(12))  # exactly 3 full blocks
    blocks_a, _ = pool.allocate_prompt(a)
    pool.commit_full_blocks(blocks_a, a)
    blocks_b, computed = pool.allocate_prompt(a)
    assert computed == 2 * 4 < len(a)
    assert blocks_b[:2] == blocks_a[:2] and blocks_b[2] != blocks_a[2]
    # the recomputed last block is a duplicate: it stays uncached, one block per hash
    pool.commit_full_blocks(blocks_b, a)
    assert pool.cached_hash(blocks_b[2]) is None and pool.cached_hash(blocks_a[2]) is not None


def test_the_hash_is_chained():
    pool = BlockPool(num_blocks=16, block_size=4)
    a = [1, 1, 1, 1, 2, 2, 2, 2, 3]
    blocks, _ = pool.allocate_prompt(a)
    pool.commit_full_blocks(blocks, a)
    _, computed = pool.allocate_prompt([9, 9, 9, 9, 2, 2, 2, 2, 3])  # same second block, different parent
    assert computed == 0
    assert pool.cached_hash(blocks[0]) != pool.cached_hash(blocks[1])


def test_freed_cached_blocks_hit_until_evicted_least_recently_freed_first():
    pool = BlockPool(num_blocks=7, block_size=4)  # 6 usable blocks
    p, q = [1, 2, 3, 4, 5], [6, 7, 8, 9, 10]
    for prompt in (p, q):  # P's full block is freed before Q's
        blocks, _ = pool.allocate_prompt(prompt)
        pool.commit_full_blocks(blocks, prompt[:4])
        pool.free(blocks)
    assert pool.num_free == 6 and pool.usage == 0.0
    blocks, computed = pool.allocate_prompt(p)  # a hit after free
    assert computed == 4
    pool.free(blocks)  # P's block is now the most recently freed
    big = list(range(50, 70))  # 5 blocks, no hit: 4 uncached blocks, then one eviction
    pool.free(pool.allocate_prompt(big)[0])
    assert pool.allocate_prompt(q)[1] == 0  # Q's block (least recently freed) was evicted
    assert pool.allocate_prompt(p)[1] == 4  # P's still cached


def test_a_sequence_frees_its_tail_first_so_its_prefix_is_evicted_last():
    pool = BlockPool(num_blocks=4, block_size=2)  # 3 usable blocks
    a = [1, 2, 3, 4, 5]
    blocks, _ = pool.allocate_prompt(a)
    pool.commit_full_blocks(blocks, a[:4])
    pool.free(blocks)
    pool.allocate_prompt([9, 9, 9])  # 2 blocks: the uncached tail, then one eviction: a's second block
    assert pool.cached_hash(blocks[0]) is not None and pool.cached_hash(blocks[1]) is None


def test_no_two_cached_blocks_share_a_hash():
    pool = BlockPool(num_blocks=64, block_size=2)
    rng = random.Random(0)
    live = []
    for _ in range(200):
        prompt = [rng.randrange(3) for _ in range(rng.randrange(1, 9))]
        try:
            blocks, _ = pool.allocate_prompt(prompt)
        except NoFreeBlocks:
            pool.free(live.pop(0))
            continue
        pool.commit_full_blocks(blocks, prompt)
        live.append(blocks)
        hashes = [h for h in (pool.cached_hash(b) for b in range(pool.num_blocks)) if h is not None]
        assert len(hashes) == len(set(hashes))


def test_no_free_blocks_leaves_the_pool_unchanged():
    pool = BlockPool(num_blocks=5, block_size=4)
    a = list(range(8))
    blocks, _ = pool.allocate_prompt(a)
    pool.commit_full_blocks(blocks, a)
    pool.free(blocks)
    held, _ = pool.allocate_prompt([1, 2, 3])  # 1 in use; 3 free, 2 of them cached
    before = snapshot(pool)
    with pytest.raises(NoFreeBlocks):
        pool.allocate_prompt(list(range(100, 116)))  # 4 blocks
    with pytest.raises(NoFreeBlocks):
        pool.ensure_capacity(held, 17)  # 5 blocks
    assert snapshot(pool) == before
    # a hit block on the free list is not also counted as free: 2 hits + 2 fresh > 3
    with pytest.raises(NoFreeBlocks):
        pool.allocate_prompt(a + list(range(8)) + [0])
    assert snapshot(pool) == before


def test_ensure_capacity_grows_one_block_at_a_boundary_and_slots_map_positions():
    pool = BlockPool(num_blocks=8, block_size=4)
    blocks, _ = pool.allocate_prompt([1, 2, 3, 4])
    pool.ensure_capacity(blocks, 4)
    assert len(blocks) == 1
    pool.ensure_capacity(blocks, 5)
    assert len(blocks) == 2
    assert pool.slots(blocks, 2, 6) == [blocks[0] * 4 + 2, blocks[0] * 4 + 3, blocks[1] * 4, blocks[1] * 4 + 1]
    assert NULL_BLOCK not in blocks
    with pytest.raises(ValueError):
        pool.slots(blocks, 0, 9)
    with pytest.raises(ValueError):
        pool.free([blocks[0], blocks[0]])


def test_the_pool_never_leaks():
    rng = random.Random(1)
    pool = BlockPool(num_blocks=20, block_size=3)
    start = pool.num_free
    seqs: list[tuple[list[int], list[int]]] = []  # (block ids, token ids)
    for _ in range(2000):
        op = rng.random()
        if op < 0.35 or not seqs:
            prompt = [rng.randrange(4) for _ in range(rng.randrange(1, 12))]
            before = snapshot(pool)
            try:
                blocks, computed = pool.allocate_prompt(prompt)
            except NoFreeBlocks:
                assert snapshot(pool) == before
                continue
            assert computed < len(prompt) and computed % 3 == 0
            pool.commit_full_blocks(blocks, prompt)
            seqs.append((blocks, prompt))
        elif op < 0.75:
            blocks, tokens = rng.choice(seqs)
            before = snapshot(pool)
            try:
                pool.ensure_capacity(blocks, len(tokens) + 1)
            except NoFreeBlocks:
                assert snapshot(pool) == before
                continue
            tokens.append(rng.randrange(4))
            pool.commit_full_blocks(blocks, tokens)
        else:
            blocks, _ = seqs.pop(rng.randrange(len(seqs)))
            pool.free(blocks)
        in_use = {b for blocks, _ in seqs for b in blocks}
        assert pool.num_free == start - len(in_use)
    for blocks, _ in seqs:
        pool.free(blocks)
    assert pool.num_free == start and pool.usage == 0.0
    assert all(pool.ref_count(b) == 0 for b in range(pool.num_blocks))


# ---- the scheduler -------------------------------------------------------------------------------------------


def test_add_refuses_requests_that_cannot_run():
    sched = Scheduler(BlockPool(16, 4), max_num_seqs=4, max_num_batched_tokens=32, max_model_len=32)
    with pytest.raises(ValueError, match="empty"):
        sched.add(Request("a", [], max_tokens=4))
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add(Request("b", [1] * 30, max_tokens=3))
    sched.add(Request("c", [1] * 29, max_tokens=3))
    with pytest.raises(ValueError, match="already"):
        sched.add(Request("c", [1], max_tokens=3))
    with pytest.raises(ValueError, match="blocks"):
        Scheduler(BlockPool(4, 4), 4, 32, 64).add(Request("d", [1] * 20, max_tokens=4))


def test_budget_and_max_num_seqs_are_respected_and_admission_is_fcfs():
    rng = random.Random(2)
    sched = Scheduler(BlockPool(64, 4), max_num_seqs=3, max_num_batched_tokens=10, max_model_len=64)
    reqs = [Request(f"r{i}", [rng.randrange(50) for _ in range(rng.randrange(1, 30))], max_tokens=rng.randrange(1, 8))
            for i in range(12)]
    for r in reqs:
        sched.add(r)
    engine = FakeEngine(sched)
    admitted: list[str] = []
    while sched.has_unfinished():
        out, _ = engine.step()  # FakeEngine asserts the budget and max_num_seqs
        admitted += [r.request_id for r, _ in out.scheduled if r.request_id not in admitted]
        assert sum(r.status is Status.RUNNING for r in reqs) <= 3
    assert admitted == [r.request_id for r in reqs]
    for r in reqs:
        assert r.output_ids == alone(r.prompt_ids, r.max_tokens) and r.finish_reason == "length"


@pytest.mark.parametrize("budget, threshold", [(64 + 3, None), (512, 64)])
def test_a_long_prompt_is_chunked_while_running_requests_decode_every_step(budget, threshold):
    sched = Scheduler(BlockPool(512, 16), max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=2048,
                      long_prefill_threshold=threshold)
    engine = FakeEngine(sched)
    decoders = [Request(f"d{i}", [i + 1] * 5, max_tokens=100) for i in range(3)]
    for r in decoders:
        sched.add(r)
    engine.step()  # the three short prompts are prefilled in one step
    assert all(r.num_computed == 5 and len(r.output_ids) == 1 for r in decoders)
    long = Request("long", list(range(1000)), max_tokens=1)
    sched.add(long)
    steps = 0
    while long.status is not Status.FINISHED:
        before = [len(r.output_ids) for r in decoders]
        out, _ = engine.step()
        steps += 1
        assert [len(r.output_ids) for r in decoders] == [b + 1 for b in before]
        assert dict((r.request_id, n) for r, n in out.scheduled)["long"] == min(64, 1000 - 64 * (steps - 1))
    assert steps == 16
    assert long.output_ids == alone(long.prompt_ids, 1)


def test_preemption_by_recompute_loses_and_duplicates_nothing():
    rng = random.Random(3)
    # 12 usable blocks of 4 slots: a few requests fill it, so decodes run out of blocks and preempt
    sched = Scheduler(BlockPool(13, 4), max_num_seqs=8, max_num_batched_tokens=16, max_model_len=40)
    shared = [rng.randrange(1000) for _ in range(8)]
    reqs = []
    for i in range(10):
        prompt = (shared if i % 2 else []) + [rng.randrange(1000) for _ in range(rng.randrange(1, 10))]
        reqs.append(Request(f"r{i}", prompt, max_tokens=rng.randrange(8, 20)))
        sched.add(reqs[-1])
    run_to_end(sched)
    assert sched.num_preemptions > 0
    assert sched.pool.prefix_hits > 0
    for r in reqs:
        assert r.output_ids == alone(r.prompt_ids, r.max_tokens), r.request_id
        assert r.finish_reason == "length" and r.block_ids == []
    assert sched.pool.num_free == sched.pool.num_blocks - 1


def test_preemption_frees_the_latest_arrival_and_requeues_it_at_the_front():
    pool = BlockPool(5, 4)  # 4 usable blocks
    sched = Scheduler(pool, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=16)
    c, a, b = Request("c", list(range(10, 18)), 6), Request("a", [1, 2, 3], 6), Request("b", [4, 5, 6], 6)
    for r in (c, a, b):
        sched.add(r)
    engine = FakeEngine(sched)
    engine.step()  # all three prefilled: 2 + 1 + 1 blocks, the pool is full
    d = Request("d", [7], 6)
    sched.add(d)
    out, _ = engine.step()  # c's 9th token needs a third block: b, the latest arrival, makes room
    assert out.preempted == [b] and sched.num_preemptions == 1
    assert [r.request_id for r, _ in out.scheduled] == ["c", "a"]
    assert b.status is Status.WAITING and b.num_computed == 0 and b.block_ids == [] and len(b.output_ids) == 1
    assert list(sched.waiting) == [b, d]
    run_to_end(sched, engine)
    for r in (a, b, c, d):
        assert r.output_ids == alone(r.prompt_ids, r.max_tokens)


def test_stop_ids_finish_a_request():
    sched = Scheduler(BlockPool(16, 4), max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64)
    prompt = [5, 6, 7]
    expected = alone(prompt, 10)
    r = Request("s", prompt, max_tokens=10, sampling=SimpleNamespace(stop_ids=(expected[2],)))
    sched.add(r)
    run_to_end(sched)
    assert r.output_ids == expected[:3] and r.finish_reason == "stop"


def test_abort_frees_blocks_at_once():
    pool = BlockPool(32, 4)
    sched = Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=8, max_model_len=64)
    a, b = Request("a", list(range(20)), max_tokens=4), Request("b", [1, 2], max_tokens=4)
    sched.add(a)
    sched.add(b)
    engine = FakeEngine(sched)
    engine.step()  # a is mid-prefill and holds its blocks; b waits for budget
    assert a.status is Status.RUNNING and len(a.block_ids) == 5
    free_before = pool.num_free
    assert sched.abort("a")
    assert pool.num_free == free_before + 5 and a.block_ids == [] and a.finish_reason == "abort"
    assert sched.abort("b") and not sched.has_unfinished()
    assert not sched.abort("a") and not sched.abort("nobody")
    assert pool.num_free == pool.num_blocks - 1
    assert all(pool.ref_count(x) == 0 for x in range(pool.num_blocks))


def test_random_workloads_with_aborts_leave_the_pool_clean():
    rng = random.Random(4)
    pool = BlockPool(24, 4)
    sched = Scheduler(pool, max_num_seqs=6, max_num_batched_tokens=24, max_model_len=64, long_prefill_threshold=10)
    engine = FakeEngine(sched)
    reqs: list[Request] = []
    for step in range(400):
        if rng.random() < 0.3:
            prompt = [rng.randrange(3) for _ in range(rng.randrange(1, 30))]
            reqs.append(Request(f"r{step}", prompt, max_tokens=rng.randrange(1, 20)))
            sched.add(reqs[-1])
        if reqs and rng.random() < 0.05:
            sched.abort(rng.choice(reqs).request_id)
        if sched.has_unfinished():
            engine.step()
    while sched.has_unfinished():
        engine.step()
    assert sched.num_preemptions > 0
    for r in reqs:
        if r.finish_reason != "abort":
            assert r.output_ids == alone(r.prompt_ids, r.max_tokens)
    assert pool.num_free == pool.num_blocks - 1
    assert all(pool.ref_count(x) == 0 for x in range(pool.num_blocks))
