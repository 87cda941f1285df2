"""`dbrx bench serve` (dbrx.serve.loadgen): the metrics on a hand-made trace, seeded requests and arrivals, the CLI's
user errors, and one end-to-end run against a real `dbrx serve` of a tiny checkpoint."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest

from dbrx.cli import main
from dbrx.serve.loadgen import RequestResult, arrival_times, make_requests, parse_length, parse_rate, summarize


def test_summarize_hand_computed_trace():
    results = [
        RequestResult(10, sent=0.0, chunks=[0.1, 0.3, 0.4], output_tokens=3),  # TTFT 100, ITL 200 100, TPOT 150
        RequestResult(20, sent=1.0, chunks=[1.5], output_tokens=1),  # TTFT = E2E = 500, no ITL, no TPOT
        RequestResult(30, sent=2.0, chunks=[2.2, 2.4], output_tokens=5),  # 5 tokens in 2 chunks: TPOT 200 / 4
        RequestResult(40, sent=3.0, error="HTTP 500: boom"),
    ]
    s = summarize(results, duration_s=4.0)
    assert (s["completed"], s["failed"], s["errors"]) == (3, 1, ["HTTP 500: boom"])
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (60, 9)
    assert s["request_throughput"] == pytest.approx(3 / 4)
    assert s["output_throughput"] == pytest.approx(9 / 4)
    assert s["total_token_throughput"] == pytest.approx(69 / 4)
    # p99 by linear interpolation between the two largest of three values: a + 0.98 (b - a)
    expected = {"ttft_ms": (800 / 3, 200, 200 + 0.98 * 300), "itl_ms": (500 / 3, 200, 200),
                "tpot_ms": (100, 100, 50 + 0.99 * 100), "e2e_ms": (1300 / 3, 400, 400 + 0.98 * 100)}
    for key, (mean, median, p99) in expected.items():
        assert s[key] == pytest.approx({"mean": mean, "median": median, "p99": p99}), key


def test_summarize_nothing_completed():
    s = summarize([RequestResult(5, error="timed out after 1 s"), RequestResult(5)], duration_s=2.0)
    assert (s["completed"], s["failed"], s["output_throughput"]) == (0, 2, 0.0)
    assert s["ttft_ms"] == {"mean": None, "median": None, "p99": None}
    assert s["errors"] == ["no tokens streamed", "timed out after 1 s"]


def test_make_requests_is_seeded_and_in_range():
    a = make_requests(50, (3, 9), (2, 5), seed=7)
    assert a == make_requests(50, (3, 9), (2, 5), seed=7) and a != make_requests(50, (3, 9), (2, 5), seed=8)
    assert {len(r.prompt_ids) for r in a} == set(range(3, 10))  # 50 draws cover all 7 lengths
    assert {r.max_tokens for r in a} == set(range(2, 6))
    assert all(0 <= t < 100256 for r in a for t in r.prompt_ids)  # ordinary tokens only
    assert {len(r.prompt_ids) for r in make_requests(5, (4, 4), (1, 1))} == {4}


def test_poisson_arrivals():
    t = np.array(arrival_times(20_000, 4.0, seed=1))
    gaps = np.diff(t)
    assert t[0] == 0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(0.25, rel=0.03) and gaps.std() == pytest.approx(0.25, rel=0.05)
    assert arrival_times(5, 4.0, seed=1) == arrival_times(5, 4.0, seed=1) != arrival_times(5, 4.0, seed=2)
    assert arrival_times(3, math.inf) == [0.0, 0.0, 0.0]


def test_parsers():
    assert parse_length("7", "--input-len") == (7, 7) and parse_length("2:9", "--input-len") == (2, 9)
    assert parse_rate("inf") == math.inf and parse_rate("2.5") == 2.5
    for bad in ("0", "3:", "a:b", "1:2:3", "-1:4"):
        with pytest.raises(ValueError, match="--output-len"):
            parse_length(bad, "--output-len")


@pytest.mark.parametrize("args, message", [
    (["--input-len", "5:2"], "--input-len must be N or LO:HI with 1 <= LO <= HI, got '5:2'"),
    (["--num-prompts", "0"], "--num-prompts must be at least 1, got 0"),
    (["--request-rate", "-1"], "--request-rate must be a positive number or 'inf', got '-1'"),
    (["--request-rate", "nan"], "--request-rate must be a positive number"),
    (["--max-concurrency", "0"], "--max-concurrency must be a positive integer"),
])
def test_cli_user_errors_are_one_line(capsys, args, message):
    # the inputs are checked before any connection: port 9 (discard) is never contacted
    assert main(["bench", "serve", "--url", "http://127.0.0.1:9", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dbrx bench: error: ") and message in err and err.count("\n") == 1


serve_stack = all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn", "httpx", "prometheus_client"))


@pytest.mark.skipif(not serve_stack, reason="needs the serve extra (fastapi, uvicorn, prometheus_client) and httpx")
def test_end_to_end_against_dbrx_serve(tmp_path, capsys):
    pytest.importorskip("dbrx.serve.api")
    assert main(["init", "--preset", "dbrx-tiny", str(tmp_path / "tiny")]) == 0
    rc = main(["bench", "serve", "--model", str(tmp_path / "tiny"), "--num-prompts", "4", "--input-len", "8:24",
               "--output-len", "2:8", "--max-concurrency", "2", "--json", "--served-model", "tiny"])
    out, err = capsys.readouterr()
    r = json.loads(out)
    assert rc == 0 and (r["completed"], r["failed"]) == (4, 0), r["errors"]
    requests = make_requests(4, (8, 24), (2, 8), seed=0)
    assert r["total_input_tokens"] == sum(len(q.prompt_ids) for q in requests)
    assert 0 < r["total_output_tokens"] <= sum(q.max_tokens for q in requests)
    assert 0 < r["ttft_ms"]["mean"] <= r["e2e_ms"]["mean"] and r["ttft_ms"]["p99"] <= r["e2e_ms"]["p99"]
    assert r["output_throughput"] > 0 and r["duration_s"] > 0
    assert "TTFT" in err and "output throughput" in err
    # a name the server does not serve: the warm-up request gets the server's 404, a one-line error, exit 2
    rc = main(["bench", "serve", "--model", str(tmp_path / "tiny"), "--num-prompts", "2", "--input-len", "8",
               "--output-len", "2", "--json", "--served-model", "nope"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and "HTTP 404: model 'nope' not found; this server serves 'tiny'" in err
