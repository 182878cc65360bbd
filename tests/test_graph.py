"""Snapshot of the demo recipe's asset graph: keys, deps and code versions.

A diff here means an edit changed which outputs are rebuilt. If that was intended (a recipe
edit or a bumped logic version), refresh with FOUNDRY_UPDATE_SNAPSHOTS=1 and commit the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dagster import AssetKey, DefaultSensorStatus

PROJECT = Path(__file__).resolve().parent.parent
SNAPSHOT = Path(__file__).parent / "snapshots" / "demo_graph.json"


def _demo():
    from assets.definitions import build_definitions, load_all

    loaded = load_all([PROJECT / "recipes" / "demo.yaml"])
    return loaded, build_definitions(loaded)


def test_demo_graph_matches_snapshot():
    from assets.factory import describe_recipe

    loaded, _ = _demo()
    graph = describe_recipe(loaded[0])
    if os.environ.get("FOUNDRY_UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.write_text(json.dumps(graph, indent=2, sort_keys=True) + "\n")
    assert graph == json.loads(SNAPSHOT.read_text())


def test_definitions_wire_groups_automation_and_sensor():
    loaded, defs = _demo()
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert "demo/curated_fineweb" in keys and "demo/rephrased_fineweb_qa" in keys and len(keys) == 25
    assert "demo/ocr_queue_pdf" in keys  # the demo's PDF source lists what needs OCR
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.group_name == "demo"
        assert node.code_version == loaded[0].plans[key].code_version
    data = graph.get(AssetKey(["demo", "curated_fineweb"])).automation_condition
    assert data is not None and data.get_label() == "eager or own code version changed"
    # the demo recipe says training: manual, evaluation: eager
    assert graph.get(AssetKey(["demo", "checkpoint"])).automation_condition is None
    assert graph.get(AssetKey(["demo", "eval_report"])).automation_condition is not None
    sensor = defs.resolve_sensor_def("foundry_automation")
    assert sensor.default_status == DefaultSensorStatus.RUNNING
    # one partition per source file, added by a running sensor per source
    filtered = graph.get(AssetKey(["demo", "filtered_commoncrawl"]))
    assert filtered.partitions_def.name == "demo__commoncrawl__files"
    assert filtered.automation_condition.get_label() == "own code version changed"
    watcher = defs.resolve_sensor_def("demo__commoncrawl__files_sensor")
    assert watcher.default_status == DefaultSensorStatus.RUNNING


def test_graph_dependencies():
    loaded, defs = _demo()
    graph = defs.resolve_asset_graph()
    parents = lambda name: {k.to_user_string() for k in graph.get(AssetKey(["demo", name])).parent_keys}  # noqa: E731
    assert parents("filtered_commoncrawl") == set()  # a root: its partitions are the files
    assert parents("curated_commoncrawl") == {"demo/raw_commoncrawl", "demo/filtered_commoncrawl"}
    assert parents("tokenizer") == {"demo/raw_fineweb", "demo/raw_commoncrawl", "demo/raw_warc",
                                    "demo/raw_pdf"}  # raw, not curated
    assert parents("tokenized_fineweb") == {"demo/curated_fineweb", "demo/tokenizer"}
    assert parents("rephrased_fineweb_qa") == {"demo/curated_fineweb"}  # kept documents, not raw ones
    assert parents("tokenized_fineweb_qa") == {"demo/rephrased_fineweb_qa", "demo/tokenizer"}
    assert parents("mixture") == {"demo/tokenized_fineweb", "demo/tokenized_commoncrawl", "demo/tokenized_warc",
                                  "demo/tokenized_pdf", "demo/tokenized_fineweb_qa"}
    assert parents("ocr_queue_pdf") == {"demo/curated_pdf", "demo/raw_pdf"}  # only kind pdf sources have one
    assert parents("checkpoint") == {"demo/mixture", "demo/tokenizer"}
    assert parents("eval_report") == {"demo/checkpoint", "demo/tokenizer"}
