"""The one body every Foundry asset runs: look up the store key, build on a miss, report.

    key = store_key(code_version, data versions of the inputs)
    hit  -> nothing is computed; the materialization is still recorded with cache: hit
    miss -> claim the key (a concurrent sync building it makes this one wait, then hit), and
            the builder fills a temp dir that the store publishes atomically

Each build writes its events (start, progress, end or error) as JSON lines beside its run
logs (`build_log`); progress also goes to the Dagster run log, which the terminal shows.

The DataVersion reported to Dagster derives from the output files, so an identical rebuild
leaves everything downstream fresh.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagster import AssetExecutionContext, DataVersion, MaterializeResult, MetadataValue

from dataprep.progress import Progress, Record, describe

from . import checks, lineage
from .build_log import BuildLog, build_log_path, scalar_counts
from .identity import store_key
from .plan import AssetPlan
from .resources import FoundryResource
from .store import Manifest


class UpstreamMissing(RuntimeError):
    pass


@dataclass
class Upstream:
    record: lineage.Record
    manifest: Manifest

    @property
    def dir(self) -> Path:
        return self.manifest.path


@dataclass
class BuildContext:
    """What a builder gets: where to write, its inputs, the knobs, a logger."""

    plan: AssetPlan
    key: str
    out_dir: Path
    upstream: dict[str, Upstream]
    foundry: FoundryResource
    dagster: AssetExecutionContext
    counts: dict[str, Any]
    build_log: BuildLog | None = None

    @property
    def log(self):
        return self.dagster.log

    def progress(self, what: str, total: int | None = None, unit: str = "documents") -> Progress:
        """A meter for a long step: reports go to the Dagster run log (so the terminal) and the
        build's JSON-lines log."""
        label = self.plan.label

        def report(record: Record) -> None:
            self.log.info(f"{label}: {describe(record)}")
            if self.build_log is not None:
                self.build_log.write("progress", **{k: v for k, v in record.items() if k != "event"},
                                     final=record["event"] == "done")

        return Progress(what, total=total, report=report, unit=unit)

    @property
    def logs_dir(self) -> Path:
        """Run logs of this build, kept outside the hashed output (timings differ per run)."""
        return self.foundry.store().root / "logs" / self.plan.kind / self.key


# builder(ctx) -> counts to keep in the manifest; describer(manifest) -> UI metadata
Builder = Callable[[BuildContext], dict[str, Any]]
Describer = Callable[[Manifest], Mapping[str, Any]]


def resolve_upstream(context: AssetExecutionContext, foundry: FoundryResource, plan: AssetPlan) -> dict[str, Upstream]:
    store = foundry.store()
    result = {}
    for role, key in plan.inputs.items():
        record = lineage.latest(context.instance, key)
        if record is None or record.store_key is None:
            raise UpstreamMissing(f"{plan.label}: input '{role}' ({key.to_user_string()}) was never materialized")
        upstream_kind = record.metadata.get("kind")
        manifest = store.lookup(upstream_kind, record.store_key)
        if manifest is None:
            raise UpstreamMissing(
                f"{plan.label}: output of {key.to_user_string()} (key {record.store_key}) is not in the store "
                f"at {store.root}; run `foundry sync` to rebuild it"
            )
        result[role] = Upstream(record=record, manifest=manifest)
    return result


def materialize(
    context: AssetExecutionContext,
    foundry: FoundryResource,
    plan: AssetPlan,
    build: Builder,
    describe: Describer,
    extra_inputs: Mapping[str, str] | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
) -> MaterializeResult:
    """Run (or reuse) `plan`'s output. `extra_inputs` are identity inputs that are not assets
    (e.g. the content hash of source files)."""
    upstream = resolve_upstream(context, foundry, plan)
    input_versions = {role: up.manifest.data_version for role, up in upstream.items()}
    input_versions.update(extra_inputs or {})
    key = store_key(plan.code_version, input_versions)
    store = foundry.store()
    manifest = store.lookup(plan.kind, key)
    cache = "hit"
    if manifest is None:
        log = BuildLog(build_log_path(store.root, plan.kind, key), asset=plan.label, kind=plan.kind, key=key,
                       run_id=context.run.run_id)

        def waiting() -> None:
            context.log.info(f"{plan.label}: another process is building {plan.kind}/{key}; waiting for it")
            log.write("wait")

        with store.claim(plan.kind, key, on_wait=waiting):
            manifest = store.lookup(plan.kind, key)  # a concurrent sync may have built it meanwhile
            if manifest is None:
                cache = "miss"
                manifest = _build(context, foundry, plan, key, upstream, build, log, input_versions)
    if cache == "hit":
        context.log.info(f"{plan.label}: cache hit {plan.kind}/{key}, nothing to compute")
    metadata: dict[str, Any] = {
        "cache": cache,
        "kind": plan.kind,
        "store_key": key,
        "code_version": plan.code_version,
        "inputs": MetadataValue.json(dict(sorted(input_versions.items()))),
        "path": MetadataValue.path(str(manifest.path)),
        "bytes": manifest.total_bytes,
        "build_seconds": manifest.seconds,
    }
    metadata.update(describe(manifest))
    metadata.update(extra_metadata or {})
    check_results, failed_blocking = checks.evaluate(plan, manifest)
    if failed_blocking:
        context.log.error(f"{plan.label}: blocking check failed: {'; '.join(failed_blocking)}")
    # sync reads this to stop building downstream of a failed blocking check
    metadata["blocking_checks_failed"] = MetadataValue.json(failed_blocking)
    return MaterializeResult(metadata=metadata, data_version=DataVersion(manifest.data_version),
                             check_results=check_results)


def _build(context: AssetExecutionContext, foundry: FoundryResource, plan: AssetPlan, key: str,
           upstream: dict[str, Upstream], build: Builder, log: BuildLog, input_versions: dict[str, str]) -> Manifest:
    context.log.info(f"{plan.label}: building {plan.kind}/{key}")
    log.write("start", inputs=dict(sorted(input_versions.items())))
    t0 = time.monotonic()
    try:
        with foundry.store().build(plan.kind, key, spec=plan.spec) as b:
            ctx = BuildContext(plan, key, b.dir, upstream, foundry, context, b.counts, build_log=log)
            b.counts.update(build(ctx) or {})
    except Exception as err:
        log.write("error", seconds=round(time.monotonic() - t0, 3), error=f"{type(err).__name__}: {err}")
        raise
    log.write("end", seconds=round(time.monotonic() - t0, 3), bytes=b.manifest.total_bytes,
              files=len(b.manifest.files), counts=scalar_counts(b.manifest.counts))
    return b.manifest


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
