"""Reading what the Dagster instance recorded about an asset's latest materialization."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from dagster import AssetKey, AssetRecordsFilter, DagsterInstance

DATA_VERSION_TAG = "dagster/data_version"


@dataclass(frozen=True)
class Record:
    """The facts sync and downstream assets need from a materialization event."""

    code_version: str | None
    data_version: str | None
    store_key: str | None
    inputs: dict[str, str]
    path: str | None
    cache: str | None
    run_id: str
    timestamp: float
    metadata: dict[str, Any]


def _value(meta: dict, name: str) -> Any:
    entry = meta.get(name)
    return None if entry is None else entry.value


def latest(instance: DagsterInstance, key: AssetKey) -> Record | None:
    event = instance.get_latest_materialization_event(key)
    if event is None or event.asset_materialization is None:
        return None
    return _record(event)


def latest_by_partition(instance: DagsterInstance, key: AssetKey, partitions: list[str],
                        page: int = 1000) -> dict[str, Record]:
    """Latest materialization of each listed partition (newest first, one pass over the log)."""
    found: dict[str, Record] = {}
    if not partitions:
        return found
    cursor = None
    while True:
        result = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=key, asset_partitions=partitions), limit=page, cursor=cursor)
        for rec in result.records:
            if rec.partition_key is not None and rec.partition_key not in found:
                found[rec.partition_key] = _record(rec.event_log_entry)
        if not result.has_more or len(found) == len(partitions):
            return found
        cursor = result.cursor


def of_run(instance: DagsterInstance, run_id: str) -> dict[tuple[AssetKey, str | None], Record]:
    """What one run materialized, by (asset key, partition). Unlike `latest`, never another
    process's materialization of the same asset (two syncs may run at once)."""
    from dagster import DagsterEventType

    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION).records
    out = {}
    for rec in records:
        mat = rec.event_log_entry.asset_materialization
        out[(mat.asset_key, mat.partition)] = _record(rec.event_log_entry)
    return out


def _record(event) -> Record:
    mat = event.asset_materialization
    meta = dict(mat.metadata)
    inputs = _value(meta, "inputs") or {}
    if isinstance(inputs, str):
        inputs = json.loads(inputs)
    return Record(
        code_version=_value(meta, "code_version"),
        data_version=(mat.tags or {}).get(DATA_VERSION_TAG),
        store_key=_value(meta, "store_key"),
        inputs=dict(inputs),
        path=_value(meta, "path"),
        cache=_value(meta, "cache"),
        run_id=event.run_id,
        timestamp=event.timestamp,
        metadata={k: v.value for k, v in meta.items()},
    )
