"""The OpenAI-compatible server (dbrx.serve.api) over a fake engine, through the official `openai` client and httpx.

The fake engine is deterministic: it replies with the prompt's non-special token ids over and over, one token per
output, with made-up log-probabilities, and records which requests finished and which were aborted.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import uvicorn  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from dbrx.serve.api import create_app, run_server  # noqa: E402
from dbrx.tokenizer import SPECIAL_TOKENS, get_tokenizer  # noqa: E402

MODEL = "dbrx-test"
KEY = "test-key"
CONTEXT = 512
SPECIAL_IDS = set(SPECIAL_TOKENS.values())


# ---- the fake engine --------------------------------------------------------------------------------------------
class QueueFull(Exception):
    """Stands in for dbrx.serve.engine.QueueFull (the server matches it by name)."""


@dataclass
class FakeOutput:
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[dict] | None
    prompt_logprobs: list[dict | None] | None
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int


def fake_logprob(token_id: int) -> float:
    return -0.1 * (1 + token_id % 5)


def fake_entry(token_id: int, k: int) -> dict:
    """The token is its own best alternative; the others are its successors, each 1 nat less likely."""
    lp = fake_logprob(token_id)
    return {"token_id": token_id, "logprob": lp, "top": [(token_id + j, lp - j) for j in range(k)]}


class FakeEngine:
    """The AsyncEngine interface, deterministic and instant (unless `delay` is set)."""

    max_model_len = CONTEXT

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.queue_full = False
        self.delay = 0.0
        self.finished: list[str] = []
        self.aborted: list[str] = []
        self.running = 0
        self.prefix_hits = 0
        self.prefix_queries = 0
        self.seen: set[tuple[int, ...]] = set()

    async def generate(self, request_id, prompt_ids, params, logprobs=None, prompt_logprobs=None
                       ) -> AsyncIterator[FakeOutput]:
        if self.queue_full:
            raise QueueFull("the waiting queue is full")
        params.validate()
        if len(prompt_ids) + params.max_new_tokens > self.max_model_len:
            raise ValueError("prompt + max_new_tokens over max_model_len")
        cached = len(prompt_ids) - 1 if tuple(prompt_ids) in self.seen else 0
        self.seen.add(tuple(prompt_ids))
        self.prefix_hits += cached
        self.prefix_queries += len(prompt_ids)
        reply = [t for t in prompt_ids if t not in SPECIAL_IDS] or [15]
        prompt_lps = None
        if prompt_logprobs is not None:
            prompt_lps = [None] + [fake_entry(t, prompt_logprobs) for t in prompt_ids[1:]]
        self.running += 1
        done = False
        try:
            for i in range(params.max_new_tokens):
                await asyncio.sleep(self.delay)
                tok = reply[i % len(reply)]
                done = i == params.max_new_tokens - 1  # before the yield: the server may close us right after it
                yield FakeOutput(request_id, [tok], None if logprobs is None else [fake_entry(tok, logprobs)],
                                 prompt_lps if i == 0 else None, done, "length" if done else None, len(prompt_ids),
                                 cached)
        finally:
            self.running -= 1
            (self.finished if done else self.aborted).append(request_id)

    def stats(self) -> dict:
        return {"running": self.running, "waiting": 0, "kv_usage": self.running / 8,
                "prefix_hits": self.prefix_hits, "prefix_queries": self.prefix_queries}


def fake_reply(prompt_ids: list[int], n: int) -> list[int]:
    reply = [t for t in prompt_ids if t not in SPECIAL_IDS]
    return [reply[i % len(reply)] for i in range(n)]


# ---- the server under test ----------------------------------------------------------------------------------
def make_app(engine: FakeEngine):
    return create_app(engine, get_tokenizer(), MODEL, api_key=KEY, max_request_bytes=64 * 1024)


@pytest.fixture(scope="module")
def server():
    engine = FakeEngine()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(make_app(engine), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.01)
    yield engine, f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture
def engine(server) -> FakeEngine:
    server[0].reset()
    return server[0]


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[1]}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server[1], headers={"Authorization": f"Bearer {KEY}"}, timeout=10) as c:
        yield c


def wait_for(condition, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def sse_events(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


# ---- completions ----------------------------------------------------------------------------------------------
def test_completion_text_usage_and_finish(client, engine):
    tok = get_tokenizer()
    ids = tok.encode("one two three")
    out = client.completions.create(model=MODEL, prompt="one two three", max_tokens=5, temperature=0)
    assert out.object == "text_completion" and out.model == MODEL
    assert out.choices[0].text == tok.decode(fake_reply(ids, 5))
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (3, 5, 8)
    assert len(engine.finished) == 1 and not engine.aborted


def test_prompt_lists_give_one_choice_each_in_order(client):
    tok = get_tokenizer()
    texts = ["alpha beta", "gamma", "delta epsilon zeta"]
    ids = [tok.encode(t) for t in texts]
    for prompt in (texts, ids):
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4)
        assert [c.index for c in out.choices] == [0, 1, 2]
        assert [c.text for c in out.choices] == [tok.decode(fake_reply(p, 4)) for p in ids]
        assert out.usage.prompt_tokens == sum(map(len, ids))
    single = client.completions.create(model=MODEL, prompt=ids[0], max_tokens=4)  # one list of token ids
    assert [c.text for c in single.choices] == [tok.decode(fake_reply(ids[0], 4))]


def test_unknown_fields_are_ignored(http):
    body = {"prompt": "hi", "max_tokens": 2, "user": 5, "logit_bias": "x", "frobnicate": [1, {"a": None}]}
    assert http.post("/v1/completions", json=body).status_code == 200


def test_stream_reassembles_to_the_whole_text(client):
    whole = client.completions.create(model=MODEL, prompt=["naïve café ünïcode", "b c"], max_tokens=9)
    chunks = list(client.completions.create(model=MODEL, prompt=["naïve café ünïcode", "b c"], max_tokens=9,
                                            stream=True, stream_options={"include_usage": True}))
    for choice in whole.choices:
        parts = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert "".join(p.text for p in parts) == choice.text
        assert parts[-1].finish_reason == "length"
    assert not chunks[-1].choices and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_echo_max_tokens_0_gives_prompt_logprobs_in_the_legacy_format(client, engine):
    tok = get_tokenizer()
    ids = tok.encode("The cat sat on the mat")
    # lm-evaluation-harness local-completions scores a continuation like this
    out = client.completions.create(model=MODEL, prompt=[ids], echo=True, max_tokens=0, logprobs=1, temperature=0)
    choice = out.choices[0]
    assert choice.text == "The cat sat on the mat"
    lp = choice.logprobs
    assert lp.tokens == [tok.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([fake_logprob(t) for t in ids[1:]])
    for token, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert top[token] == pytest.approx(value) == pytest.approx(max(top.values()))  # greedy: its own best
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
    assert out.usage.completion_tokens == 0 and choice.finish_reason == "length"
    # newer harness versions ask for one token and drop its entry: token_logprobs[ctxlen:-1]
    out = client.completions.create(model=MODEL, prompt=[ids, ids[:3]], echo=True, max_tokens=1, logprobs=1)
    assert [len(c.logprobs.token_logprobs) for c in out.choices] == [len(ids) + 1, 4]
    assert out.choices[0].logprobs.token_logprobs[:-1] == lp.token_logprobs


def test_logprobs_of_generated_tokens(client):
    tok = get_tokenizer()
    ids = tok.encode("red green blue")
    out = client.completions.create(model=MODEL, prompt="red green blue", max_tokens=3, logprobs=2)
    lp = out.choices[0].logprobs
    reply = fake_reply(ids, 3)
    assert lp.tokens == [tok.decode([t]) for t in reply]
    assert lp.token_logprobs == pytest.approx([fake_logprob(t) for t in reply])
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_the_text(client, engine, stream):
    cases = [([" three"], "one two"), (["wo th"], "one t"), (["four", "nine"], "one two three ")]
    for stop, expected in cases:
        kwargs = dict(model=MODEL, prompt="one two three four", max_tokens=20, stop=stop)
        if stream:
            chunks = [c.choices[0] for c in client.completions.create(stream=True, **kwargs)]
            text, reason = "".join(c.text for c in chunks), chunks[-1].finish_reason
        else:
            choice = client.completions.create(**kwargs).choices[0]
            text, reason = choice.text, choice.finish_reason
        assert (text, reason) == (expected, "stop")
    assert wait_for(lambda: len(engine.aborted) == len(cases)), "stopping early must abort the engine request"


# ---- chat -----------------------------------------------------------------------------------------------------
def test_chat_completion_and_stream(client):
    tok = get_tokenizer()
    messages = [{"role": "user", "content": "Hi there"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == tok.decode(fake_reply(ids, 6))
    assert out.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == out.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 6
    own = client.chat.completions.create(model=MODEL, max_tokens=1, messages=[
        {"role": "system", "content": "Be brief."}, *messages])
    assert own.usage.prompt_tokens < len(ids)  # a given system message replaces the default one


def test_chat_logprobs(client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x y"}], max_tokens=4,
                                         logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([entry.logprob, entry.logprob - 1])
        assert bytes(entry.bytes).decode() == entry.token


# ---- errors -----------------------------------------------------------------------------------------------------
USER = {"role": "user", "content": "hi"}
BAD_REQUESTS = [
    ("completions", b'{"prompt": "hi", '),
    ("completions", b"[1, 2]"),
    ("completions", b"\xff\xfe"),
    ("completions", {"max_tokens": 3}),
    ("completions", {"prompt": {"text": "hi"}}),
    ("completions", {"prompt": ""}),
    ("completions", {"prompt": []}),
    ("completions", {"prompt": [1, -2]}),
    ("completions", {"prompt": [100300]}),
    ("completions", {"prompt": [[1, 2], []]}),
    ("completions", {"prompt": [1, True]}),
    ("completions", {"prompt": "hi", "temperature": -0.5}),
    ("completions", {"prompt": "hi", "temperature": "hot"}),
    ("completions", b'{"prompt": "hi", "temperature": NaN}'),
    ("completions", {"prompt": "hi", "top_p": 0}),
    ("completions", {"prompt": "hi", "top_p": 1.5}),
    ("completions", {"prompt": "hi", "top_k": -2}),
    ("completions", {"prompt": "hi", "repetition_penalty": 0}),
    ("completions", {"prompt": "hi", "max_tokens": -1}),
    ("completions", {"prompt": "hi", "max_tokens": "5"}),
    ("completions", {"prompt": "hi", "max_tokens": 10**9}),
    ("completions", {"prompt": [5] * (CONTEXT + 1)}),
    ("completions", {"prompt": [5] * (CONTEXT - 4), "max_tokens": 10}),
    ("completions", {"prompt": "hi", "logprobs": 21}),
    ("completions", {"prompt": "hi", "logprobs": True}),
    ("completions", {"prompt": "hi", "n": 2}),
    ("completions", {"prompt": "hi", "stream": "yes"}),
    ("completions", {"prompt": "hi", "stop": [""]}),
    ("completions", {"prompt": "hi", "stop": 5}),
    ("completions", {"prompt": "hi", "seed": 2**70}),
    ("completions", {"prompt": "hi", "echo": 1}),
    ("chat/completions", {}),
    ("chat/completions", {"messages": []}),
    ("chat/completions", {"messages": "hello"}),
    ("chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}),
    ("chat/completions", {"messages": [{"role": "user", "content": 5}]}),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
    ("chat/completions", {"messages": [{"role": "system", "content": "only a system turn"}]}),
    ("chat/completions", {"messages": [{"role": "user", "content": "x " * CONTEXT}]}),
    ("chat/completions", {"messages": [USER], "logprobs": True, "top_logprobs": 25}),
    ("chat/completions", {"messages": [USER], "top_logprobs": 2}),
    ("chat/completions", {"messages": [USER], "logprobs": 1}),
    ("chat/completions", {"messages": [USER], "max_completion_tokens": -1}),
    ("chat/completions", {"messages": [USER], "n": 3}),
    ("chat/completions", {"messages": [USER], "stream_options": {"include_usage": "yes"}}),
]


def assert_error_body(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and "param" in error and "code" in error
    return error


@pytest.mark.parametrize("path,body", BAD_REQUESTS)
def test_bad_requests_are_400_with_the_error_body(http, engine, path, body):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = http.post(f"/v1/{path}", content=content, headers={"Content-Type": "application/json"})
    assert assert_error_body(response, 400)["type"] == "invalid_request_error"
    assert not engine.finished and not engine.running


def test_bad_field_is_named(http):
    error = assert_error_body(http.post("/v1/completions", json={"prompt": "hi", "top_p": 2}), 400)
    assert error["param"] == "top_p" and "top_p" in error["message"]


def test_auth_model_size_and_busy_errors(server, http, engine):
    url = server[1]
    body = {"prompt": "hi", "max_tokens": 1}
    assert_error_body(httpx.post(f"{url}/v1/completions", json=body), 401)
    assert_error_body(httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer no"}), 401)
    assert_error_body(httpx.post(f"{url}/tokenize", json={"prompt": "hi"}), 401)  # so do the tokenizer endpoints
    assert httpx.get(f"{url}/health").status_code == 200  # health and metrics need no key
    assert assert_error_body(http.post("/v1/completions", json={**body, "model": "gpt-4"}), 404)["param"] == "model"
    assert_error_body(http.get("/v1/nowhere"), 404)
    assert_error_body(http.post("/v1/completions", json={"prompt": "x" * 70_000}), 413)
    engine.queue_full = True
    for path, req in (("completions", body), ("chat/completions", {"messages": [USER], "stream": True})):
        response = http.post(f"/v1/{path}", json=req)
        assert_error_body(response, 429)
        assert int(response.headers["Retry-After"]) >= 1


def test_models_and_health(client, http):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert http.get("/health").json() == {"status": "ok"}


# ---- fuzzing ----------------------------------------------------------------------------------------------------
# Bodies are mostly plausible (so that many reach the tokenizer and the engine), with up to two fields replaced by
# anything at all; some are not JSON.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
TOKEN_IDS = st.lists(st.integers(0, 40) | st.integers(100_250, 100_360), min_size=1, max_size=6)
PROMPTS = st.text(max_size=24) | TOKEN_IDS | st.lists(st.text(max_size=8) | TOKEN_IDS, min_size=1, max_size=3)
MESSAGES = st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["system", "user", "assistant", "developer"]),
    "content": st.text(max_size=16) | st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                                       "text": st.text(max_size=8)}), max_size=2)}),
    min_size=1, max_size=3)
COMMON = {
    "model": st.just(MODEL), "max_tokens": st.integers(0, 24), "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 50), "repetition_penalty": st.floats(0.5, 2),
    "seed": st.integers(-(2**63), 2**64 - 1), "n": st.just(1), "stream": st.booleans(),
    "stop": st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=3),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
}
PLAUSIBLE = {
    "completions": st.fixed_dictionaries({"prompt": PROMPTS}, optional={
        **COMMON, "echo": st.booleans(), "logprobs": st.integers(0, 5)}),
    "chat/completions": st.fixed_dictionaries({"messages": MESSAGES}, optional={
        **COMMON, "logprobs": st.booleans(), "top_logprobs": st.integers(0, 5),
        "max_completion_tokens": st.integers(0, 24)}),
}
NAMES = sorted({*COMMON, "prompt", "messages", "echo", "logprobs", "top_logprobs", "max_completion_tokens"})
JUNK = st.dictionaries(st.sampled_from(NAMES) | st.text(max_size=6),
                       JSON | st.integers(-10, 10**6) | st.floats(-3, 3) | TOKEN_IDS, max_size=2)


def request_bodies(path: str) -> st.SearchStrategy[bytes]:
    return st.binary(max_size=40) | st.builds(lambda body, junk: json.dumps({**body, **junk}).encode(),
                                              PLAUSIBLE[path], JUNK)


REQUESTS = st.sampled_from(sorted(PLAUSIBLE)).flatmap(lambda path: st.tuples(st.just(path), request_bodies(path)))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=REQUESTS)
def test_fuzzed_bodies_get_200_or_a_4xx_error_body(http, request):
    path, body = request
    response = http.post(f"/v1/{path}", content=body, headers={"Content-Type": "application/json"})
    if response.status_code == 200:
        if response.headers["content-type"].startswith("text/event-stream"):
            events = sse_events(response.text)
            assert events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1])
        else:
            assert response.json()["choices"]
    else:
        assert 400 <= response.status_code < 500, response.text
        assert_error_body(response, response.status_code)


# ---- disconnects, metrics, shutdown -------------------------------------------------------------------------------
def test_disconnect_mid_stream_aborts_the_request(server, engine):
    engine.delay = 0.02
    body = {"prompt": "one two", "max_tokens": 400, "stream": True}
    with httpx.Client(base_url=server[1], headers={"Authorization": f"Bearer {KEY}"}) as c:
        with c.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            next(response.iter_lines())
    assert wait_for(lambda: len(engine.aborted) == 1), "the engine request was not aborted"
    assert engine.running == 0 and not engine.finished


def test_disconnect_while_waiting_aborts_the_request(server, engine):
    engine.delay = 0.05
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server[1]}/v1/completions", json={"prompt": "one two", "max_tokens": 400},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=0.3)
    assert wait_for(lambda: len(engine.aborted) == 1), "the engine request was not aborted"
    assert engine.running == 0


def scrape(http) -> dict[str, float]:
    response = http.get("/metrics")
    assert response.status_code == 200
    return {s.name + json.dumps(s.labels, sort_keys=True).replace("{}", ""): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def test_metrics_move(client, http, engine):
    before = scrape(http)
    for _ in range(2):  # the second time the prompt is in the fake's prefix cache
        client.completions.create(model=MODEL, prompt="one two three four five", max_tokens=3)
    after = scrape(http)
    for name in ("dbrx_num_requests_running", "dbrx_num_requests_waiting", "dbrx_kv_cache_usage_ratio"):
        assert name in after
    assert after["dbrx_prompt_tokens_total"] - before["dbrx_prompt_tokens_total"] == 10
    assert after["dbrx_generation_tokens_total"] - before["dbrx_generation_tokens_total"] == 6
    assert after["dbrx_prefix_cache_query_tokens_total"] == 10 and after["dbrx_prefix_cache_hit_tokens_total"] == 4
    for histogram, count in (("time_to_first_token", 2), ("inter_token_latency", 4), ("e2e_request_latency", 2)):
        name = f"dbrx_{histogram}_seconds_count"
        assert after[name] - before.get(name, 0) == count
    label = 'dbrx_request_finished_total{"finish_reason": "length"}'
    assert after[label] - before.get(label, 0) == 2


def test_sigterm_drains_in_flight_requests_then_returns():
    """run_server in this (main) thread; a client thread streams, sends SIGTERM mid-stream, and checks the drain."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url, engine, seen = f"http://127.0.0.1:{port}", FakeEngine(), {}
    engine.delay = 0.03
    handler = signal.getsignal(signal.SIGTERM)

    def up() -> bool:
        try:
            return httpx.get(f"{url}/health").status_code == 200
        except httpx.TransportError:
            return False

    def client() -> None:
        try:
            assert wait_for(up, timeout=10), "the server did not start"
            body = {"prompt": "one two three", "max_tokens": 20, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                              timeout=10) as response:
                lines = response.iter_lines()
                first = next(lines)
                os.kill(os.getpid(), signal.SIGTERM)
                seen["refused"] = wait_for(lambda: not up(), timeout=2)
                seen["events"] = sse_events("\n".join([first, *lines]))
        except BaseException as exc:
            seen["error"] = exc
        finally:
            if "refused" not in seen:  # never leave the main thread serving
                os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    run_server(make_app(engine), port=port, graceful_timeout=10, log_level="warning")  # returns: a clean exit
    thread.join(10)
    assert "error" not in seen, seen.get("error")
    assert seen["refused"], "new connections still admitted after SIGTERM"
    assert seen["events"][-1] == "[DONE]"
    assert json.loads(seen["events"][-2])["choices"][0]["finish_reason"] == "length"  # ran to its end
    assert len(engine.finished) == 1 and not engine.aborted
    assert signal.getsignal(signal.SIGTERM) == handler
