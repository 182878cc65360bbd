"""Where a run's progress goes: Dagster Pipes when launched by Dagster, JSON lines otherwise.

    with open_reporter() as reporter:
        reporter.log("step 10/200 | loss 3.21")     # human-readable
        reporter.metrics({"step": 10, "loss": 3.21})  # structured, per log step
        reporter.summary({...})                       # once, at the end

Dagster's subprocess client sets DAGSTER_PIPES_CONTEXT; only then is `dagster_pipes` imported,
so the trainer runs (and is tested) without it.
"""

from __future__ import annotations

import json
import os
import sys
from types import TracebackType

PIPES_ENV_VAR = "DAGSTER_PIPES_CONTEXT"


class Reporter:
    """Base class; subclasses override the three report methods and, if needed, close()."""

    def log(self, message: str) -> None:
        raise NotImplementedError

    def metrics(self, record: dict) -> None:
        raise NotImplementedError

    def summary(self, summary: dict) -> None:
        raise NotImplementedError

    def close(self, exc: BaseException | None = None) -> None:
        pass

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close(exc)


class StdoutReporter(Reporter):
    """stdout carries only JSON lines (machine-readable); human-readable lines go to stderr."""

    def __init__(self, out=None, err=None):
        self._out, self._err = out, err

    def _emit(self, payload: dict) -> None:
        print(json.dumps(payload), file=self._out or sys.stdout, flush=True)

    def log(self, message: str) -> None:
        print(message, file=self._err or sys.stderr, flush=True)

    def metrics(self, record: dict) -> None:
        self._emit({"event": "metrics", **record})

    def summary(self, summary: dict) -> None:
        self._emit({"event": "summary", **summary})


class PipesReporter(Reporter):
    """Streams logs and metrics to the orchestrating Dagster process as Pipes messages."""

    def __init__(self):
        from dagster_pipes import open_dagster_pipes  # lazy: only needed under Dagster

        self._pipes = open_dagster_pipes()

    def log(self, message: str) -> None:
        self._pipes.log.info(message)

    def metrics(self, record: dict) -> None:
        self._pipes.report_custom_message({"event": "metrics", **record})

    def summary(self, summary: dict) -> None:
        self._pipes.report_custom_message({"event": "summary", **summary})

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        # PipesContext.__exit__ forwards the exception (if any) to Dagster and closes the channel.
        self._pipes.__exit__(exc_type, exc, tb)

    def close(self, exc: BaseException | None = None) -> None:
        self._pipes.close()


# Written into out_dir when training fails: the one-line cause for the launcher to show.
FAILURE_FILE = "FAILED.txt"


class QuietReporter(Reporter):
    """For ranks other than 0 under torchrun: rank 0 speaks for the job (one Pipes channel, one
    set of JSON lines); errors still surface as exceptions on stderr."""

    def log(self, message: str) -> None:
        pass

    def metrics(self, record: dict) -> None:
        pass

    def summary(self, summary: dict) -> None:
        pass


def open_reporter(rank: int = 0) -> Reporter:
    if rank != 0:
        return QuietReporter()
    return PipesReporter() if os.environ.get(PIPES_ENV_VAR) else StdoutReporter()
