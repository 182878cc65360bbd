"""OpenAIBackend against a real local HTTP server (tests/support/openai_server.py)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from dataprep.rephrase.openai_backend import OpenAIBackend, _parse_retry_after
from dataprep.rephrase.types import Request, Result
from tests.support.openai_server import Reply, StubOpenAIServer

PROJECT = Path(__file__).resolve().parent.parent
SECRET = "sk-test-SECRET-0123456789"


def req(prompt: str, i: int = 0) -> Request:
    return Request(key=f"k{i}", messages=[{"role": "system", "content": "Rewrite the text."},
                                          {"role": "user", "content": prompt}],
                   style="qa", source_text=prompt)


def run(backend: OpenAIBackend, requests: list[Request]) -> dict[int, Result]:
    """generate(), checking on_result is called once per index from the calling thread."""
    results: dict[int, Result] = {}
    calls: list[int] = []
    caller = threading.get_ident()

    def on_result(i: int, result: Result) -> None:
        assert threading.get_ident() == caller
        calls.append(i)
        results[i] = result

    backend.generate(requests, on_result)
    assert sorted(calls) == list(range(len(requests)))
    return results


def backend(server: StubOpenAIServer, **kw) -> OpenAIBackend:
    options = dict(model="stub-model", params={"temperature": 0.7, "top_p": 0.9, "seed": 1},
                   api_key=None, concurrency=4, timeout_s=5.0, max_retries=3, backoff_s=0.01, seed=0,
                   trust_env=False)
    options.update(kw)
    return OpenAIBackend(server.base_url, **options)


@pytest.fixture
def server():
    with StubOpenAIServer(latency_s=0.0) as s:
        yield s


def test_ok_reply_usage_params_and_progress(server):
    progress: list[tuple[int, int]] = []
    b = backend(server, progress=lambda d, t: progress.append((d, t)))
    requests = [req(f"the quick brown fox number {i}", i) for i in range(5)]
    results = run(b, requests)
    for i, result in results.items():
        assert result.status == "ok", result
        assert result.text == f"REPHRASED: the quick brown fox number {i}"
        assert result.tokens_in == 3 + 6 and result.tokens_out == 7
        assert result.attempts == 1 and result.latency_s > 0 and result.reason is None
        assert result.extra == {}
    body = next(r.body for r in server.requests if r.prompt.endswith(" 0"))
    assert body == {"temperature": 0.7, "top_p": 0.9, "seed": 1, "model": "stub-model",
                    "messages": requests[0].messages}
    assert progress == [(d, 5) for d in range(1, 6)]
    assert b.stats.ok == 5 and b.stats.attempts == 5 and b.stats.retries == 0 and b.stats.tokens_out == 35


def test_empty_request_list_sends_nothing(server):
    b = backend(server)
    run(b, [])
    assert server.received == 0


def test_concurrency_limit_holds():
    with StubOpenAIServer(latency_s=0.1) as server:
        b = backend(server, concurrency=8)
        t0 = time.perf_counter()
        results = run(b, [req(f"doc {i}", i) for i in range(40)])
        wall = time.perf_counter() - t0
    assert all(r.status == "ok" for r in results.values())
    assert server.max_in_flight == 8
    assert wall >= 0.5 - 0.02  # 40 requests, 8 at a time, 0.1 s each: at least 5 waves


def test_concurrency_limit_holds_across_client_shards():
    # 12 slots over clients of 5 connections (5 + 5 + 2): still exactly 12 in flight at most
    with StubOpenAIServer(latency_s=0.1) as server:
        b = backend(server, concurrency=12, connections_per_client=5)
        results = run(b, [req(f"doc {i}", i) for i in range(36)])
    assert all(r.status == "ok" for r in results.values())
    assert server.max_in_flight == 12


def test_429_is_retried_then_succeeds():
    with StubOpenAIServer(fail_first=3, fail_status=429) as server:
        b = backend(server, concurrency=1)
        results = run(b, [req("hello world", 0)])
    assert results[0].status == "ok" and results[0].attempts == 4
    assert b.stats.retries == 3 and b.stats.attempts == 4 and server.received == 4
    assert [r.status for r in results.values()] == ["ok"]


def test_429_storm_all_recover(server):
    # every prompt gets two 429s: with several requests racing for the slots, each still succeeds
    server.script(lambda seen, body: Reply(429, {"error": "slow down"}) if seen < 2 else None)
    b = backend(server, concurrency=3)
    results = run(b, [req(f"doc {i}", i) for i in range(12)])
    assert all(r.status == "ok" and r.attempts == 3 for r in results.values())
    assert server.received == 36 and b.stats.retries == 24 and server.max_in_flight <= 3


def test_retry_after_header_is_honoured():
    with StubOpenAIServer(fail_first=1, fail_status=429, retry_after=0.3) as server:
        b = backend(server, concurrency=1, backoff_s=0.001)
        results = run(b, [req("hello", 0)])
        times = [r.time for r in server.requests]
    assert results[0].status == "ok" and results[0].attempts == 2
    assert times[1] - times[0] >= 0.28


def test_retry_after_is_capped(server):
    server.script(lambda seen, body: Reply(503, {"error": "busy"}, {"Retry-After": "3600"}) if seen == 0 else None)
    b = backend(server, max_backoff_s=0.05)
    t0 = time.perf_counter()
    results = run(b, [req("capped", 0)])
    assert results[0].status == "ok" and results[0].attempts == 2
    assert time.perf_counter() - t0 < 2


def test_parse_retry_after():
    assert _parse_retry_after("2") == 2.0 and _parse_retry_after(" 0.5 ") == 0.5
    assert _parse_retry_after(None) is None and _parse_retry_after("-1") is None
    assert _parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None


def test_transient_500_is_retried_then_succeeds(server):
    results = run(backend(server), [req("flaky FAIL500x2 text", 0)])
    assert results[0].status == "ok" and results[0].attempts == 3
    assert results[0].text == "REPHRASED: flaky FAIL500x2 text"


def test_persistent_500_fails_after_max_retries(server):
    b = backend(server, max_retries=3)
    results = run(b, [req("broken FAIL500", 0), req("fine", 1)])
    assert results[0].status == "failed" and results[0].text is None
    assert results[0].reason == "http 500 after 4 attempts" and results[0].attempts == 4
    assert results[1].status == "ok"
    assert server.received == 5 and b.stats.failed == 1 and b.stats.ok == 1


def test_timeout_is_retried_then_fails(server):
    server.slow_s = 5.0
    b = backend(server, timeout_s=0.2, max_retries=2)
    t0 = time.perf_counter()
    results = run(b, [req("SLOW please", 0), req("quick", 1)])
    assert time.perf_counter() - t0 < 3
    assert results[0].status == "failed" and results[0].attempts == 3
    assert "timeout" in results[0].reason and results[0].reason == "timeout after 3 attempts"
    assert results[1].status == "ok"
    assert sum(p == "SLOW please" for p in server.prompts()) == 3


def test_timeout_then_success(server):
    server.script(lambda seen, body: Reply(delay_s=5.0, body={"never": "sent"}) if seen == 0 else None)
    results = run(backend(server, timeout_s=0.2), [req("slow once", 0)])
    assert results[0].status == "ok" and results[0].attempts == 2 and results[0].latency_s < 0.2


def test_connection_error_is_retried_then_fails():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b = OpenAIBackend(f"http://127.0.0.1:{port}/v1", model="m", params={}, concurrency=2, timeout_s=2,
                      max_retries=2, backoff_s=0.01, trust_env=False)
    results = run(b, [req("a", 0), req("b", 1)])
    for result in results.values():
        assert result.status == "failed" and result.attempts == 3
        assert result.reason.startswith("connection error") and result.reason.endswith("after 3 attempts")


@pytest.mark.parametrize("marker", ["MALFORMED", "NOCHOICES"])
def test_malformed_response_fails_without_retry(server, marker):
    results = run(backend(server), [req(f"{marker} here", 0)])
    assert results[0].status == "failed" and results[0].attempts == 1
    assert results[0].reason.startswith("malformed response")
    assert server.received == 1


def test_content_not_a_string_is_malformed(server):
    server.script(lambda seen, body: Reply(200, {"choices": [{"message": {"content": None}}]}))
    results = run(backend(server), [req("x", 0)])
    assert results[0].status == "failed" and "malformed" in results[0].reason


def test_400_is_not_retried(server):
    results = run(backend(server), [req("bad FAIL400 request", 0)])
    assert results[0].status == "failed" and results[0].attempts == 1
    assert results[0].reason.startswith("http 400: ") and "scripted 400" in results[0].reason
    assert server.received == 1


def test_length_finish_reason_keeps_text(server):
    b = backend(server, params={"max_tokens": 3})
    results = run(b, [req("one two three four five", 0)])
    assert results[0].status == "ok" and results[0].text == "REPHRASED: one two"
    assert results[0].extra == {"finish_reason": "length"} and results[0].tokens_out == 3


def test_api_key_in_header_never_in_results(server):
    # the server echoes the key in its error bodies: the backend must redact it
    def echo(seen, body):
        if "ECHO" in str(body):
            return Reply(401, f"invalid key {SECRET}")
        return None

    server.script(echo)
    b = backend(server, api_key=SECRET)
    requests = [req("fine", 0), req("ECHO", 1), req("FAIL500", 2), req("MALFORMED", 3), req("SLOW", 4)]
    server.slow_s = 5.0
    b.timeout_s = 0.2
    b.max_retries = 1
    results = run(b, requests)
    assert {r.authorization for r in server.requests} == {f"Bearer {SECRET}"}
    assert results[0].status == "ok" and results[1].reason.startswith("http 401")
    for result in results.values():
        assert SECRET not in repr(result)
    assert SECRET not in repr(b) and SECRET not in str(b.stats.as_dict())


def test_no_authorization_header_without_key(server):
    run(backend(server, api_key=None), [req("x", 0)])
    assert server.requests[0].authorization is None


def test_on_result_exception_propagates_and_stops(server):
    b = backend(server, concurrency=2)

    def boom(i, result):
        raise RuntimeError("cache write failed")

    with pytest.raises(RuntimeError, match="cache write failed"):
        b.generate([req(f"d{i}", i) for i in range(20)], boom)
    assert server.received < 20


def test_backoff_is_bounded_full_jitter():
    b = OpenAIBackend("http://127.0.0.1:1/v1", model="m", backoff_s=1.0, max_backoff_s=4.0, seed=3)
    for n in range(1, 10):
        delay = b._delay(n, None)
        assert 0 <= delay <= min(4.0, 2 ** (n - 1))
    assert b._delay(1, 100.0) == 4.0 and b._delay(1, 0.5) == 0.5


def test_rejects_streaming_and_bad_args():
    with pytest.raises(ValueError):
        OpenAIBackend("http://x/v1", model="m", params={"stream": True})
    with pytest.raises(ValueError):
        OpenAIBackend("http://x/v1", model="m", concurrency=0)


def test_server_runs_as_a_separate_process():
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.openai_server", "--port", "0",
                             "--latency", "0.01"], cwd=PROJECT, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:")
        base_url = line.split()[-1]
        b = OpenAIBackend(base_url, model="m", params={}, concurrency=4, backoff_s=0.01, trust_env=False)
        results = run(b, [req(f"p{i}", i) for i in range(10)])
        assert all(r.status == "ok" for r in results.values())
        stats = httpx.get(base_url.removesuffix("/v1") + "/_stub/stats", params={"prompts": 1}, trust_env=False).json()
        assert stats["requests"] == 10 and 1 <= stats["max_in_flight"] <= 4
        assert sorted(stats["prompts"]) == sorted(f"p{i}" for i in range(10))
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
