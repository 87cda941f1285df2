"""Load generation for `dbrx bench serve`: seeded random requests, streamed to `/v1/completions`, and the serving
metrics of vLLM's serving benchmark computed from the client's timestamps.

Definitions (all from the client's clock, `time.perf_counter`):
- a request is *sent* when it leaves its concurrency slot (time waiting for a slot is not latency);
- a *token chunk* is a streamed event with a non-empty `choices` list (the usage event and `[DONE]` are not);
- TTFT = first token chunk - sent; E2E latency = last token chunk - sent;
- ITL = the gaps between consecutive token chunks of a request (all requests' gaps pooled);
- TPOT of a request = (E2E - TTFT) / (output tokens - 1), for requests with more than one output token;
- output tokens = the server's `usage.completion_tokens` (stream_options.include_usage), else the token chunks;
- duration = first arrival to the last request's end; request throughput = completed / duration, output token
  throughput = output tokens / duration, total token throughput = (prompt + output tokens) / duration.
Each latency is reported as mean, median and p99 (numpy's linear interpolation) in milliseconds.

Arrivals: with `request_rate` R requests/s, the gaps between arrivals are exponential with mean 1/R (a Poisson
process), drawn from `seed`; with R = inf every request arrives at once. At most `max_concurrency` are in flight.

Imports: httpx (only when sending), numpy.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

__all__ = ["BenchRequest", "RequestResult", "arrival_times", "format_table", "local_server", "make_requests",
           "parse_length", "parse_rate", "run_load", "summarize"]

TOKEN_ID_LIMIT = 100256  # ids below it are ordinary cl100k tokens (no special or unused ids): safe random prompts


@dataclass(frozen=True)
class BenchRequest:
    prompt_ids: list[int]
    max_tokens: int


@dataclass
class RequestResult:
    """What the client saw of one request (perf_counter seconds)."""

    prompt_len: int
    sent: float = 0.0
    chunks: list[float] = field(default_factory=list)  # arrival time of each token chunk
    output_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.chunks)


# ---- requests and arrivals ----------------------------------------------------------------------------------------
def parse_length(text: str, name: str) -> tuple[int, int]:
    """'N' -> (N, N); 'LO:HI' -> (LO, HI), with 1 <= LO <= HI."""
    parts = str(text).split(":")
    try:
        lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, -1)
    except ValueError:
        lo, hi = 0, -1
    if not 1 <= lo <= hi:
        raise ValueError(f"{name} must be N or LO:HI with 1 <= LO <= HI, got {text!r}")
    return lo, hi


def parse_rate(text: str | float) -> float:
    """Requests per second: a positive number, or 'inf' (every request at once)."""
    try:
        rate = float(text)
    except ValueError:
        rate = math.nan
    if not rate > 0:  # also NaN
        raise ValueError(f"--request-rate must be a positive number or 'inf', got {text!r}")
    return rate


def make_requests(num_prompts: int, input_len: tuple[int, int], output_len: tuple[int, int], seed: int = 0,
                  vocab_size: int = TOKEN_ID_LIMIT) -> list[BenchRequest]:
    """`num_prompts` requests of uniformly random token ids; prompt and output lengths uniform in [lo, hi]."""
    if num_prompts < 1:
        raise ValueError(f"--num-prompts must be at least 1, got {num_prompts}")
    for name, (lo, hi) in (("--input-len", input_len), ("--output-len", output_len)):
        if not 1 <= lo <= hi:
            raise ValueError(f"{name} must be N or LO:HI with 1 <= LO <= HI, got {lo}:{hi}")
    rng = random.Random(seed)
    out = []
    for _ in range(num_prompts):
        n_in, n_out = rng.randint(*input_len), rng.randint(*output_len)
        out.append(BenchRequest([rng.randrange(vocab_size) for _ in range(n_in)], n_out))
    return out


def arrival_times(n: int, request_rate: float, seed: int = 0) -> list[float]:
    """Seconds after the start at which each of `n` requests arrives: 0 for the first, then exponential gaps."""
    if request_rate == math.inf:
        return [0.0] * n
    rng = random.Random(seed)
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(request_rate)
    return times


# ---- metrics ----------------------------------------------------------------------------------------------------
def _stats_ms(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None, "p99": None}
    a = np.asarray(values, dtype=np.float64) * 1000.0
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p99": float(np.percentile(a, 99))}


def summarize(results: Sequence[RequestResult], duration_s: float) -> dict:
    """The benchmark's metrics (module docstring) from per-request client timestamps."""
    done = [r for r in results if r.ok]
    ttft = [r.chunks[0] - r.sent for r in done]
    e2e = [r.chunks[-1] - r.sent for r in done]
    itl = [b - a for r in done for a, b in zip(r.chunks, r.chunks[1:])]
    tpot = [(r.chunks[-1] - r.chunks[0]) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    n_in, n_out = sum(r.prompt_len for r in done), sum(r.output_tokens for r in done)
    errors = sorted({r.error or "no tokens streamed" for r in results if not r.ok})
    return {
        "completed": len(done), "failed": len(results) - len(done), "duration_s": duration_s,
        "total_input_tokens": n_in, "total_output_tokens": n_out,
        "request_throughput": len(done) / duration_s, "output_throughput": n_out / duration_s,
        "total_token_throughput": (n_in + n_out) / duration_s,
        "ttft_ms": _stats_ms(ttft), "tpot_ms": _stats_ms(tpot), "itl_ms": _stats_ms(itl), "e2e_ms": _stats_ms(e2e),
        "errors": errors[:5],
    }


def format_table(summary: dict) -> str:
    """A human-readable table of a summary (for stderr)."""
    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:,.2f}"

    lines = [
        f"{'completed / failed':<28}{summary['completed']} / {summary['failed']}",
        f"{'duration (s)':<28}{num(summary['duration_s'])}",
        f"{'input / output tokens':<28}{summary['total_input_tokens']:,} / {summary['total_output_tokens']:,}",
        f"{'request throughput (req/s)':<28}{num(summary['request_throughput'])}",
        f"{'output throughput (tok/s)':<28}{num(summary['output_throughput'])}",
        f"{'total throughput (tok/s)':<28}{num(summary['total_token_throughput'])}",
        f"{'(ms)':<28}{'mean':>10}{'median':>10}{'p99':>10}",
    ]
    for key, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E latency")):
        s = summary[key]
        lines.append(f"{label:<28}{num(s['mean']):>10}{num(s['median']):>10}{num(s['p99']):>10}")
    lines += [f"error: {e}" for e in summary.get("errors", [])]
    return "\n".join(lines)


# ---- sending ----------------------------------------------------------------------------------------------------
def _error_text(status: int, body: bytes) -> str:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode(errors="replace")[:200]
    return f"HTTP {status}: {message}"


async def _send(client, req: BenchRequest, model: str | None) -> RequestResult:
    """Stream one completion and time its chunks (never raises for the server's or the network's failures)."""
    import httpx

    body: dict = {"prompt": req.prompt_ids, "max_tokens": req.max_tokens, "temperature": 0.0, "stream": True,
                  "stream_options": {"include_usage": True}}
    if model is not None:
        body["model"] = model
    result, usage_tokens, finished = RequestResult(len(req.prompt_ids)), None, False
    result.sent = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                result.error = _error_text(resp.status_code, await resp.aread())
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    finished = True
                    break
                event = json.loads(data)
                if event.get("choices"):
                    result.chunks.append(time.perf_counter())
                if event.get("error"):
                    result.error = f"stream error: {event['error'].get('message', event['error'])}"
                    return result
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens")
    except (httpx.HTTPError, OSError, ValueError) as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    if not finished:
        result.error = "the stream ended without [DONE]"
    result.output_tokens = usage_tokens if usage_tokens is not None else len(result.chunks)
    return result


async def _run(url: str, requests: Sequence[BenchRequest], max_concurrency: int, arrivals: Sequence[float],
               api_key: str | None, model: str | None, timeout_s: float, warmup: bool
               ) -> tuple[list[RequestResult], float]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=timeout_s) as client:
        async def timed(req: BenchRequest) -> RequestResult:
            try:
                return await asyncio.wait_for(_send(client, req, model), timeout_s)
            except asyncio.TimeoutError:
                return RequestResult(len(req.prompt_ids), error=f"timed out after {timeout_s:g} s")

        if warmup:  # a short request of its own (not one of the benchmark's prompts: no prefix-cache hit later)
            result = await timed(make_requests(1, (8, 8), (2, 2), seed=-1)[0])
            if not result.ok:
                raise ValueError(f"the warm-up request to {url} failed: {result.error or 'no tokens came back'}")
        slots = asyncio.Semaphore(max_concurrency)
        start = time.perf_counter()

        async def one(req: BenchRequest, at: float) -> RequestResult:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            async with slots:
                return await timed(req)

        results = await asyncio.gather(*(one(r, t) for r, t in zip(requests, arrivals)))
        return list(results), time.perf_counter() - start


def run_load(url: str, requests: Sequence[BenchRequest], max_concurrency: int = 32, request_rate: float = math.inf,
             seed: int = 0, *, api_key: str | None = None, model: str | None = None, timeout_s: float = 600.0,
             warmup: bool = True) -> dict:
    """Send `requests` to the server at `url` (arrivals and concurrency as in the module docstring); the summary.

    timeout_s bounds each request (and the warm-up request). Failed requests are counted, not raised.
    """
    if not requests:
        raise ValueError("no requests to send")
    if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be a positive integer, got {max_concurrency!r}")
    request_rate = parse_rate(request_rate)
    arrivals = arrival_times(len(requests), request_rate, seed)
    results, duration = asyncio.run(_run(url.rstrip("/"), requests, max_concurrency, arrivals, api_key, model,
                                         timeout_s, warmup))
    rate = "inf" if request_rate == math.inf else request_rate
    return {"url": url, "num_prompts": len(requests), "request_rate": rate, "max_concurrency": max_concurrency,
            "seed": seed, **summarize(results, duration)}


# ---- a local server -------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def local_server(model_dir: str, server_args: Sequence[str] = (), startup_timeout_s: float = 300.0
                 ) -> Iterator[str]:
    """Run `dbrx serve --model model_dir` on a free 127.0.0.1 port until /health answers; yield its URL; stop it."""
    if not os.path.isdir(model_dir):
        raise ValueError(f"--model {model_dir!r} is not a directory")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "dbrx", "serve", "--model", model_dir, *server_args, "--host", "127.0.0.1",
           "--port", str(port)]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + startup_timeout_s
            while not _healthy(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    tail = [x for x in log.read().decode(errors="replace").splitlines() if x.strip()][-1:]
                    why = f"exited with status {proc.returncode}" if proc.poll() is not None else "did not answer"
                    raise ValueError(f"dbrx serve {why} within {startup_timeout_s:g} s: {' '.join(tail)}")
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
