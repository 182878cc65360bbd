"""Asset checks: guards on each output, evaluated from its manifest on every materialization.

A failed *blocking* check stops what lies downstream: `foundry sync` does not build past it
and says why (an empty curated source must not silently train a model on nothing). The
others warn in the UI and let the pipeline go on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyarrow.compute as pc
import pyarrow.parquet as pq
from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec

from .plan import AssetPlan
from .recipe import CurationSpec, RephraseSpec
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


def _kept_decisions(m: Manifest, columns: list[str]):
    table = pq.read_table(m.path / "decisions.parquet", columns=["kept", *columns])
    return table.filter(table["kept"])


def _keep_rate_within(low: float, high: float) -> Callable[[Manifest], tuple[bool, str]]:
    def evaluate(m: Manifest) -> tuple[bool, str]:
        docs = m.counts.get("documents", 0)
        rate = m.counts.get("kept", 0) / docs if docs else 0.0
        return low <= rate <= high, f"keep rate {rate:.3f} (bounds {low:g} to {high:g})"

    return evaluate


def _no_empty_documents(m: Manifest) -> tuple[bool, str]:
    kept = _kept_decisions(m, ["chars", "words"])
    empty = pc.sum(pc.or_(pc.equal(kept["chars"], 0), pc.equal(kept["words"], 0)).cast("int64")).as_py() or 0
    return empty == 0, f"{empty:,} kept documents without text"


def _unique_ids(m: Manifest) -> tuple[bool, str]:
    ids = _kept_decisions(m, ["doc_id"])["doc_id"]
    repeated = len(ids) - len(pc.unique(ids))
    return repeated == 0, f"{repeated:,} kept documents repeat an earlier id"


def _language_share(languages: set[str], floor: float) -> Callable[[Manifest], tuple[bool, str]]:
    def evaluate(m: Manifest) -> tuple[bool, str]:
        kept = _kept_decisions(m, ["language"])["language"].to_pylist()
        if not kept:
            return False, "no kept documents"
        share = sum(1 for lang in kept if lang in languages) / len(kept)
        return share >= floor, f"{share:.3f} of kept documents in {', '.join(sorted(languages))} (floor {floor:g})"

    return evaluate


def curated_checks(curation: CurationSpec) -> list[Check]:
    """The recipe's checks on a curated source (bounds and blocking come from the recipe)."""
    cfg = curation.checks
    out = [Check("documents_kept", "curated", True, "At least one document survived curation.", _documents_kept)]
    if cfg.keep_rate is not None:
        out.append(Check("keep_rate", "curated", cfg.keep_rate.blocking,
                         f"Share of documents kept is within {cfg.keep_rate.min:g} to {cfg.keep_rate.max:g}.",
                         _keep_rate_within(cfg.keep_rate.min, cfg.keep_rate.max)))
    if cfg.no_empty_documents is not None:
        out.append(Check("no_empty_documents", "curated", cfg.no_empty_documents.blocking,
                         "No kept document is empty.", _no_empty_documents))
    if cfg.unique_ids is not None:
        out.append(Check("unique_ids", "curated", cfg.unique_ids.blocking,
                         "Kept documents have unique ids.", _unique_ids))
    lang = curation.language
    if cfg.language_share is not None and lang is not None and lang.languages:
        out.append(Check("language_share", "curated", cfg.language_share.blocking,
                         f"At least {cfg.language_share.min:g} of kept documents are in {', '.join(lang.languages)}.",
                         _language_share(set(lang.languages), cfg.language_share.min)))
    return out


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
    Check("has_tokens", "tokenized", True, "The tokenized source is not empty.", _has_tokens),
    Check("no_shortfall", "mixture", False, "Every source filled its share within its epoch cap.", _no_shortfall),
    Check("loss_decreased", "checkpoint", False, "Training loss went down from the first steps to the last.",
          _loss_decreased),
]


def _share_at_most(part: str, whole: str, what: str, ceiling: float) -> Callable[[Manifest], tuple[bool, str]]:
    """counts[part] / counts[whole] <= ceiling (an empty output passes: other checks catch it)."""

    def evaluate(m: Manifest) -> tuple[bool, str]:
        total, n = m.counts.get(whole, 0), m.counts.get(part, 0)
        share = n / total if total else 0.0
        return share <= ceiling, f"{n:,} of {total:,} {what} ({share:.3f}, ceiling {ceiling:g})"

    return evaluate


def _rephrased_documents(m: Manifest) -> tuple[bool, str]:
    docs = m.counts.get("documents", 0)
    return docs > 0, f"{docs:,} rephrased documents"


def rephrased_checks(spec: RephraseSpec) -> list[Check]:
    cfg = spec.checks
    return [
        Check("has_documents", "rephrased", True, "At least one document was rephrased.", _rephrased_documents),
        Check("failed_share", "rephrased", cfg.blocking,
              f"At most {cfg.max_failed_share:g} of document-styles failed (reasons in the rephrase table).",
              _share_at_most("failed", "pairs", "document-styles failed", cfg.max_failed_share)),
    ]


def checks_for(plan: AssetPlan) -> list[Check]:
    if plan.kind == "contamination":
        spec = plan.context["contamination"]
        return [Check("contaminated_share", "contamination", spec.blocking,
                      f"At most {spec.max_share:g} of eval items overlap the training corpora.",
                      _share_at_most("contaminated", "items", "eval items share an n-gram with training data",
                                     spec.max_share))]
    if plan.kind == "curated":
        return curated_checks(plan.context["source"].curation)
    if plan.kind == "rephrased":
        return rephrased_checks(plan.context["rephrase"])
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
