"""What every rephrasing backend consumes and produces.

A backend gets a list of `Request`s and reports each `Result` through a callback the moment
it is known, so the caller can commit it to the request cache at once: a crash loses at most
the requests in flight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Status = Literal["ok", "failed", "empty"]  # empty: the backend answered but produced nothing


@dataclass(frozen=True)
class Request:
    key: str                    # request-cache key: H(model, template version, prompt, sampling params)
    messages: list[dict[str, str]]  # OpenAI chat messages: [{"role": "system"|"user", "content": ...}]
    style: str                  # style name, e.g. "qa"
    source_text: str            # the chunk being rephrased (the extractive backend works from it)


@dataclass
class Result:
    status: Status
    text: str | None = None
    reason: str | None = None   # why it failed, e.g. "http 500 after 4 attempts", "timeout after 3 attempts"
    tokens_in: int = 0
    tokens_out: int = 0
    latency_s: float = 0.0      # wall time of the successful (or last) attempt
    attempts: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


OnResult = Callable[[int, Result], None]  # (index into the request list, its result)


class Backend(Protocol):
    name: str    # "openai", "transformers", "extractive"
    model: str   # model id as recorded in outputs ("extractive-v1" for the heuristic)

    def generate(self, requests: list[Request], on_result: OnResult) -> None:
        """Answer every request, calling on_result exactly once per index (any order, any thread
        of the caller's choosing is NOT allowed: call it from the thread that called generate)."""
        ...
