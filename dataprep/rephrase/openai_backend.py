"""Rephrasing through any OpenAI-compatible chat completions endpoint (vLLM, SGLang, TGI, OpenAI).

`OpenAIBackend.generate` runs an asyncio loop in the calling thread, keeps at most `concurrency`
requests in flight (an asyncio.Semaphore) and reports each result through `on_result` (from the
calling thread) the moment it is known. The HTTP side is httpx: the `concurrency` connection slots
are spread over a few `httpx.AsyncClient`s of `connections_per_client` (8) keep-alive connections
each, because one pool of 32+ connections costs httpcore more CPU per request than the rest of
the client together (see `_run`).

Retry policy, per request:
  * retried: HTTP 429 and 5xx, timeouts (the whole attempt is bounded by `timeout_s`), connection
    errors (refused, reset, closed mid-response);
  * not retried: any other 4xx ("http 400: <start of body>"), a 200 whose body is not JSON or has
    no string `choices[0].message.content` ("malformed response: ...");
  * between attempts: exponential backoff with full jitter, `uniform(0, min(cap, backoff_s * 2**k))`;
    on 429/503 a `Retry-After: <seconds>` header is honoured instead (also capped).
When the retries are spent the request is recorded as failed: "http 500 after 4 attempts",
"timeout after 3 attempts", "connection error after 3 attempts (ConnectError)".

The API key only ever travels in the `Authorization` header: it is kept out of `repr`, of every
`Result` and of every reason string (any accidental echo of it is redacted).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from dataprep.rephrase.types import OnResult, Request, Result

Progress = Callable[[int, int], None]  # (done, total)

_BODY_SNIPPET = 200


@dataclass
class OpenAIStats:
    """Counters of the last `generate` call (reset at its start)."""

    requests: int = 0       # requests handed to generate
    attempts: int = 0       # HTTP requests sent (first attempts + retries)
    retries: int = 0        # attempts after the first one
    ok: int = 0
    failed: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    wall_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Retryable(Exception):
    """An attempt failed in a way worth retrying; `kind` is how the final reason describes it."""

    def __init__(self, kind: str, retry_after: float | None = None) -> None:
        super().__init__(kind)
        self.kind = kind
        self.retry_after = retry_after


class OpenAIBackend:
    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        params: dict[str, Any] | None = None,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout_s: float = 120.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        *,
        max_backoff_s: float = 30.0,
        seed: int | None = None,
        progress: Progress | None = None,
        trust_env: bool = True,
        connections_per_client: int = 8,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        params = dict(params or {})
        if params.get("stream"):
            raise ValueError("streaming responses are not supported: drop 'stream' from params")
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model
        self.params = params
        self._api_key = api_key or None
        self.concurrency = int(concurrency)
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.progress = progress
        self.trust_env = trust_env
        self.connections_per_client = max(1, min(int(connections_per_client), self.concurrency))
        self._rng = random.Random(seed)
        self.stats = OpenAIStats()

    def __repr__(self) -> str:  # no api key in here, ever
        return (f"OpenAIBackend(url={self.url!r}, model={self.model!r}, concurrency={self.concurrency}, "
                f"timeout_s={self.timeout_s}, max_retries={self.max_retries}, "
                f"api_key={'set' if self._api_key else 'unset'})")

    # -- public ------------------------------------------------------------------------------

    def generate(self, requests: list[Request], on_result: OnResult) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("OpenAIBackend.generate runs its own event loop: call it from a thread "
                               "without a running asyncio loop")
        self.stats = OpenAIStats(requests=len(requests))
        if not requests:
            return
        t0 = time.perf_counter()
        try:
            asyncio.run(self._run(requests, on_result))
        finally:
            self.stats.wall_s = time.perf_counter() - t0

    # -- internals ---------------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        if self._api_key and self._api_key in text:
            text = text.replace(self._api_key, "***")
        return text

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _body(self, request: Request) -> bytes:
        body = {**self.params, "model": self.model, "messages": request.messages}
        return json.dumps(body, ensure_ascii=False).encode("utf-8")

    def _delay(self, retry_number: int, retry_after: float | None) -> float:
        """Seconds to wait before retry `retry_number` (1 for the first retry)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_backoff_s)
        ceiling = min(self.max_backoff_s, self.backoff_s * (2 ** (retry_number - 1)))
        return self._rng.uniform(0.0, ceiling)

    async def _run(self, requests: list[Request], on_result: OnResult) -> None:
        total = len(requests)
        sem = asyncio.Semaphore(self.concurrency)
        # httpcore's pool does O(connections x waiting requests) bookkeeping on every request and
        # response, which dominated the client's CPU at 32+ connections (encode/httpcore#1035).
        # So the `concurrency` slots are spread over small clients of `connections_per_client`
        # connections each (one SSL context shared by all): slot s always uses client
        # s // connections_per_client, so no client ever has more requests than connections.
        per_client = self.connections_per_client
        n_clients = -(-self.concurrency // per_client)
        limits = httpx.Limits(max_connections=per_client, max_keepalive_connections=per_client)
        # httpx's own timeouts back up the per-attempt wall clock enforced with asyncio.timeout
        timeout = httpx.Timeout(self.timeout_s, pool=None)
        ssl_context = httpx.create_ssl_context(trust_env=self.trust_env)
        free_slots = list(range(self.concurrency))
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(
                httpx.AsyncClient(limits=limits, timeout=timeout, headers=self._headers(), verify=ssl_context,
                                  trust_env=self.trust_env)) for _ in range(n_clients)]

            todo: Iterator[tuple[int, Request]] = iter(enumerate(requests))
            # A bounded window of tasks: the semaphore caps the attempts in flight, the window
            # lets a request sleeping in backoff leave its slot to another one without creating
            # a task per request up front.
            window = self.concurrency * 2
            pending: set[asyncio.Task[tuple[int, Result]]] = set()

            def refill() -> None:
                while len(pending) < window:
                    nxt = next(todo, None)
                    if nxt is None:
                        return
                    i, req = nxt
                    pending.add(asyncio.create_task(self._one(clients, free_slots, sem, i, req)))

            done = 0
            refill()
            try:
                while pending:
                    finished, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for task in finished:
                        pending.discard(task)
                        i, result = task.result()
                        if result.status == "ok":
                            self.stats.ok += 1
                            self.stats.tokens_in += result.tokens_in
                            self.stats.tokens_out += result.tokens_out
                        else:
                            self.stats.failed += 1
                        on_result(i, result)
                        done += 1
                        if self.progress is not None:
                            self.progress(done, total)
                    refill()
            finally:
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.gather(*pending, return_exceptions=True)

    async def _one(self, clients: list[httpx.AsyncClient], free_slots: list[int], sem: asyncio.Semaphore,
                   i: int, request: Request) -> tuple[int, Result]:
        body = self._body(request)
        attempts = 0
        while True:
            attempts += 1
            async with sem:
                slot = free_slots.pop()  # holding the semaphore guarantees a free slot
                try:
                    self.stats.attempts += 1
                    if attempts > 1:
                        self.stats.retries += 1
                    t0 = time.perf_counter()
                    try:
                        result = await self._attempt(clients[slot // self.connections_per_client], body)
                    except _Retryable as exc:
                        latency = time.perf_counter() - t0
                        if attempts > self.max_retries:
                            return i, Result(status="failed", reason=f"{exc.kind} after {attempts} attempt{'s' if attempts > 1 else ''}",
                                             latency_s=latency, attempts=attempts)
                        retry_after = exc.retry_after
                    else:
                        result.latency_s = time.perf_counter() - t0
                        result.attempts = attempts
                        return i, result
                finally:
                    free_slots.append(slot)
            # back off outside the semaphore: a sleeping request holds no slot
            await asyncio.sleep(self._delay(attempts, retry_after))

    async def _attempt(self, client: httpx.AsyncClient, body: bytes) -> Result:
        """One HTTP round trip: a final Result, or _Retryable."""
        try:
            async with asyncio.timeout(self.timeout_s):
                response = await client.post(self.url, content=body)
        except (TimeoutError, httpx.TimeoutException):
            raise _Retryable("timeout") from None
        except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            raise _Retryable(f"connection error ({type(exc).__name__})") from None
        except httpx.HTTPError as exc:  # bad URL, unsupported protocol...: retrying cannot help
            return Result(status="failed", reason=self._redact(f"request error: {type(exc).__name__}: {exc}"))

        code = response.status_code
        if code == 429 or code >= 500:
            retry_after = None
            if code in (429, 503):
                retry_after = _parse_retry_after(response.headers.get("retry-after"))
            raise _Retryable(f"http {code}", retry_after)
        if not 200 <= code < 300:
            snippet = response.text[:_BODY_SNIPPET]
            return Result(status="failed", reason=self._redact(f"http {code}: {snippet}"))
        return self._parse(response)

    def _parse(self, response: httpx.Response) -> Result:
        try:
            data = response.json()
        except ValueError:
            snippet = response.text[:_BODY_SNIPPET]
            return Result(status="failed", reason=self._redact(f"malformed response: not JSON: {snippet!r}"))
        try:
            choice = data["choices"][0]
            content = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            content, choice = None, None
        if not isinstance(content, str):
            snippet = json.dumps(data, ensure_ascii=False)[:_BODY_SNIPPET]
            return Result(status="failed",
                          reason=self._redact(f"malformed response: no string choices[0].message.content: {snippet}"))
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        extra: dict[str, Any] = {}
        if choice.get("finish_reason") == "length":
            extra["finish_reason"] = "length"
        return Result(status="ok", text=content, tokens_in=_as_int(usage.get("prompt_tokens")),
                      tokens_out=_as_int(usage.get("completion_tokens")), extra=extra)


def _parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` in seconds; the HTTP-date form (and garbage) falls back to the backoff."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def _as_int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
