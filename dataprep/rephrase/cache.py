"""The request cache: finished generations by request key, in one SQLite file.

    key = H(backend, model, style name + version + digest, prompt messages, sampling params)

Each result is committed the moment it arrives (WAL mode, one short transaction), so a
killed materialization loses only the requests that were in flight and a rerun asks the
model for nothing it already answered. Failures are not cached: a rerun retries them.
Several processes may share the file (SQLite's locking; a busy timeout rides out a
concurrent commit).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from .types import Result

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key        TEXT PRIMARY KEY,
    text       TEXT NOT NULL,
    tokens_in  INTEGER NOT NULL,
    tokens_out INTEGER NOT NULL,
    latency_s  REAL NOT NULL,
    attempts   INTEGER NOT NULL,
    extra      TEXT NOT NULL,
    created    REAL NOT NULL
)
"""


def request_key(backend: str, model: str, style: dict[str, Any], messages: list[dict[str, str]],
                params: dict[str, Any]) -> str:
    payload = {"backend": backend, "model": model, "style": style, "messages": messages, "params": params}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class RequestCache:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._con = sqlite3.connect(str(path), timeout=60, isolation_level=None)
        self._con.execute("PRAGMA journal_mode=WAL")
        self._con.execute("PRAGMA synchronous=NORMAL")
        self._con.execute(SCHEMA)

    def get_many(self, keys: list[str]) -> dict[str, Result]:
        found: dict[str, Result] = {}
        for start in range(0, len(keys), 500):
            batch = keys[start:start + 500]
            rows = self._con.execute(
                f"SELECT key, text, tokens_in, tokens_out, latency_s, attempts, extra FROM responses "
                f"WHERE key IN ({','.join('?' * len(batch))})", batch).fetchall()
            for key, text, t_in, t_out, latency, attempts, extra in rows:
                found[key] = Result(status="ok", text=text, tokens_in=t_in, tokens_out=t_out, latency_s=latency,
                                    attempts=attempts, extra={**json.loads(extra), "cached": True})
        return found

    def put(self, key: str, result: Result) -> None:
        if result.status != "ok" or result.text is None:
            return
        extra = {k: v for k, v in result.extra.items() if k != "cached"}
        self._con.execute(
            "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (key, result.text, result.tokens_in, result.tokens_out, result.latency_s, result.attempts,
             json.dumps(extra, sort_keys=True), time.time()),
        )

    def __len__(self) -> int:
        return self._con.execute("SELECT count(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> RequestCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
