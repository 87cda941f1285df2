"""The continuous-batching scheduler: which requests run this step, with how many tokens each.

There are no prefill and decode phases. A request has `num_tokens` known tokens (prompt + outputs so far) of which
`num_computed` have their KV in the cache; each step gives it up to `num_tokens - num_computed` new tokens under a
token budget, and once the two are equal the engine samples its next token. A long prompt is therefore prefilled
in chunks alongside the one-token steps of running requests, and preemption is recompute: a preempted request
frees its blocks and later re-prefills its prompt and outputs so far (prefix-cache hits make that cheap).

Pure Python bookkeeping over dbrx.serve.blocks; no model calls, no torch.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .blocks import BlockPool, NoFreeBlocks


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One generation request. `sampling` is opaque here, except an optional `stop_ids` attribute. `adapter`: the
    LoRA adapter it runs under (None: the base model), which salts its prefix-cache hashes."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: Any = None
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the cache
    block_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    arrival: int = -1  # set by Scheduler.add: the order of arrival
    finish_reason: str | None = None  # "stop", "length" or "abort"
    adapter: str | None = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass
class SchedulerOutput:
    """One step's work: each request with its number of new tokens, positions [num_computed, num_computed + n).

    A request whose step reaches `num_tokens` needs a sampled token (from the logits of its last position).
    """

    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    """First come, first served: running requests first, then waiting ones while budget, seats and blocks allow.

    Invariant: `running` and `waiting` are each in arrival order and every running request arrived before every
    waiting one (admission takes the head of `waiting`; preemption moves the latest running request back to it).
    """

    def __init__(self, pool: BlockPool, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 long_prefill_threshold: int | None = None):
        for name, value in [("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens),
                            ("max_model_len", max_model_len)]:
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if long_prefill_threshold is not None and long_prefill_threshold < 1:
            raise ValueError(f"long_prefill_threshold must be None or at least 1, got {long_prefill_threshold}")
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.long_prefill_threshold = long_prefill_threshold
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._requests: dict[str, Request] = {}  # unfinished requests by id
        self._arrivals = itertools.count()

    def add(self, request: Request) -> None:
        n_prompt = len(request.prompt_ids)
        if n_prompt == 0:
            raise ValueError(f"request {request.request_id!r} has an empty prompt")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {request.max_tokens}")
        if n_prompt + request.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({n_prompt}) + max_tokens ({request.max_tokens}) exceeds max_model_len "
                             f"({self.max_model_len})")
        # The last sampled token is never computed, so a lone request needs blocks for one token fewer; one that
        # cannot fit even alone would wait forever.
        if self.pool.blocks_needed(n_prompt + request.max_tokens - 1) > self.pool.num_blocks - 1:
            raise ValueError(f"request {request.request_id!r} needs more KV blocks than the pool has")
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        request.arrival = next(self._arrivals)
        request.status = Status.WAITING
        self._requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str) -> bool:
        """Finish a request now and free its blocks; False if it is unknown or already finished (a client may
        disconnect just after its request ended)."""
        request = self._requests.get(request_id)
        if request is None:
            return False
        (self.running if request.status is Status.RUNNING else self.waiting).remove(request)
        self._finish(request, "abort")
        return True

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = self._num_new_tokens(request, budget)
            while True:
                try:
                    self.pool.ensure_capacity(request.block_ids, request.num_computed + n)
                    break
                except NoFreeBlocks:
                    # The latest arrival is last in `running`, so it is this request or one not scheduled yet.
                    victim = self.running[-1]
                    self._preempt(victim)
                    out.preempted.append(victim)
                    if victim is request:
                        break
            if request.status is Status.RUNNING:
                out.scheduled.append((request, n))
                budget -= n
                i += 1
        # Admitting after a preemption would only evict what was just made room for.
        while self.waiting and not out.preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            try:
                request.block_ids, request.num_computed = self.pool.allocate_prompt(request.all_ids, request.adapter)
            except NoFreeBlocks:
                break  # FCFS: later requests do not overtake the head of the queue
            self.waiting.popleft()
            request.status = Status.RUNNING
            self.running.append(request)
            n = self._num_new_tokens(request, budget)
            out.scheduled.append((request, n))
            budget -= n
        return out

    def update(self, output: SchedulerOutput, sampled: dict[str, int | None]) -> list[Request]:
        """Record a step the engine ran: computed counts, newly full blocks, sampled tokens. Returns the requests
        that finished. `sampled` maps each request whose step reached its last known token to the sampled id."""
        finished = []
        bs = self.pool.block_size
        for request, n in output.scheduled:
            if request.status is not Status.RUNNING:
                continue  # aborted since schedule()
            before = request.num_computed
            request.num_computed += n
            assert request.num_computed <= request.num_tokens
            if request.num_computed // bs > before // bs:  # a block filled up: share it
                self.pool.commit_full_blocks(request.block_ids, request.all_ids[: request.num_computed],
                                             request.adapter)
            if request.num_computed < request.num_tokens:
                continue  # mid-prefill: no logits to sample from yet
            token = sampled.get(request.request_id)
            if token is None:
                raise ValueError(f"no sampled token for request {request.request_id!r}, which completed its step")
            request.output_ids.append(token)
            if token in (getattr(request.sampling, "stop_ids", None) or ()):
                reason = "stop"
            elif len(request.output_ids) >= request.max_tokens:
                reason = "length"
            else:
                continue
            self.running.remove(request)
            self._finish(request, reason)
            finished.append(request)
        return finished

    def _num_new_tokens(self, request: Request, budget: int) -> int:
        n = min(request.num_tokens - request.num_computed, budget)
        if self.long_prefill_threshold is not None:
            n = min(n, self.long_prefill_threshold)
        assert n > 0
        return n

    def _preempt(self, request: Request) -> None:
        """Recompute later: free the blocks, forget the computed count, keep the outputs, wait at the front."""
        assert request is self.running[-1]
        self.running.pop()
        self.pool.free(request.block_ids)
        request.block_ids = []
        request.num_computed = 0
        request.status = Status.WAITING
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def _finish(self, request: Request, reason: str) -> None:
        self.pool.free(request.block_ids)
        request.block_ids = []
        request.status = Status.FINISHED
        request.finish_reason = reason
        del self._requests[request.request_id]
