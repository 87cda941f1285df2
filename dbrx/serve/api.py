"""The OpenAI-compatible HTTP server over the serving engine: /v1/completions, /v1/chat/completions, /v1/models,
vLLM's /tokenize, /detokenize and /tokenizer_info, /health and Prometheus /metrics; `create_app` builds it,
`run_server` serves it with uvicorn.

A thin layer: it validates requests (protocol.py), renders prompts with the tokenizer, hands token ids to the
engine and turns the engine's token outputs into text. A request's `model` picks the base model (its served name)
or one of the engine's LoRA adapters (by the adapter's name, as vLLM's multi-LoRA serving does); /v1/models lists
them all, adapters with the base model as `parent`. Stop strings are applied here, on the detokenized text;
stop ids end requests in the engine. A client error is always a 4xx with OpenAI's error body, and a client that
goes away cancels its engine requests at once (closing the engine's async iterator aborts the request).

Imports: fastapi, uvicorn, prometheus_client, dbrx.sampling (SamplingParams), dbrx.tokenizer, dbrx.serve.protocol.
The engine is reached only through the `Engine` protocol below, never by importing dbrx.serve.engine, so that
tests can serve a fake one.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from ..sampling import SamplingParams
from ..tokenizer import DEFAULT_SYSTEM_PROMPT, StreamDecoder
from .protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorDetail,
    ErrorResponse,
    ModelCard,
    ModelList,
    ModelRequest,
    PromptTokensDetails,
    SamplingRequest,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
    TokenLogprob,
    TopLogprob,
    Usage,
)

CHAT_PAGE = Path(__file__).with_name("static") / "chat.html"  # GET /: the chat page

__all__ = ["APIError", "Engine", "create_app", "run_server"]

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R", bound=ModelRequest)
RETRY_AFTER_S = 1  # what a 429 asks the client to wait


class Engine(Protocol):
    """What the server needs of dbrx.serve.engine.AsyncEngine.

    generate yields RequestOutput-like objects (request_id, new_token_ids, new_logprobs, prompt_logprobs, finished,
    finish_reason, num_prompt_tokens, num_cached_tokens); it raises ValueError for a request it cannot serve and
    QueueFull (matched by class name) when its waiting queue is full, both before its first output. It is given
    `adapter=NAME` (a keyword) only for requests that name one of the adapters the app serves.
    """

    max_model_len: int

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams, logprobs: int | None = None,
                 prompt_logprobs: int | None = None) -> AsyncIterator[Any]: ...

    def stats(self) -> dict[str, float]: ...


# ---- errors -------------------------------------------------------------------------------------------------
class APIError(Exception):
    """An error the client gets as an OpenAI-style error body with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.type, self.headers = status, param, code, type, headers
        self.message = message


class _ClientGone(Exception):
    """The client closed its connection before the response was complete."""


def _json(model: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    # pydantic's JSON writes a non-finite logprob as null where json.dumps would write invalid JSON (-Infinity)
    return Response(model.model_dump_json(), status, headers, media_type="application/json")


def _error_body(err: APIError) -> ErrorResponse:
    return ErrorResponse(error=ErrorDetail(message=err.message, type=err.type, param=err.param, code=err.code))


def _error_response(err: APIError) -> Response:
    return _json(_error_body(err), err.status, err.headers)


def _parse(model: type[R], body: bytes) -> R:
    """Validate a JSON body; any problem (bad JSON, a wrong type, a value out of range) is a 400 naming the field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        cause = err.get("ctx", {}).get("error")
        message = str(cause) if err["type"] == "value_error" and cause is not None else err["msg"]
        raise APIError(400, f"{param}: {message}" if param else message, param=param) from None


def _engine_error(exc: BaseException) -> BaseException:
    """The HTTP error for an engine's refusal of a request (other exceptions are server errors, kept as they are)."""
    if any(cls.__name__ == "QueueFull" for cls in type(exc).__mro__):
        return APIError(429, "the server is busy (its waiting queue is full); retry later", type="rate_limit_error",
                        code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, ValueError):
        return APIError(400, str(exc))
    return exc


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 as soon as it is known to be over `limit` bytes (without reading the rest)."""
    too_big = APIError(413, f"request body over {limit} bytes", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


# ---- cancellation -------------------------------------------------------------------------------------------
async def _disconnected(receive: Receive) -> None:
    """Return when the client disconnects (the request body must have been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _or_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work` unless the client disconnects first: then cancel it and raise _ClientGone.

    Starlette does not cancel a handler whose client has gone, and requests can wait long in the engine's queue.
    """
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()
        watch.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)
    if task.cancelled():
        raise _ClientGone
    return task.result()


async def _close(iterator: AsyncIterator[Any]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


async def _merge(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """(index of the stream, item) from several async iterators as items come; closing this closes them all."""
    queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()
    end = object()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((i, item, None))
        except Exception as exc:
            queue.put_nowait((i, end, exc))
        else:
            queue.put_nowait((i, end, None))
        finally:
            await _close(stream)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            i, item, exc = await queue.get()
            if exc is not None:
                raise exc
            if item is end:
                live -= 1
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _EventStream(StreamingResponse):
    """Server-sent events `data: {json}` ending in `data: [DONE]`.

    Unlike StreamingResponse, it always watches for the client's disconnect (Starlette only does so below ASGI
    spec 2.4) and closes its event iterator, then calls `on_close`, however the stream ends: closing is what
    aborts the engine requests behind it.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stream() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async with aclosing(self.body_iterator) as events:  # type: ignore[type-var]
                async for event in events:
                    await send({"type": "http.response.body", "body": f"data: {event}\n\n".encode(),
                                "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

        try:
            await _or_disconnect(receive, stream())
        except (_ClientGone, OSError):
            pass
        finally:
            await self.on_close()


# ---- metrics ------------------------------------------------------------------------------------------------
class _EngineStats(Collector):
    """The engine's own numbers, read from engine.stats() at each scrape."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        s = self.engine.stats()
        yield GaugeMetricFamily("dbrx_num_requests_running", "Requests in the engine's running batch.",
                                value=s.get("running", 0))
        yield GaugeMetricFamily("dbrx_num_requests_waiting", "Requests waiting in the engine's queue.",
                                value=s.get("waiting", 0))
        yield GaugeMetricFamily("dbrx_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0 to 1).",
                                value=s.get("kv_usage", 0.0))
        yield CounterMetricFamily("dbrx_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache.",
                                  value=s.get("prefix_hits", 0))
        yield CounterMetricFamily("dbrx_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache.",
                                  value=s.get("prefix_queries", 0))


class _Metrics:
    """The server's Prometheus metrics, in a registry of their own so that several apps can share a process."""

    def __init__(self, engine: Engine) -> None:
        self.registry = r = CollectorRegistry()
        r.register(_EngineStats(engine))
        self.prompt_tokens = Counter("dbrx_prompt_tokens", "Prompt tokens of served requests.", registry=r)
        self.generation_tokens = Counter("dbrx_generation_tokens", "Tokens generated by the engine.", registry=r)
        self.finished = Counter("dbrx_request_finished", "Finished requests by finish reason.", ["finish_reason"],
                                registry=r)
        self.ttft = Histogram("dbrx_time_to_first_token_seconds", "From the request's arrival to its first token.",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80), registry=r)
        self.itl = Histogram("dbrx_inter_token_latency_seconds", "Between consecutive outputs of a request.",
                             buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5, 5), registry=r)
        self.e2e = Histogram("dbrx_e2e_request_latency_seconds", "From the request's arrival to its last token.",
                             buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320), registry=r)


# ---- one prompt's generation ----------------------------------------------------------------------------------
_Entry = tuple[int, float | None, list[tuple[int, float]]]  # token id, its logprob (None: none), top alternatives


def _entry(token_id: int, lp: dict | None) -> _Entry:
    if lp is None:
        return token_id, None, []
    return token_id, lp["logprob"], [(int(t), float(p)) for t, p in lp.get("top") or ()]


def _stop_overlap(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that begins some stop string (and might still become it)."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
               default=0)


class _StopText:
    """New token ids -> text in whole UTF-8 characters, cut before the first stop string.

    Text that could begin a stop string is held back until later tokens settle it, so no piece of a stop string
    is ever released. Special tokens (a stop id the engine passes on) are not text.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        self.decoder = StreamDecoder(tokenizer, skip_special=True)
        self.stops = stops
        self.pending = ""
        self.stopped = False

    def push(self, ids: Sequence[int], final: bool) -> str:
        """Text released by `ids`; `final`: no more tokens come, release everything."""
        self.pending += "".join(self.decoder.push(t) for t in ids) + (self.decoder.flush() if final else "")
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        keep = 0 if final else _stop_overlap(self.pending, self.stops)
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out


@dataclass
class _Delta:
    """What one engine output adds to a choice."""

    text: str
    entries: list[_Entry]
    finish_reason: str | None
    first: bool


@dataclass
class _Job:
    """One prompt's engine request and what the server has made of it so far (one choice of the response)."""

    index: int
    prompt_ids: list[int]
    outputs: AsyncIterator[Any]
    max_tokens: int  # the client's; the engine is asked for at least one token, extra ones are dropped
    text_out: _StopText
    metrics: _Metrics
    started: float
    echo_text: str | None = None  # the prompt's text when echoed
    want_logprobs: bool = False
    text: str = ""
    entries: list[_Entry] = field(default_factory=list)
    num_generated: int = 0
    num_cached: int = 0
    finish_reason: str | None = None
    first: Any = None
    _last_token: float | None = None

    async def begin(self) -> None:
        """Wait for the first output: the engine admits or refuses the request before it."""
        self.first = await anext(self.outputs, None)

    async def deltas(self) -> AsyncIterator[_Delta]:
        """The choice's deltas until it finishes; stopping early (stop string, max_tokens 0) aborts the request."""
        try:
            out, first = self.first, True
            while True:
                yield self._advance(out, first)
                if self.finish_reason is not None:
                    return
                out, first = await anext(self.outputs, None), False
        finally:
            await _close(self.outputs)

    def _advance(self, out: Any, first: bool) -> _Delta:
        now = time.monotonic()
        if out is None:  # the engine ended the stream without a finished output
            return self._finish(_Delta("", [], "abort", first), now)
        text, entries = "", []
        if first:
            self.num_cached = out.num_cached_tokens
            self.metrics.prompt_tokens.inc(len(self.prompt_ids))
            if self.echo_text is not None:
                text = self.echo_text
                if self.want_logprobs:
                    lps = out.prompt_logprobs or [None] * len(self.prompt_ids)
                    entries = [_entry(t, lp) for t, lp in zip(self.prompt_ids, lps)]
        if out.new_token_ids:
            self.metrics.generation_tokens.inc(len(out.new_token_ids))
            if self._last_token is None:
                self.metrics.ttft.observe(now - self.started)
            else:
                self.metrics.itl.observe(now - self._last_token)
            self._last_token = now
        ids = out.new_token_ids[: self.max_tokens - self.num_generated]
        self.num_generated += len(ids)
        if self.want_logprobs:
            entries += [_entry(t, lp) for t, lp in zip(ids, out.new_logprobs or [None] * len(ids))]
        final = out.finished or self.num_generated >= self.max_tokens
        text += self.text_out.push(ids, final)
        if self.text_out.stopped:
            reason: str | None = "stop"
        elif out.finished:
            reason = out.finish_reason or "stop"
        else:
            reason = "length" if final else None
        return self._finish(_Delta(text, entries, reason, first), now)

    def _finish(self, delta: _Delta, now: float) -> _Delta:
        self.text += delta.text
        self.entries += delta.entries
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.metrics.e2e.observe(now - self.started)
            self.metrics.finished.labels(delta.finish_reason).inc()
        return delta


def _usage(jobs: Sequence[_Job]) -> Usage:
    prompt = sum(len(j.prompt_ids) for j in jobs)
    completion = sum(j.num_generated for j in jobs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(j.num_cached for j in jobs)))


async def _start(jobs: Sequence[_Job]) -> None:
    """Start every job and wait for its first output, so that refusals become HTTP errors before a response."""
    tasks = [asyncio.create_task(j.begin()) for j in jobs]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in tasks:
            exc = t.exception() if t.done() else None
            if exc is not None:
                raise _engine_error(exc)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _drain(jobs: Sequence[_Job]) -> None:
    async with aclosing(_merge([j.deltas() for j in jobs])) as merged:
        async for _ in merged:
            pass


async def _close_jobs(jobs: Sequence[_Job]) -> None:
    for j in jobs:
        await _close(j.outputs)


# ---- response formats -----------------------------------------------------------------------------------------
class _Format:
    """Turns jobs and deltas into one endpoint's response objects (one instance per request)."""

    prefix = ""

    def __init__(self, model: str, tokenizer: Any, top: int) -> None:
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.tokenizer = tokenizer
        self.top = top  # top alternatives wanted per token

    def token_text(self, token_id: int) -> str:
        try:
            return self.tokenizer.decode([token_id])
        except ValueError:  # an id that is no token (only in alternatives the engine should have masked)
            return f"<|id:{token_id}|>"

    def token_bytes(self, token_id: int) -> list[int]:
        try:
            return list(self.tokenizer.decode_bytes([token_id]))
        except ValueError:
            return []

    def chunk(self, job: _Job, delta: _Delta) -> BaseModel | None:
        raise NotImplementedError

    def response(self, jobs: Sequence[_Job]) -> BaseModel:
        raise NotImplementedError

    def usage_chunk(self, jobs: Sequence[_Job]) -> BaseModel:
        raise NotImplementedError


class _CompletionFormat(_Format):
    prefix = "cmpl"

    def __init__(self, model: str, tokenizer: Any, top: int | None) -> None:
        super().__init__(model, tokenizer, top or 0)
        self.want_logprobs = top is not None
        self.offsets: dict[int, int] = {}  # per choice: length of the text already covered by tokens

    def logprobs(self, index: int, entries: list[_Entry]) -> CompletionLogprobs | None:
        if not self.want_logprobs:
            return None
        out = CompletionLogprobs()
        offset = self.offsets.get(index, 0)
        for token_id, lp, top in entries:
            token = self.token_text(token_id)
            out.tokens.append(token)
            out.text_offset.append(offset)
            offset += len(token)
            out.token_logprobs.append(lp)
            alternatives = None
            if lp is not None:  # the chosen token is always among its alternatives, as in OpenAI's legacy format
                alternatives = {self.token_text(t): p for t, p in top[: self.top]}
                alternatives.setdefault(token, lp)
            out.top_logprobs.append(alternatives)
        self.offsets[index] = offset
        return out

    def _choice(self, index: int, text: str, entries: list[_Entry], reason: str | None) -> CompletionChoice:
        return CompletionChoice(index=index, text=text, logprobs=self.logprobs(index, entries), finish_reason=reason)

    def chunk(self, job: _Job, delta: _Delta) -> CompletionResponse | None:
        if not (delta.text or delta.entries or delta.finish_reason):
            return None
        choice = self._choice(job.index, delta.text, delta.entries, delta.finish_reason)
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[choice])

    def response(self, jobs: Sequence[_Job]) -> CompletionResponse:
        choices = [self._choice(j.index, j.text, j.entries, j.finish_reason) for j in jobs]
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                  usage=_usage(jobs))

    def usage_chunk(self, jobs: Sequence[_Job]) -> CompletionResponse:
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[], usage=_usage(jobs))


class _ChatFormat(_Format):
    prefix = "chatcmpl"

    def __init__(self, model: str, tokenizer: Any, want_logprobs: bool, top: int) -> None:
        super().__init__(model, tokenizer, top)
        self.want_logprobs = want_logprobs

    def logprobs(self, entries: list[_Entry]) -> ChatLogprobs | None:
        if not self.want_logprobs:
            return None
        content = [
            TokenLogprob(token=self.token_text(t), logprob=lp, bytes=self.token_bytes(t), top_logprobs=[
                TopLogprob(token=self.token_text(a), logprob=p, bytes=self.token_bytes(a)) for a, p in top[: self.top]])
            for t, lp, top in entries
        ]
        return ChatLogprobs(content=content)

    def chunk(self, job: _Job, delta: _Delta) -> ChatCompletionChunk | None:
        if not (delta.first or delta.text or delta.entries or delta.finish_reason):
            return None
        message = ChatDelta(role="assistant" if delta.first else None,
                            content=delta.text if delta.text or delta.first else None)
        choice = ChatChunkChoice(index=job.index, delta=message, logprobs=self.logprobs(delta.entries),
                                 finish_reason=delta.finish_reason)
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])

    def response(self, jobs: Sequence[_Job]) -> ChatCompletionResponse:
        choices = [ChatChoice(index=j.index, message=ChatMessageOut(content=j.text), logprobs=self.logprobs(j.entries),
                              finish_reason=j.finish_reason) for j in jobs]
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                      usage=_usage(jobs))

    def usage_chunk(self, jobs: Sequence[_Job]) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=_usage(jobs))


async def _events(jobs: Sequence[_Job], fmt: _Format, include_usage: bool) -> AsyncIterator[str]:
    try:
        async with aclosing(_merge([j.deltas() for j in jobs])) as merged:
            async for index, delta in merged:
                chunk = fmt.chunk(jobs[index], delta)
                if chunk is not None:
                    yield chunk.model_dump_json()
        if include_usage:
            yield fmt.usage_chunk(jobs).model_dump_json()
    except Exception:  # the 200 status line has gone out: the failure can only be told inside the stream
        log.exception("request %s failed while streaming", fmt.id)
        yield _error_body(APIError(500, "the engine failed while generating", type="internal_error")).model_dump_json()


# ---- the server -----------------------------------------------------------------------------------------------
class _Server:
    """The endpoints' logic over one engine, tokenizer and model name."""

    def __init__(self, engine: Engine, tokenizer: Any, model_name: str, max_request_bytes: int,
                 adapters: Sequence[str]) -> None:
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.adapters = list(adapters)
        self.max_request_bytes = max_request_bytes
        self.metrics = _Metrics(engine)
        self.created = int(time.time())

    async def _read(self, request: Request, model: type[R]) -> R:
        req = _parse(model, await _read_body(request, self.max_request_bytes))
        if req.model is not None and req.model != self.model_name and req.model not in self.adapters:
            known = ", ".join(repr(n) for n in [self.model_name, *self.adapters])
            raise APIError(404, f"model {req.model!r} not found; this server serves {known}", param="model",
                           code="model_not_found")
        if isinstance(req, SamplingRequest) and req.n not in (None, 1):
            raise APIError(400, "n must be 1: this server makes one choice per prompt", param="n")
        return req

    def _check_fit(self, n_prompt: int, max_tokens: int, param: str) -> None:
        context = self.engine.max_model_len
        if n_prompt == 0:
            raise APIError(400, "the prompt is empty", param=param)
        if n_prompt + max(max_tokens, 1) > context:  # the engine always makes at least one token
            raise APIError(400, f"{param} ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                                f"context of {context} tokens (at least one token is always generated)",
                           param="max_tokens" if n_prompt < context else param, code="context_length_exceeded")

    @staticmethod
    def _sampling(req: SamplingRequest, max_tokens: int) -> SamplingParams:
        try:
            return SamplingParams(
                temperature=1.0 if req.temperature is None else req.temperature,
                top_k=None if req.top_k in (None, -1, 0) else req.top_k,
                top_p=1.0 if req.top_p is None else req.top_p,
                repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                max_new_tokens=max(max_tokens, 1),
                seed=req.seed,
            )  # stop strings stay here: they are cut from the text, not matched by the engine
        except ValueError as exc:
            raise APIError(400, str(exc)) from None

    def _served(self, req: ModelRequest) -> tuple[str, dict[str, str]]:
        """The name a (checked) request is answered under, and the engine's keywords for it: its adapter, if any."""
        if req.model is None or req.model == self.model_name:
            return self.model_name, {}
        return req.model, {"adapter": req.model}

    def _job(self, index: int, base_id: str, ids: list[int], params: SamplingParams, max_tokens: int,
             stops: Sequence[str], started: float, logprobs: int | None = None, prompt_logprobs: int | None = None,
             echo_text: str | None = None, adapter: dict[str, str] | None = None) -> _Job:
        try:
            outputs = self.engine.generate(f"{base_id}-{index}", ids, params, logprobs=logprobs,
                                           prompt_logprobs=prompt_logprobs, **(adapter or {}))
        except Exception as exc:  # an engine that refuses at the call rather than at its first output
            raise _engine_error(exc) from None
        return _Job(index, ids, outputs, max_tokens, _StopText(self.tokenizer, stops), self.metrics, started,
                    echo_text=echo_text, want_logprobs=logprobs is not None)

    async def _respond(self, request: Request, jobs: list[_Job], fmt: _Format, stream: bool,
                       include_usage: bool) -> Response:
        if not stream:
            async def run() -> None:
                await _start(jobs)
                await _drain(jobs)

            try:
                await _or_disconnect(request.receive, run())
            except _ClientGone:
                return Response(status_code=499)  # nobody reads it
            finally:
                await _close_jobs(jobs)
            return _json(fmt.response(jobs))
        try:
            await _or_disconnect(request.receive, _start(jobs))
        except BaseException as exc:
            await _close_jobs(jobs)
            if isinstance(exc, _ClientGone):
                return Response(status_code=499)
            raise
        return _EventStream(_events(jobs, fmt, include_usage), on_close=lambda: _close_jobs(jobs))

    async def completions(self, request: Request) -> Response:
        started = time.monotonic()
        req = await self._read(request, CompletionRequest)
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        prompts: list[tuple[list[int], str]] = []
        for p in req.prompt:
            try:
                prompts.append((self.tokenizer.encode(p), p) if isinstance(p, str) else (p, self.tokenizer.decode(p)))
            except ValueError as exc:
                raise APIError(400, f"prompt: {exc}", param="prompt") from None
            self._check_fit(len(prompts[-1][0]), max_tokens, "prompt")
        params = self._sampling(req, max_tokens)
        if max_tokens <= 1:
            # Nothing to stop early, and the one token must stay in the output even when it is a stop id: lm-eval
            # scores a continuation (echo, logprobs, max_tokens 1) by dropping the last entry, the generated one.
            params = replace(params, stop_ids=())
        name, adapter = self._served(req)
        fmt = _CompletionFormat(name, self.tokenizer, req.logprobs)
        want_prompt_logprobs = req.logprobs if req.echo else None
        jobs = [self._job(i, fmt.id, ids, params, max_tokens, req.stop, started, req.logprobs, want_prompt_logprobs,
                          text if req.echo else None, adapter) for i, (ids, text) in enumerate(prompts)]
        return await self._respond(request, jobs, fmt, bool(req.stream), _include_usage(req))

    async def chat(self, request: Request) -> Response:
        started = time.monotonic()
        req = await self._read(request, ChatCompletionRequest)
        # OpenAI's "developer" role is its newer name for the system role
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                    for m in req.messages]
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     system_prompt=DEFAULT_SYSTEM_PROMPT)
        except ValueError as exc:
            raise APIError(400, f"messages: {exc}", param="messages") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:  # as OpenAI: up to the end of the context
            max_tokens = max(self.engine.max_model_len - len(ids), 1)
        self._check_fit(len(ids), max_tokens, "messages")
        params = self._sampling(req, max_tokens)
        top = req.top_logprobs or 0
        name, adapter = self._served(req)
        fmt = _ChatFormat(name, self.tokenizer, bool(req.logprobs), top)
        jobs = [self._job(0, fmt.id, ids, params, max_tokens, req.stop, started, top if req.logprobs else None,
                          adapter=adapter)]
        return await self._respond(request, jobs, fmt, bool(req.stream), _include_usage(req))

    async def tokenize(self, request: Request) -> Response:
        req = await self._read(request, TokenizeRequest)
        ids = self.tokenizer.encode(req.prompt, allow_special=True)
        return _json(TokenizeResponse(count=len(ids), max_model_len=self.engine.max_model_len, tokens=ids))

    async def detokenize(self, request: Request) -> Response:
        req = await self._read(request, DetokenizeRequest)
        try:
            return _json(DetokenizeResponse(prompt=self.tokenizer.decode(req.tokens)))
        except ValueError as exc:
            raise APIError(400, f"tokens: {exc}", param="tokens") from None

    async def tokenizer_info(self) -> Response:
        tok = self.tokenizer
        return _json(TokenizerInfo(tokenizer_class=type(tok).__name__, eos_token=tok.decode([tok.eos_id]),
                                   bos_token=tok.decode([tok.bos_id]), pad_token=tok.decode([tok.pad_id]),
                                   model_max_length=self.engine.max_model_len))

    async def models(self) -> Response:
        context = self.engine.max_model_len
        cards = [ModelCard(id=self.model_name, created=self.created, max_model_len=context)]
        cards += [ModelCard(id=name, created=self.created, max_model_len=context, parent=self.model_name)
                  for name in self.adapters]
        return _json(ModelList(data=cards))

    async def metrics_text(self) -> Response:  # async: engine.stats() is read on the event loop, not a thread
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _include_usage(req: SamplingRequest) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def create_app(engine: Engine, tokenizer: Any, model_name: str, api_key: str | None = None,
               max_request_bytes: int = 1 << 20, adapters: Sequence[str] | None = None) -> FastAPI:
    """The OpenAI-compatible app serving `engine` under `model_name`.

    adapters: the names of the engine's LoRA adapters, each served as a model of its own (default: the engine's
    `adapter_names`, if it has any); ValueError when one is the base model's name or repeats.

    api_key: when set, /v1 and tokenizer requests need `Authorization: Bearer <api_key>` (/health and /metrics
    stay open).
    max_request_bytes: larger bodies get a 413 without being read.
    """
    adapters = list(getattr(engine, "adapter_names", ()) if adapters is None else adapters)
    if model_name in adapters or len(set(adapters)) < len(adapters):
        raise ValueError(f"served names must differ: model {model_name!r}, adapters {adapters}")
    server = _Server(engine, tokenizer, model_name, max_request_bytes, adapters)

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key")

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return _error_response(exc)

    async def http_error(request: Request, exc: Exception) -> Response:  # unknown paths, wrong methods
        assert isinstance(exc, StarletteHTTPException)
        return _error_response(APIError(exc.status_code, str(exc.detail), type="invalid_request_error"))

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("request failed", exc_info=exc)
        return _error_response(APIError(500, "internal server error", type="internal_error"))

    # no OpenAPI docs: the API is OpenAI's, and its request models are validated by hand (for OpenAI's errors)
    app = FastAPI(title="dbrx", docs_url=None, redoc_url=None, openapi_url=None, exception_handlers={
        APIError: api_error, StarletteHTTPException: http_error, Exception: server_error})

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])
    v1.add_api_route("/completions", server.completions, methods=["POST"])
    v1.add_api_route("/chat/completions", server.chat, methods=["POST"])
    v1.add_api_route("/models", server.models, methods=["GET"])
    app.include_router(v1)
    # vLLM's tokenizer endpoints, which lm-eval's `local-completions` finds and uses (tokenizer_backend "remote")
    tokens = APIRouter(dependencies=[Depends(authorize)])
    tokens.add_api_route("/tokenize", server.tokenize, methods=["POST"])
    tokens.add_api_route("/detokenize", server.detokenize, methods=["POST"])
    tokens.add_api_route("/tokenizer_info", server.tokenizer_info, methods=["GET"])
    app.include_router(tokens)
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    async def chat_page() -> HTMLResponse:  # a static page that talks to /v1/chat/completions like any client
        return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"))

    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", server.metrics_text, methods=["GET"])
    app.add_api_route("/", chat_page, methods=["GET"], include_in_schema=False)
    return app


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, graceful_timeout: float = 30.0,
               log_level: str = "info") -> None:
    """Serve `app` with uvicorn until SIGTERM or SIGINT, then shut down gracefully.

    On the signal the server stops accepting connections and lets in-flight requests finish for up to
    `graceful_timeout` seconds; it then cancels the rest (which aborts their engine requests) and returns.
    """
    import uvicorn  # here: only serving needs it, building the app (and its tests) does not

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_timeout)
    server = uvicorn.Server(config)
    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        server.run()
        return
    # Once shut down, uvicorn raises the signal again for the handlers it found; ignoring it then makes a graceful
    # shutdown a normal return (exit status 0) instead of a death by SIGTERM or a KeyboardInterrupt traceback.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
