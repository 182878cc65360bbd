"""The nightly schedule: `foundry sync` over every loaded recipe, run as a Dagster job.

The job's one op calls the same `sync` as the CLI (assets/sync.py), so a nightly run builds
exactly what `foundry sync` would: every missing or stale asset of every recipe in rounds, new
file partitions, and every kept checkpoint step that lacks a report. A schedule targeting the
assets directly could not: Dagster's stale selection does not propagate ahead and one run cannot
mix partitioned and unpartitioned assets.

It starts STOPPED: a stale checkpoint means training, which should begin only once someone
switches the schedule on (UI: Automation -> foundry_nightly_sync, or
`dagster schedule start foundry_nightly_sync -m assets.definitions`).
"""

# no `from __future__ import annotations`: Dagster checks the op's context annotation at runtime
from collections.abc import Sequence

from dagster import (
    DefaultScheduleStatus,
    Definitions,
    Failure,
    JobDefinition,
    OpExecutionContext,
    ScheduleDefinition,
    job,
    op,
)

JOB_NAME = "foundry_sync"
SCHEDULE_NAME = "foundry_nightly_sync"
NIGHTLY_CRON = "0 2 * * *"  # 02:00 every night, UTC


def sync_job(asset_defs: Definitions, bundles: Sequence) -> JobDefinition:
    """A job whose run is one `foundry sync` of `bundles` (recipes and ablations) on the run's instance."""
    names = [getattr(b, "name", None) or b.recipe.name for b in bundles]

    @op(name="sync_all_recipes", description=f"foundry sync of: {', '.join(names) or '(no recipes)'}")
    def sync_all_recipes(context: OpExecutionContext) -> None:
        from .sync import sync

        report = sync(asset_defs, list(bundles), context.instance, echo=context.log.info)
        context.log.info(f"sync: {len(report.ran)} ran, {len(report.cache_hit)} cache hits, "
                          f"{len(report.untouched)} untouched in {report.seconds:.1f}s")
        if report.error:
            raise Failure(description=f"foundry sync: {report.error}", metadata={"failed": report.failed})

    @job(name=JOB_NAME, description="`foundry sync` of every recipe: build exactly what is missing or stale, "
                                    "kept checkpoint steps included.", tags={"foundry/nightly": "true"})
    def foundry_sync():
        sync_all_recipes()

    return foundry_sync


def nightly_schedule(sync: JobDefinition) -> ScheduleDefinition:
    return ScheduleDefinition(
        name=SCHEDULE_NAME, job=sync, cron_schedule=NIGHTLY_CRON, execution_timezone="UTC",
        default_status=DefaultScheduleStatus.STOPPED,
        description="Every night: `foundry sync` of all recipes (stopped by default: it may train models).",
    )
