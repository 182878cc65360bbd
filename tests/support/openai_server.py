"""A real local HTTP server speaking the OpenAI chat completions protocol, for tests and benchmarks.

It runs aiohttp on its own event loop in a background thread, bound to 127.0.0.1 on an
ephemeral port, so it holds any number of slow requests at once.

    with StubOpenAIServer(latency_s=0.05) as server:
        backend = OpenAIBackend(server.base_url, model="stub", ...)
        ...
        server.max_in_flight, server.requests

The reply is deterministic: content = "REPHRASED: " + the last user message, usage counts are
whitespace word counts (prompt: all messages; completion: the content). With `max_tokens` in the
body the content is cut to that many words and finish_reason is "length".

Faults, decided per request, first match wins:
  * `fail_first=k` (with `fail_status=429`, `retry_after=None`): the first k requests the server
    receives get that status (and a `Retry-After` header when set);
  * markers in the last user message:
      FAIL<code>        always answer <code> (e.g. FAIL500, FAIL400, FAIL503)
      FAIL<code>x<n>    answer <code> the first n times this prompt is seen, then normally
      SLOW              sleep `slow_s` (default 10 s) before answering: longer than a client timeout
      MALFORMED         200 with a body that is not JSON
      NOCHOICES         200 with JSON that has no choices
  * `server.script(fn)`: fn(seen, body) is asked first; `seen` is how many times this prompt came
    before (0 on its first request). It returns None (go on with the rules above) or a `Reply`.

Every request is recorded (`server.requests`: body, time, Authorization header). `in_flight` and
`max_in_flight` count chat requests being handled at once.

From another process:

    python -m tests.support.openai_server --port 0 --latency 0.05

prints "listening on http://127.0.0.1:PORT/v1" (flushed) and serves until SIGINT/SIGTERM.
`GET /_stub/stats` answers {"requests": n, "max_in_flight": m, "in_flight": k} (add ?prompts=1
for the list of last user messages, in arrival order); `POST /_stub/reset` zeroes the counters.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

_FAIL = re.compile(r"FAIL(\d{3})(?:x(\d+))?")


@dataclass
class Reply:
    """A scripted answer. `body`: dict (sent as JSON), str/bytes (sent as is), or None (empty)."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass
class RecordedRequest:
    body: Any                     # parsed JSON (or the raw text when it is not JSON)
    time: float                   # time.time() on arrival
    authorization: str | None     # the Authorization header as received
    path: str
    prompt: str                   # the last user message ("" when none)


Script = Callable[[int, Any], "Reply | None"]


def _last_user(body: Any) -> str:
    if not isinstance(body, dict):
        return ""
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else ""
    return ""


def _words(text: Any) -> int:
    return len(text.split()) if isinstance(text, str) else 0


class StubOpenAIServer:
    def __init__(
        self,
        latency_s: float = 0.0,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        slow_s: float = 10.0,
        fail_first: int = 0,
        fail_status: int = 429,
        retry_after: float | None = None,
        record: bool = True,
    ) -> None:
        self.latency_s = latency_s
        self.host = host
        self.port = port
        self.slow_s = slow_s
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.retry_after = retry_after
        self.record = record
        self._script: Script | None = None
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._seen: Counter[str] = Counter()
        self._received = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # -- control -----------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def received(self) -> int:
        """Chat requests received so far (also counted with record=False)."""
        with self._lock:
            return self._received

    def prompts(self) -> list[str]:
        return [r.prompt for r in self.requests]

    def script(self, fn: Script | None) -> None:
        self._script = fn

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()
            self._seen.clear()
            self._received = 0
            self.max_in_flight = self.in_flight

    def start(self) -> StubOpenAIServer:
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._thread = threading.Thread(target=self._serve, name="stub-openai-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=10):
            raise RuntimeError("stub OpenAI server did not start within 10 s")
        if self._error is not None:
            raise RuntimeError(f"stub OpenAI server failed to start: {self._error}") from self._error
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> StubOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- server thread -----------------------------------------------------------------------

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        runner: web.AppRunner | None = None
        try:
            self._stop = asyncio.Event()
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self._chat)
            app.router.add_get("/v1/models", self._models)
            app.router.add_get("/_stub/stats", self._stats)
            app.router.add_post("/_stub/reset", self._reset)
            # handler_cancellation: a client that gives up (timeout) frees its handler at once
            runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
            loop.run_until_complete(runner.setup())
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            self.port = sock.getsockname()[1]
            site = web.SockSite(runner, sock, backlog=1024)
            loop.run_until_complete(site.start())
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._ready.set()
            if runner is not None:
                loop.run_until_complete(runner.cleanup())
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_until_complete(self._stop.wait())
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.close()

    def _decide(self, n: int, seen: int, body: Any, prompt: str) -> Reply | None:
        if self._script is not None:
            reply = self._script(seen, body)
            if reply is not None:
                return reply
        if n < self.fail_first:
            headers = {"Retry-After": f"{self.retry_after:g}"} if self.retry_after is not None else {}
            return Reply(self.fail_status, {"error": {"message": "scripted failure"}}, headers)
        m = _FAIL.search(prompt)
        if m and (m.group(2) is None or seen < int(m.group(2))):
            status = int(m.group(1))
            return Reply(status, {"error": {"message": f"scripted {status}", "type": "stub"}})
        if "SLOW" in prompt:
            return Reply(delay_s=self.slow_s, body=self._completion(body, prompt))
        if "MALFORMED" in prompt:
            return Reply(200, "this is <not> json {", {"Content-Type": "application/json"})
        if "NOCHOICES" in prompt:
            return Reply(200, {"id": "chatcmpl-stub", "object": "chat.completion", "choices": []})
        return None

    def _completion(self, body: Any, prompt: str) -> dict[str, Any]:
        words = f"REPHRASED: {prompt}".split(" ")
        finish = "stop"
        max_tokens = body.get("max_tokens") if isinstance(body, dict) else None
        if isinstance(max_tokens, int) and 0 < max_tokens < len(words):
            words, finish = words[:max_tokens], "length"
        content = " ".join(words)
        messages = body.get("messages") if isinstance(body, dict) else None
        prompt_tokens = sum(_words(m.get("content")) for m in messages or [] if isinstance(m, dict))
        return {
            "id": "chatcmpl-stub",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "stub") if isinstance(body, dict) else "stub",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": _words(content),
                      "total_tokens": prompt_tokens + _words(content)},
        }

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            raw = await request.text()
            try:
                body: Any = json.loads(raw)
            except ValueError:
                body = raw
            prompt = _last_user(body)
            with self._lock:
                n = self._received
                self._received += 1
                seen = self._seen[prompt]
                self._seen[prompt] += 1
                if self.record:
                    self._requests.append(RecordedRequest(body, time.time(), request.headers.get("Authorization"),
                                                          request.path, prompt))
            if not isinstance(body, dict):
                return web.json_response({"error": {"message": "body is not a JSON object"}}, status=400)
            reply = self._decide(n, seen, body, prompt)
            if reply is None:
                reply = Reply(body=self._completion(body, prompt))
            delay = self.latency_s + reply.delay_s
            if delay > 0:
                await asyncio.sleep(delay)
            if isinstance(reply.body, dict | list):
                return web.json_response(reply.body, status=reply.status, headers=reply.headers)
            data = reply.body.encode() if isinstance(reply.body, str) else (reply.body or b"")
            headers = {"Content-Type": "text/plain", **reply.headers}
            return web.Response(body=data, status=reply.status, headers=headers)
        finally:
            with self._lock:
                self.in_flight -= 1

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "stub", "object": "model"}]})

    async def _stats(self, request: web.Request) -> web.Response:
        with self._lock:
            stats: dict[str, Any] = {"requests": self._received, "max_in_flight": self.max_in_flight,
                                     "in_flight": self.in_flight}
            if request.query.get("prompts"):
                stats["prompts"] = [r.prompt for r in self._requests]
        return web.json_response(stats)

    async def _reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the stub OpenAI chat completions API until killed.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: an ephemeral port (printed)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds every reply waits")
    parser.add_argument("--slow", type=float, default=10.0, help="extra seconds for prompts containing SLOW")
    parser.add_argument("--fail-first", type=int, default=0, help="the first K requests get --fail-status")
    parser.add_argument("--fail-status", type=int, default=429)
    parser.add_argument("--retry-after", type=float, default=None)
    parser.add_argument("--no-record", action="store_true", help="keep no per-request records (long runs)")
    args = parser.parse_args(argv)

    server = StubOpenAIServer(args.latency, host=args.host, port=args.port, slow_s=args.slow,
                              fail_first=args.fail_first, fail_status=args.fail_status,
                              retry_after=args.retry_after, record=not args.no_record)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with server:
        print(f"listening on {server.base_url}", flush=True)
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
