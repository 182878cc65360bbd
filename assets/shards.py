"""Source files as dynamic partitions of `filtered_<source>`, and the sensor that adds them.

Each file of a source is one partition, named by its path relative to the source folder (the
same name `raw_<source>` records in files.json); with `batches: N` in the source, a partition
is a batch of files instead (`assets/file_batches.py`). Outputs are per file either way, keyed
by the file's content, so a new shard is curated without touching the others, and
`curated_<source>` finds every file's output by computing its key instead of asking Dagster
about 100+ partitions. A batch partition's own output is an index of its members' outputs.
"""

from __future__ import annotations

import json
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

from .file_batches import group_names, members_digest
from .identity import store_key
from .plan import AssetPlan
from .recipe import RecipeError, source_files
from .settings import data_root
from .sources import file_names
from .store import ArtifactStore, Manifest


def partitions_name(recipe: str, source: str, batched: bool = False) -> str:
    # Batches get their own definition: switching a source to batches leaves no stale per-file
    # partitions in the UI, and the two kinds of partition key never mix in one list.
    return f"{recipe}__{source}__{'batches' if batched else 'files'}"


def partitions_def(plan: AssetPlan) -> DynamicPartitionsDefinition:
    assert plan.partitions is not None, f"{plan.label} is not partitioned"
    return DynamicPartitionsDefinition(name=plan.partitions)


def batches_of(plan: AssetPlan) -> int | None:
    return plan.context["source"].batches


def current_files(plan: AssetPlan, root: Path) -> dict[str, Path]:
    """File name -> file, for the source's files on disk now."""
    return file_names(source_files(plan.context["source"], root))


def current_partitions(plan: AssetPlan, root: Path) -> dict[str, dict[str, Path]]:
    """Partition key -> its files (name -> path), for the source's files on disk now."""
    files = current_files(plan, root)
    return {key: {name: files[name] for name in names} for key, names in group_names(files, batches_of(plan)).items()}


def shard_key(filtered: AssetPlan, file_sha256: str) -> str:
    """Store key of one file's filtered output (what the partition body computes too)."""
    return store_key(filtered.code_version, {"file": file_sha256})


def batch_key(filtered: AssetPlan, members: list[tuple[str, str]]) -> str:
    """Store key of a batch partition's index, from its members' (name, sha256)."""
    return store_key(filtered.code_version, {"batch": members_digest(members)})


def expected_partitions(filtered: AssetPlan, files: list[dict[str, Any]]) -> dict[str, tuple[str, list[str]]]:
    """Partition key -> (store key its materialization must have, its file names), for the
    files raw_<source> recorded (name, sha256): what sync compares with the instance."""
    sha = {row["name"]: row["sha256"] for row in files}
    batches = batches_of(filtered)
    out = {}
    for key, names in group_names(sha, batches).items():
        out[key] = (shard_key(filtered, sha[key]) if batches is None
                    else batch_key(filtered, [(n, sha[n]) for n in names]), names)
    return out


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
            f"{filtered.label}: files not curated yet: {shown}; run `foundry sync` "
            "(or materialize their partitions in the UI) first"
        )
    return found


def _signature(files: dict[str, Path]) -> str:
    """Cheap change detector of a batch (names, sizes, mtimes): no file is read."""
    return members_digest((name, f"{p.stat().st_size}:{p.stat().st_mtime_ns}") for name, p in files.items())


def _read_cursor(cursor: str | None) -> tuple[int, dict[str, str] | None]:
    """(tick, batch signatures seen); the cursor of per-file partitions is the tick alone."""
    if not cursor:
        return 0, None
    data = json.loads(cursor)
    if isinstance(data, int):
        return data, None
    return int(data["tick"]), dict(data["seen"])


def shard_sensor(filtered: AssetPlan, raw: AssetPlan) -> SensorDefinition:
    """Watches the source folder: a new file becomes a partition and is curated at once.

    With batches, a batch whose files were added, removed or rewritten (seen by name, size and
    mtime) is materialized again; the cursor keeps each batch's signature. The sensor also asks
    for raw_<source> again, so the file listing (and, through the eager automation condition,
    curated_<source> and everything after it) follows. Partitions left without files are removed.
    """
    name = f"{filtered.partitions}_sensor"
    batched = batches_of(filtered) is not None

    @sensor(name=name, target=[filtered.key, raw.key], minimum_interval_seconds=30,
            default_status=DefaultSensorStatus.RUNNING,
            description=f"New files in the folder of {filtered.label} become partitions and are curated.")
    def _watch(context: SensorEvaluationContext):
        try:
            on_disk = current_partitions(filtered, data_root())
            signatures = {key: _signature(files) for key, files in on_disk.items()} if batched else {}
        except (RecipeError, OSError) as err:
            return SkipReason(f"cannot list the source files: {err}")
        tick, seen = _read_cursor(context.cursor)
        known = set(context.instance.get_dynamic_partitions(filtered.partitions))
        new, gone = sorted(set(on_disk) - known), sorted(known - set(on_disk))
        if seen is None:  # first look: partitions registered before (by sync) count as up to date
            seen = {key: signatures[key] for key in known if key in signatures}
        changed = sorted(key for key in on_disk if key not in known or (batched and seen.get(key) != signatures[key]))
        if not changed and not gone:
            skip = SkipReason(f"no new files ({len(known)} partitions)")
            # batches: keep the first look's signatures, or a change before the next tick would be the new baseline
            return SensorResult(skip_reason=skip, cursor=json.dumps({"tick": tick, "seen": seen})) if batched else skip
        pdef = partitions_def(filtered)
        requests = [pdef.build_add_request(new)] if new else []
        if gone:
            requests.append(pdef.build_delete_request(gone))
        tick += 1
        runs = [RunRequest(run_key=f"{k}@{tick}", partition_key=k, asset_selection=[filtered.key]) for k in changed]
        runs.append(RunRequest(run_key=f"listing@{tick}", asset_selection=[raw.key]))
        cursor = json.dumps({"tick": tick, "seen": signatures}) if batched else str(tick)
        return SensorResult(run_requests=runs, dynamic_partitions_requests=requests, cursor=cursor)

    return _watch
