"""Progress of long steps: rate and ETA, the throttle, and curation's per-task counters."""

from __future__ import annotations

import json

import pytest

from dataprep.curate import ProgressCounter, read_progress, watch_progress
from dataprep.progress import Progress, describe, progress_interval


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr("dataprep.progress.time.monotonic", c)
    return c


def test_rate_eta_and_throttle(clock):
    seen = []
    meter = Progress("tokenizing", total=1000, report=seen.append, every=5.0)
    clock.now += 2
    meter.update(100)  # too soon: nothing reported
    assert seen == []
    clock.now += 3
    meter.update(250)
    (record,) = seen
    assert record["event"] == "progress" and record["rate"] == 50.0 and record["fraction"] == 0.25
    assert record["eta_s"] == 15.0  # 5 s for a quarter: 15 s for the rest
    assert describe(record) == "tokenizing: 250/1,000 documents (25%) | 50.0 documents/s | ETA 15s"
    clock.now += 15
    meter.update(1000)
    done = meter.finish()
    assert done["event"] == "done" and done["eta_s"] == 0.0 and done["rate"] == 50.0
    assert describe(done) == "tokenizing: done, 1,000 documents in 20.0s (50.0 documents/s)"
    assert len(seen) == 3


def test_unknown_total_uses_the_share_of_tasks_done_and_says_when_it_cannot(clock):
    seen = []
    meter = Progress("curating", report=seen.append, every=0.0)
    clock.now += 1
    meter.update(0)  # nothing done yet: nothing to say
    assert seen == []
    clock.now += 1
    meter.update(40)
    assert describe(seen[-1]) == "curating: 40 documents | 20.0 documents/s | ETA ?"
    clock.now += 2
    meter.update(80, fraction=0.5)
    assert seen[-1]["eta_s"] == 4.0 and describe(seen[-1]).endswith("(50%) | 20.0 documents/s | ETA 4s")


def test_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("FOUNDRY_PROGRESS_EVERY_S", "2.5")
    assert progress_interval() == 2.5
    monkeypatch.setenv("FOUNDRY_PROGRESS_EVERY_S", "soon")
    with pytest.raises(ValueError, match="FOUNDRY_PROGRESS_EVERY_S"):
        progress_interval()


def test_curation_counters_are_summed_across_tasks(tmp_path):
    counts = tmp_path / "progress"
    step = ProgressCounter(str(counts), every=0.0)
    docs = list(step.run(iter(["a", "b", "c"]), rank=0))  # passes documents through unchanged
    assert docs == ["a", "b", "c"]
    (counts / "00001.json").write_text(json.dumps({"documents": 5, "finished": False}))
    assert read_progress(counts, tasks=4) == (8, 0.25)
    seen = []
    with watch_progress(Progress("curating", report=seen.append), counts, tasks=2, poll_s=0.01):
        pass
    assert seen[-1]["event"] == "done" and seen[-1]["done"] == 8 and seen[-1]["fraction"] == 0.5
