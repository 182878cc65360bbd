"""Structured log of each build: JSON lines in `<store>/logs/<kind>/<key>.jsonl`.

One line per event — `wait` (another process holds the key), `start`, `progress` (documents,
rate, ETA), `end` (seconds, bytes, counts) or `error` — each with the time, asset, store key,
Dagster run id and pid. Every attempt at a key appends to the same file, so a build killed
half way shows as a `start` with no `end` before the attempt that finished.

The log is a by-product: if it cannot be written (say the store is unwritable), the build's own
error is the one to see, so a failed write turns the log off instead of raising.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any


def build_log_path(store_root: Path, kind: str, key: str) -> Path:
    return store_root / "logs" / kind / f"{key}.jsonl"


class BuildLog:
    def __init__(self, path: Path, **base: Any):
        self.path = path
        self.base = base
        self.enabled = True

    def write(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        now = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        line = json.dumps({"time": now, "event": event, **self.base, "pid": os.getpid(), **fields},
                          default=str) + "\n"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # one write() on an O_APPEND descriptor: lines of concurrent writers never interleave
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        except OSError:
            self.enabled = False


def scalar_counts(counts: dict[str, Any]) -> dict[str, Any]:
    """The plain numbers and strings of a manifest's counts (tables and dicts stay in the manifest)."""
    return {k: v for k, v in counts.items() if isinstance(v, (int, float, str, bool)) or v is None}
