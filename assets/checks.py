"""Asset checks: guards on each output, evaluated from its manifest on every materialization.

A failed *blocking* check stops what lies downstream: `foundry sync` does not build past it
and says why (an empty curated source must not silently train a model on nothing). The
others warn in the UI and let the pipeline go on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pyarrow.parquet as pq
from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec

from .plan import AssetPlan
from .store import Manifest


@dataclass(frozen=True)
class Check:
    name: str
    kind: str
    blocking: bool
    description: str
    evaluate: Callable[[Manifest], tuple[bool, str]]  # -> (passed, what was seen)


def _documents_kept(m: Manifest) -> tuple[bool, str]:
    kept, docs = m.counts.get("kept", 0), m.counts.get("documents", 0)
    return kept > 0, f"{kept:,} of {docs:,} documents kept"


def _has_tokens(m: Manifest) -> tuple[bool, str]:
    tokens = m.counts.get("tokens", 0)
    return tokens > 0, f"{tokens:,} tokens"


def _no_shortfall(m: Manifest) -> tuple[bool, str]:
    short = [s for s in m.counts.get("shares", []) if s.get("shortfall_tokens", 0) > 0]
    if not short:
        return True, "every source filled its share"
    return False, "; ".join(f"{s['name']} is {s['shortfall_tokens']:,} tokens short at its epoch cap" for s in short)


def _loss_decreased(m: Manifest) -> tuple[bool, str]:
    metrics = m.path / "metrics.parquet"
    if not metrics.is_file():
        return False, "no metrics.parquet in the checkpoint"
    losses = pq.read_table(metrics, columns=["loss"]).column("loss").to_pylist()
    if len(losses) < 2:
        return True, "too few steps to compare"
    head = sum(losses[: max(1, len(losses) // 10)]) / max(1, len(losses) // 10)
    tail = sum(losses[-max(1, len(losses) // 10):]) / max(1, len(losses) // 10)
    return tail < head, f"mean loss {head:.4f} over the first tenth of steps, {tail:.4f} over the last"


CHECKS: list[Check] = [
    Check("documents_kept", "curated", True, "At least one document survived curation.", _documents_kept),
    Check("has_tokens", "tokenized", True, "The tokenized source is not empty.", _has_tokens),
    Check("no_shortfall", "mixture", False, "Every source filled its share within its epoch cap.", _no_shortfall),
    Check("loss_decreased", "checkpoint", False, "Training loss went down from the first steps to the last.",
          _loss_decreased),
]


def checks_for(plan: AssetPlan) -> list[Check]:
    return [c for c in CHECKS if c.kind == plan.kind]


def specs_for(plan: AssetPlan) -> list[AssetCheckSpec]:
    return [AssetCheckSpec(c.name, asset=plan.key, description=c.description, blocking=c.blocking)
            for c in checks_for(plan)]


def evaluate(plan: AssetPlan, manifest: Manifest) -> tuple[list[AssetCheckResult], list[str]]:
    """Check results for the UI, and the names of blocking checks that failed."""
    results, failed_blocking = [], []
    for c in checks_for(plan):
        passed, seen = c.evaluate(manifest)
        severity = AssetCheckSeverity.ERROR if c.blocking else AssetCheckSeverity.WARN
        results.append(AssetCheckResult(check_name=c.name, passed=passed, severity=severity,
                                        metadata={"seen": seen}))
        if c.blocking and not passed:
            failed_blocking.append(f"{c.name} ({seen})")
    return results, failed_blocking
