"""Source files as dynamic partitions of `filtered_<source>`, and the sensor that adds them.

Each file of a source is one partition, named by its path relative to the source folder (the
same name `raw_<source>` records in files.json). A partition's output is keyed by the file's
content, so a new shard is curated without touching the others, and `curated_<source>` finds
every partition's output by computing its key instead of asking Dagster about 100+ partitions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dagster import (
    DefaultSensorStatus,
    DynamicPartitionsDefinition,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from .identity import store_key
from .plan import AssetPlan
from .recipe import RecipeError, source_files
from .settings import data_root
from .sources import file_names
from .store import ArtifactStore, Manifest


def partitions_name(recipe: str, source: str) -> str:
    return f"{recipe}__{source}__files"


def partitions_def(plan: AssetPlan) -> DynamicPartitionsDefinition:
    assert plan.partitions is not None, f"{plan.label} is not partitioned"
    return DynamicPartitionsDefinition(name=plan.partitions)


def current_files(plan: AssetPlan, root: Path) -> dict[str, Path]:
    """Partition key -> file, for the source's files on disk now."""
    return file_names(source_files(plan.context["source"], root))


def shard_key(filtered: AssetPlan, file_sha256: str) -> str:
    """Store key of one file's filtered output (what the partition body computes too)."""
    return store_key(filtered.code_version, {"file": file_sha256})


class PartitionsMissing(RuntimeError):
    pass


def shard_outputs(store: ArtifactStore, filtered: AssetPlan, files: list[dict[str, Any]]) -> list[tuple[str, Manifest]]:
    """The filtered output of every file raw_<source> recorded, in files.json order."""
    found, missing = [], []
    for row in files:
        manifest = store.lookup("filtered", shard_key(filtered, row["sha256"]))
        if manifest is None:
            missing.append(row["name"])
        else:
            found.append((row["name"], manifest))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise PartitionsMissing(
            f"{filtered.label}: partitions not built yet: {shown}; run `foundry sync` "
            "(or materialize those partitions in the UI) first"
        )
    return found


def shard_sensor(filtered: AssetPlan, raw: AssetPlan) -> SensorDefinition:
    """Watches the source folder: a new file becomes a partition and is curated at once.

    It also asks for raw_<source> again, so the file listing (and, through the eager
    automation condition, curated_<source> and everything after it) follows. Files that
    disappeared are removed from the partitions.
    """
    name = f"{filtered.partitions}_sensor"

    @sensor(name=name, target=[filtered.key, raw.key], minimum_interval_seconds=30,
            default_status=DefaultSensorStatus.RUNNING,
            description=f"New files in the folder of {filtered.label} become partitions and are curated.")
    def _watch(context: SensorEvaluationContext):
        try:
            on_disk = set(current_files(filtered, data_root()))
        except (RecipeError, OSError) as err:
            return SkipReason(f"cannot list the source files: {err}")
        known = set(context.instance.get_dynamic_partitions(filtered.partitions))
        new, gone = sorted(on_disk - known), sorted(known - on_disk)
        if not new and not gone:
            return SkipReason(f"no new files ({len(known)} partitions)")
        pdef = partitions_def(filtered)
        requests = [pdef.build_add_request(new)] if new else []
        if gone:
            requests.append(pdef.build_delete_request(gone))
        tick = int(context.cursor or 0) + 1
        runs = [RunRequest(run_key=f"{k}@{tick}", partition_key=k, asset_selection=[filtered.key]) for k in new]
        runs.append(RunRequest(run_key=f"listing@{tick}", asset_selection=[raw.key]))
        return SensorResult(run_requests=runs, dynamic_partitions_requests=requests, cursor=str(tick))

    return _watch
