"""Progress of a long step: how many documents so far, the rate, and the time left.

    meter = Progress("tokenizing", total=5000, report=print_it)
    meter.update(1200)   # reports at most every `every` seconds
    meter.finish()       # always reports once more, with the totals

No Dagster here: the caller's `report(record)` decides where a record goes (the assets side
sends it to the Dagster run log, hence the terminal, and to the build's JSON-lines log).
FOUNDRY_PROGRESS_EVERY_S sets the interval (default 10 s; an execution knob, in no hash).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

Record = dict[str, Any]


def progress_interval() -> float:
    raw = os.environ.get("FOUNDRY_PROGRESS_EVERY_S", "10")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"FOUNDRY_PROGRESS_EVERY_S must be a number of seconds, not {raw!r}") from None
    return max(value, 0.0)


class Progress:
    """Counts units of work; `report` gets a record dict (see `record`). Thread-safe."""

    def __init__(self, what: str, total: int | None = None, report: Callable[[Record], None] | None = None,
                 unit: str = "documents", every: float | None = None):
        self.what, self.total, self.unit = what, total, unit
        self.report = report
        self.every = progress_interval() if every is None else every
        self.done = 0
        self.fraction: float | None = None  # share of the work done, when known other than by done/total
        self.started = time.monotonic()
        self._last = self.started
        self._lock = threading.Lock()
        self._finished = False

    def update(self, done: int, fraction: float | None = None) -> None:
        """Set the absolute count (and, optionally, the share of work done, e.g. tasks finished)."""
        with self._lock:
            self.done = done
            if fraction is not None:
                self.fraction = fraction
            now = time.monotonic()
            # nothing to say before the first document is done (imports, a pool starting)
            due = now - self._last >= self.every and not self._finished and done > 0
            if due:
                self._last = now
        if due:
            self._emit(self.record("progress"))

    def advance(self, n: int = 1) -> None:
        self.update(self.done + n)

    def finish(self) -> Record:
        with self._lock:
            self._finished = True
        record = self.record("done")
        self._emit(record)
        return record

    def record(self, event: str) -> Record:
        seconds = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / seconds
        share = self.fraction
        if share is None and self.total:
            share = min(self.done / self.total, 1.0)
        eta = None
        if event == "done":
            eta = 0.0
        elif share is not None and share > 0:
            eta = seconds * (1 - share) / share
        return {"event": event, "what": self.what, "unit": self.unit, "done": self.done, "total": self.total,
                "seconds": round(seconds, 3), "rate": round(rate, 3), "eta_s": None if eta is None else round(eta, 1),
                "fraction": None if share is None else round(share, 4)}

    def _emit(self, record: Record) -> None:
        if self.report is not None:
            self.report(record)


def describe(record: Record) -> str:
    """One line for people: `tokenizing: 1,200/5,000 documents (24%) | 310.5 documents/s | ETA 12s`."""
    unit = record["unit"]
    if record["event"] == "done":
        return (f"{record['what']}: done, {record['done']:,} {unit} in {record['seconds']:.1f}s "
                f"({record['rate']:,.1f} {unit}/s)")
    count = f"{record['done']:,}" + (f"/{record['total']:,}" if record.get("total") else "")
    share = f" ({100 * record['fraction']:.0f}%)" if record.get("fraction") is not None else ""
    eta = "ETA ?" if record.get("eta_s") is None else f"ETA {format_duration(record['eta_s'])}"
    return f"{record['what']}: {count} {unit}{share} | {record['rate']:,.1f} {unit}/s | {eta}"


def format_duration(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
