"""The serving engine: continuous batching over a paged KV cache, per-request sampling, and an asyncio front.

Each `Engine.step()` asks the scheduler which requests run and how many of their tokens (prefill chunks and
decode tokens together, under one token budget), flattens those tokens into one ragged batch, runs
`DbrxForCausalLM.forward_paged` with the KV blocks the pool assigned, samples the next token of every request
that reached the end of its known tokens, and hands the results back to the scheduler. The engine owns the KV
memory: one (blocks, block_size, kvH, hd) key and value tensor per layer, sized up front.

Sampling works on per-row tensors (temperature, top-k, top-p, repetition penalty), so a request's settings
never affect another's; random draws come from each request's own generator (seeded when the request has a
seed) through the exponential race (argmax p / E with E ~ Exp(1) is a sample from p), so a seeded request
gives the same tokens whatever else runs. Greedy rows take the argmax. `AsyncEngine` runs the steps in a
background thread and streams each request's outputs to an asyncio consumer.

LoRA adapters: on a model with several adapters attached (dbrx.lora.multi), a request may name one; a step mixes
requests of any adapters and the base model, each token running with its request's adapter slot (set around the
forward, the model unaware), and a request's prefix-cache blocks are shared only with requests of its adapter.

Imports: dbrx.model (through the model object), dbrx.kernels.paged_attention, dbrx.lora.multi (adapter_set),
dbrx.sampling (SamplingParams), dbrx.tokens, dbrx.serve.blocks / scheduler.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import math
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import torch

from dbrx.kernels.paged_attention import BACKENDS, PagedMetadata, default_backend
from dbrx.lora.multi import adapter_set
from dbrx.sampling import SamplingParams
from dbrx.tokens import REAL_VOCAB_SIZE, UNUSED_IDS

from .blocks import BlockPool
from .scheduler import Request, Scheduler


class QueueFull(RuntimeError):
    """The waiting queue is at its limit: try again later (HTTP 429)."""


@dataclass
class EngineConfig:
    block_size: int = 16
    num_blocks: int | None = None  # default: as many as kv_memory_bytes holds
    kv_memory_bytes: int = 256 << 20
    max_num_seqs: int = 32  # running requests at most
    max_num_batched_tokens: int = 512  # tokens per step (prefill chunks + decodes)
    max_model_len: int | None = None  # default: the model's max_seq_len
    max_waiting: int = 1024  # waiting requests at most (then QueueFull)
    enable_prefix_cache: bool = True
    attention_backend: str | None = None  # a name in dbrx.kernels.paged_attention.BACKENDS; None: the device's best
    vocab_limit: int | None = None  # ids at or above it are never sampled (default: min(model vocab, 100280))

    def validate(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_waiting", "kv_memory_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"engine: {name} must be a positive integer, got {value!r}")
        if self.attention_backend is not None and self.attention_backend not in BACKENDS:
            raise ValueError(f"engine: unknown attention backend {self.attention_backend!r}; known: "
                             f"{', '.join(BACKENDS)}")
        if self.num_blocks is not None and (not isinstance(self.num_blocks, int) or self.num_blocks < 2):
            raise ValueError(f"engine: num_blocks must be an integer >= 2, got {self.num_blocks!r}")
        if self.vocab_limit is not None and (isinstance(self.vocab_limit, bool) or not isinstance(self.vocab_limit, int)
                                             or self.vocab_limit < 1):
            raise ValueError(f"engine: vocab_limit must be None or a positive integer, got {self.vocab_limit!r}")


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]  # produced since the previous output of this request
    new_logprobs: list[dict] | None  # per new token {"token_id", "logprob", "top": [(id, logprob), ...]} when asked
    prompt_logprobs: list[dict | None] | None  # once, in the first output, when asked
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache


@dataclass
class _Extra:
    """What the engine keeps beside the scheduler's Request."""

    params: SamplingParams
    generator: torch.Generator | None
    logprobs: int | None = None
    num_cached: int | None = None
    sent: int = 0  # output tokens already reported
    pending_logprobs: list[dict] = field(default_factory=list)


def _argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """(M, V) -> (M,) long. On the CPU through numpy, whose argmax is several times faster than torch's there (a
    32 x 100352 argmax: ~1.2 ms against ~8 ms on one core), the same first-maximum rule."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous():
        return torch.from_numpy(logits.numpy().argmax(-1)).long()
    return logits.argmax(-1)


class Engine:
    """Synchronous engine: `add_request`, then `step()` until `has_unfinished()` is False."""

    def __init__(self, model, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        config.validate()
        self.model = model.eval()
        cfg = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        kv_heads, hd = cfg.attn_config.kv_n_heads, cfg.head_dim
        per_block = 2 * cfg.n_layers * config.block_size * kv_heads * hd * p.element_size()
        num_blocks = config.num_blocks or max(2, config.kv_memory_bytes // per_block)
        self.attention_backend = config.attention_backend or default_backend(self.device)
        self.max_model_len = min(config.max_model_len or cfg.max_seq_len, cfg.max_seq_len)
        shape = (num_blocks, config.block_size, kv_heads, hd)
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in range(cfg.n_layers)]
        self.pool = BlockPool(num_blocks, config.block_size, enable_prefix_cache=config.enable_prefix_cache)
        self.scheduler = Scheduler(self.pool, config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len)
        self.vocab_limit = min(cfg.vocab_size, config.vocab_limit or REAL_VOCAB_SIZE)
        self._unused = torch.tensor([i for i in UNUSED_IDS if i < self.vocab_limit], dtype=torch.long,
                                    device=self.device)
        self._extra: dict[str, _Extra] = {}  # the requests in flight, by id
        self._ids = itertools.count()
        self.adapters = adapter_set(model)  # the LoRA adapters requests may name (None: none)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapters.names) if self.adapters is not None else []

    def _adapter_slot(self, adapter: str | None) -> int:
        if adapter is None:
            return 0
        if self.adapters is None:
            raise ValueError(f"unknown adapter {adapter!r}: this model has no adapters")
        return self.adapters.slot(adapter)

    def _with_slots(self, slots: list[int]):
        """The context the model's forward runs in: each token's adapter slot (none when all are the base's)."""
        if self.adapters is None:
            return contextlib.nullcontext()
        active = torch.tensor(slots, dtype=torch.long, device=self.device) if any(slots) else None
        return self.adapters.active(active)

    # ---- requests ---------------------------------------------------------------------------------------------
    def add_request(self, request_id: str | None, prompt_ids: Sequence[int], params: SamplingParams,
                    logprobs: int | None = None, adapter: str | None = None) -> str:
        """Queue a request (under LoRA adapter `adapter`, None: the base model); ValueError when it cannot be served,
        QueueFull when the waiting queue is full."""
        params.validate()
        self._adapter_slot(adapter)  # an unknown adapter is a ValueError
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._extra:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt = list(prompt_ids)
        bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < self.vocab_limit]
        if bad:
            raise ValueError(f"prompt has token ids outside [0, {self.vocab_limit}): {bad[:5]}")
        if logprobs is not None and not 0 <= logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {logprobs}")
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise QueueFull(f"{len(self.scheduler.waiting)} requests are waiting (the limit)")
        req = Request(request_id=request_id, prompt_ids=prompt, max_tokens=params.max_new_tokens, sampling=params,
                      adapter=adapter)
        self.scheduler.add(req)  # ValueError for an empty prompt or one that cannot fit max_model_len
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        self._extra[request_id] = _Extra(params, gen, logprobs)
        return request_id

    def abort(self, request_id: str) -> None:
        if self._extra.pop(request_id, None) is not None:
            self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> dict:
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "kv_usage": self.pool.usage, "prefix_hits": self.pool.prefix_hits,
                "prefix_queries": self.pool.prefix_queries, "preemptions": self.scheduler.num_preemptions}

    # ---- one step ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; returns an output for every request that produced a token or finished."""
        sched = self.scheduler.schedule()
        scheduled = list(sched.scheduled)
        if not scheduled:
            return []
        ids, pos, slots, qlens, lens, tables, want, sampling = [], [], [], [], [], [], [], []
        adapter_slots: list[int] = []  # (N,) each token's adapter slot
        for req, n in scheduled:
            start = req.num_computed
            all_ids = req.all_ids
            ids += all_ids[start : start + n]
            adapter_slots += [self._adapter_slot(req.adapter)] * n
            pos += range(start, start + n)
            slots += self.pool.slots(req.block_ids, start, start + n)
            qlens.append(n)
            lens.append(start + n)
            tables.append(req.block_ids)
            if start + n == req.num_tokens:  # reached the end of its known tokens: it gets a new one
                want.append(len(ids) - 1)
                sampling.append(req)
            if self._extra[req.request_id].num_cached is None:
                self._extra[req.request_id].num_cached = start  # prefix-cache hits skipped these prompt tokens
        width = max(len(t) for t in tables)
        block_tables = torch.tensor([t + [t[0]] * (width - len(t)) for t in tables], dtype=torch.long)
        dev = self.device
        meta = PagedMetadata(torch.tensor(slots, dtype=torch.long, device=dev), block_tables.to(dev), qlens, lens,
                             backend=self.attention_backend)
        sampled: dict[str, int | None] = {req.request_id: None for req, _ in scheduled}
        with self._with_slots(adapter_slots):  # (M, V)
            logits = self.model.forward_paged(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), meta,
                                              self.kv_caches, torch.tensor(want, dtype=torch.long, device=dev))
        if want:  # (M = 0: prefill chunks only, the step just fills the KV cache)
            tokens, logprobs = self._sample(logits, sampling)
            for req, tok, lp in zip(sampling, tokens, logprobs):
                sampled[req.request_id] = tok
                if lp is not None:
                    self._extra[req.request_id].pending_logprobs.append(lp)
        self.scheduler.update(sched, sampled)
        return self._outputs(scheduled)

    def _outputs(self, scheduled) -> list[RequestOutput]:
        outs = []
        for req, _ in scheduled:
            extra = self._extra.get(req.request_id)
            if extra is None:
                continue
            new = req.output_ids[extra.sent :]
            finished = req.finish_reason is not None
            if not new and not finished:
                continue
            extra.sent = len(req.output_ids)
            lps = extra.pending_logprobs if extra.logprobs is not None else None
            extra.pending_logprobs = []
            if req.finish_reason == "stop" and new and new[-1] in extra.params.stop_ids:
                new = new[:-1]  # the stop id ends the request but is not part of its output (as in dbrx.generate)
                lps = lps[:-1] if lps else lps
            outs.append(RequestOutput(req.request_id, list(new), lps, None, finished, req.finish_reason,
                                      len(req.prompt_ids), extra.num_cached or 0))
            if finished:
                self._extra.pop(req.request_id, None)
        return outs

    def _mask_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """fp32 logits with the padding rows of the head and the ids that are no token at -inf."""
        logits = logits.float()
        if self.vocab_limit < logits.shape[-1]:
            logits[:, self.vocab_limit :] = -math.inf
        if len(self._unused):
            logits.index_fill_(1, self._unused, -math.inf)
        return logits

    @torch.inference_mode()
    def prompt_logprobs(self, prompt_ids: Sequence[int], top: int, adapter: str | None = None) -> list[dict | None]:
        """Log-probability of each prompt token given the ones before it (None for the first), with the `top` most
        likely alternatives: one dense forward of the prompt (what log-likelihood scoring needs), under `adapter`."""
        ids = list(prompt_ids)
        if not ids or len(ids) > self.max_model_len:
            raise ValueError(f"the prompt must have 1 to {self.max_model_len} tokens, got {len(ids)}")
        with self._with_slots([self._adapter_slot(adapter)] * len(ids)):
            logits = self.model(torch.tensor([ids], device=self.device))[0]  # (T, V)
        lp = torch.log_softmax(self._mask_vocab(logits), -1)
        out: list[dict | None] = [None]
        for t in range(1, len(ids)):
            k = lp[t - 1].topk(top) if top else None
            out.append({"token_id": ids[t], "logprob": float(lp[t - 1, ids[t]]),
                        "top": list(zip(k.indices.tolist(), k.values.tolist())) if k is not None else []})
        return out

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> tuple[list[int], list[dict | None]]:
        """Per-row sampling of (M, V) logits; returns the tokens and, where asked, their log-probabilities.

        Greedy rows take the argmax (no sort, no random draw). A sampled row works on its own candidates only (its
        top-k, or the sorted vocabulary when it asks for top-p, else the whole distribution), with random draws
        from its own generator, so what it draws never depends on the other rows."""
        M, V = logits.shape
        logits = self._mask_vocab(logits)
        extras = [self._extra[r.request_id] for r in reqs]
        raw_logprobs = torch.log_softmax(logits, -1) if any(e.logprobs is not None for e in extras) else None
        for i, (r, e) in enumerate(zip(reqs, extras)):
            if e.params.repetition_penalty != 1.0:  # transformers' rule on the ids seen so far (prompt included)
                seen = torch.tensor(sorted(set(r.all_ids)), device=logits.device)
                row = logits[i, seen]
                pen = e.params.repetition_penalty
                logits[i, seen] = torch.where(row > 0, row / pen, row * pen)
        tokens = _argmax_rows(logits)  # (M,): the greedy choice of every row
        for i, e in enumerate(extras):
            p = e.params
            if p.temperature == 0:
                continue
            row = logits[i] / p.temperature  # (V,)
            if p.top_k is not None and p.top_k < V:
                row, idx = row.topk(p.top_k)  # sorted, descending
            elif p.top_p < 1.0:
                row, idx = row.sort(descending=True)
            else:
                idx = None
            probs = torch.softmax(row, -1)
            if p.top_p < 1.0:  # the smallest prefix reaching top_p; the best token always kept
                probs = probs.masked_fill((probs.cumsum(-1) - probs) >= p.top_p, 0.0)
            noise = torch.empty_like(probs).exponential_(generator=e.generator).clamp_min_(1e-30)
            pick = (probs / noise).argmax()  # the exponential race: a draw from probs (a zero draw cannot win)
            tokens[i] = pick if idx is None else idx[pick]
        tokens = tokens.tolist()  # the one host sync of the step
        out_lps: list[dict | None] = []
        for i, e in enumerate(extras):
            if e.logprobs is None:
                out_lps.append(None)
                continue
            top = raw_logprobs[i].topk(e.logprobs) if e.logprobs else None
            out_lps.append({"token_id": tokens[i], "logprob": float(raw_logprobs[i, tokens[i]]),
                            "top": list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []})
        return tokens, out_lps


def _deliver(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)


def _merged(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """Two consecutive outputs of one request as one (what a consumer that fell behind receives)."""
    lps = a.new_logprobs + b.new_logprobs if a.new_logprobs is not None and b.new_logprobs is not None else None
    return RequestOutput(a.request_id, a.new_token_ids + b.new_token_ids, lps, a.prompt_logprobs, b.finished,
                         b.finish_reason, a.num_prompt_tokens, a.num_cached_tokens)


class AsyncEngine:
    """The engine stepped in a background thread; `generate` streams a request's outputs to asyncio code."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.max_model_len = engine.max_model_len
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = False
        self._aborts: collections.deque[str] = collections.deque()  # request ids to abort before the next step
        self._thread = threading.Thread(target=self._loop, name="dbrx-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            with self._lock:
                while self._aborts:
                    self.engine.abort(self._aborts.popleft())
                busy = self.engine.has_unfinished()
                outputs = self.engine.step() if busy else []
            by_loop: dict[asyncio.AbstractEventLoop, list] = {}
            for out in outputs:
                target = self._queues.get(out.request_id)
                if target is not None:
                    by_loop.setdefault(target[0], []).append((target[1], out))
            for loop, items in by_loop.items():  # one wake-up of each event loop per step, not one per request
                loop.call_soon_threadsafe(_deliver, items)
            if not busy:
                self._wake.wait(0.05)
                self._wake.clear()

    def _admit(self, request_id, prompt_ids, params, logprobs, adapter) -> None:
        with self._lock:
            self.engine.add_request(request_id, prompt_ids, params, logprobs, adapter)

    def _prompt_logprobs(self, prompt_ids, top, adapter) -> list[dict | None]:
        with self._lock:
            return self.engine.prompt_logprobs(prompt_ids, top, adapter)

    @property
    def adapter_names(self) -> list[str]:
        return self.engine.adapter_names

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       logprobs: int | None = None, prompt_logprobs: int | None = None, adapter: str | None = None
                       ) -> AsyncIterator[RequestOutput]:
        queue: asyncio.Queue = asyncio.Queue()
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._queues[request_id] = (asyncio.get_running_loop(), queue)  # before the engine can produce its outputs
        finished = False
        try:
            try:
                await asyncio.to_thread(self._admit, request_id, prompt_ids, params, logprobs, adapter)  # off the loop
            except (ValueError, QueueFull):
                finished = True  # refused: nothing to abort
                raise
            prompt_lps = None
            if prompt_logprobs is not None:  # a forward of the whole prompt: off the event loop too
                prompt_lps = await asyncio.to_thread(self._prompt_logprobs, prompt_ids, prompt_logprobs, adapter)
            self._wake.set()
            while True:
                out = await queue.get()
                while not out.finished and not queue.empty():  # a consumer behind the engine gets one merged output
                    out = _merged(out, queue.get_nowait())
                if prompt_lps is not None:  # once, with the first output
                    out.prompt_logprobs, prompt_lps = prompt_lps, None
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:  # the consumer went away (client disconnect): its blocks are freed before the next step
                self._aborts.append(request_id)
                self._wake.set()

    def stats(self) -> dict:
        with self._lock:
            return self.engine.stats()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)
        with self._lock:  # aborts that came after the last step
            while self._aborts:
                self.engine.abort(self._aborts.popleft())


__all__ = ["Engine", "EngineConfig", "AsyncEngine", "RequestOutput", "QueueFull"]
