"""Rephrase documents: chunk, look up the request cache, ask the backend for the rest, assemble.

One output document per (source document, style): the style's answers for the document's
chunks, joined in order. One stats row per (source document, style) with its status; a
document whose chunk failed is recorded as failed with the chunk's reason, never dropped
silently. Identical requests (the same chunk in two documents) are asked once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .cache import RequestCache, request_key
from .chunks import split_chunks
from .styles import Style
from .types import Backend, Request, Result

Log = Callable[[str], None]


@dataclass
class Job:
    source_id: str
    style: Style
    keys: list[str] = field(default_factory=list)  # one request key per chunk, in order


class Progress:
    """Requests done / total with rate and ETA, logged at most every `every_s` seconds."""

    def __init__(self, total: int, log: Log | None, label: str, every_s: float = 10.0):
        self.total, self.log, self.label, self.every_s = total, log, label, every_s
        self.done = 0
        self.start = self.last = time.perf_counter()

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.log and (now - self.last >= self.every_s or self.done == self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            self.log(f"{self.label}: {self.done:,}/{self.total:,} requests ({rate:.1f}/s, ETA {eta:.0f} s)")


def plan_jobs(docs: list[dict], styles: list[Style], backend: Backend, params: dict[str, Any],
              max_chunk_chars: int) -> tuple[list[Job], dict[str, Request]]:
    jobs: list[Job] = []
    requests: dict[str, Request] = {}
    for doc in docs:
        chunks = split_chunks(doc["text"], max_chunk_chars)
        for style in styles:
            job = Job(doc["id"], style)
            for chunk in chunks:
                messages = style.messages(chunk)
                key = request_key(backend.name, backend.model, style.identity(), messages, params)
                requests.setdefault(key, Request(key=key, messages=messages, style=style.name, source_text=chunk))
                job.keys.append(key)
            jobs.append(job)
    return jobs, requests


def rephrase_documents(docs: list[dict], styles: list[Style], backend: Backend, cache: RequestCache,
                       params: dict[str, Any], max_chunk_chars: int, log: Log | None = None,
                       label: str = "rephrase") -> tuple[list[dict], list[dict], dict[str, int]]:
    """(output documents, stats rows, request counts)."""
    jobs, requests = plan_jobs(docs, styles, backend, params, max_chunk_chars)
    results: dict[str, Result] = cache.get_many(list(requests))
    pending = [req for key, req in requests.items() if key not in results]
    counts = {"requests": len(requests), "cached": len(results), "requested": len(pending)}
    if log:
        log(f"{label}: {len(jobs):,} document-style pairs, {len(requests):,} distinct requests, "
            f"{len(results):,} in the request cache, {len(pending):,} to ask {backend.name}:{backend.model}")
    progress = Progress(len(pending), log, label)

    def on_result(i: int, result: Result) -> None:
        key = pending[i].key
        if key in results:
            raise RuntimeError(f"{backend.name} backend reported request {i} twice")
        results[key] = result
        cache.put(key, result)  # committed now: a crash after this point does not lose it
        progress.step()

    if pending:
        backend.generate(pending, on_result)
    unanswered = [r.key for r in pending if r.key not in results]
    if unanswered:
        raise RuntimeError(f"{backend.name} backend left {len(unanswered)} request(s) unanswered")
    outputs, rows = assemble(jobs, results, backend)
    counts["failed_requests"] = sum(1 for r in pending if results[r.key].status == "failed")
    return outputs, rows, counts


def assemble(jobs: list[Job], results: dict[str, Result], backend: Backend) -> tuple[list[dict], list[dict]]:
    outputs, rows = [], []
    for job in jobs:
        parts = [results[k] for k in job.keys]
        failed = [(n, r) for n, r in enumerate(parts) if r.status == "failed"]
        texts = [r.text for r in parts if r.status == "ok" and r.text]
        if not parts:
            status, reason = "empty", "document has no text"
        elif failed:
            status = "failed"
            reason = "; ".join(f"chunk {n + 1}/{len(parts)}: {r.reason}" for n, r in failed[:3])
            if len(failed) > 3:
                reason += f"; {len(failed) - 3} more chunks failed"
        elif not texts:
            status, reason = "empty", parts[0].reason or "the backend returned no text"
        else:
            status, reason = "ok", None
        rows.append({
            "source_id": job.source_id, "style": job.style.name, "status": status, "reason": reason,
            "chunks": len(parts), "tokens_in": sum(r.tokens_in for r in parts),
            "tokens_out": sum(r.tokens_out for r in parts), "latency_s": sum(r.latency_s for r in parts),
            "attempts": sum(r.attempts for r in parts),
            "cached_chunks": sum(1 for r in parts if r.extra.get("cached")),
        })
        if status == "ok":
            outputs.append({
                "id": f"{job.source_id}/{job.style.name}", "source_id": job.source_id, "style": job.style.name,
                "text": "\n\n".join(texts), "backend": backend.name, "model": backend.model,
                "template_version": job.style.version,
            })
    return outputs, rows
