"""Reading what the Dagster instance recorded about an asset's latest materialization."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from dagster import AssetKey, DagsterInstance

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
