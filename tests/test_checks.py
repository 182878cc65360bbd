"""Curation checks: bounds and blocking come from the recipe; each check can fail."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from assets import checks
from assets.plan import AssetPlan
from assets.recipe import SourceSpec
from assets.store import Manifest


def _manifest(tmp_path, rows: list[dict]) -> Manifest:
    table = pa.table({
        "doc_id": [r["id"] for r in rows],
        "kept": [r["kept"] for r in rows],
        "chars": [r.get("chars", 100) for r in rows],
        "words": [r.get("words", 20) for r in rows],
        "language": pa.array([r.get("language") for r in rows], pa.string()),
    })
    pq.write_table(table, tmp_path / "decisions.parquet")
    kept = sum(r["kept"] for r in rows)
    return Manifest(kind="curated", key="k", files={}, counts={"documents": len(rows), "kept": kept},
                    spec=None, seconds=0.0, created=0.0, path=tmp_path)


def _plan(curation: dict) -> AssetPlan:
    src = SourceSpec(kind="jsonl", path="x.jsonl", curation=curation)
    return AssetPlan("r", "curated_s", "curated", {}, context={"source": src})


def _results(plan, manifest) -> dict[str, tuple[bool, bool]]:
    results, _ = checks.evaluate(plan, manifest)
    return {r.check_name: (r.passed, r.severity.value == "ERROR") for r in results}


def test_default_checks_pass_on_clean_output(tmp_path):
    m = _manifest(tmp_path, [{"id": str(i), "kept": i % 2 == 0} for i in range(10)])
    assert _results(_plan({}), m) == {
        "documents_kept": (True, True), "keep_rate": (True, False), "no_empty_documents": (True, True),
        "unique_ids": (True, False)}  # language_share only where the language step runs


def test_each_check_fails_on_its_defect_and_blocks_as_configured(tmp_path):
    rows = [{"id": "a", "kept": True, "language": "en"}, {"id": "a", "kept": True, "language": "fr"},
            {"id": "b", "kept": True, "chars": 0, "words": 0, "language": "fr"},
            {"id": "c", "kept": False}]
    m = _manifest(tmp_path, rows)
    plan = _plan({"language": {"languages": ["en"]},
                  "checks": {"keep_rate": {"min": 0.1, "max": 0.5, "blocking": True},
                             "unique_ids": {"blocking": True}, "language_share": {"min": 0.5}}})
    results = _results(plan, m)
    assert results == {"documents_kept": (True, True), "keep_rate": (False, True),
                       "no_empty_documents": (False, True), "unique_ids": (False, True),
                       "language_share": (False, False)}
    _, failed = checks.evaluate(plan, m)
    assert [f.split(" ")[0] for f in failed] == ["keep_rate", "no_empty_documents", "unique_ids"]
    assert "keep rate 0.750 (bounds 0.1 to 0.5)" in failed[0]


def test_checks_can_be_turned_off(tmp_path):
    m = _manifest(tmp_path, [{"id": "a", "kept": True}, {"id": "a", "kept": True}])
    plan = _plan({"checks": {"keep_rate": None, "unique_ids": None, "no_empty_documents": None}})
    assert _results(plan, m) == {"documents_kept": (True, True)}


def test_bad_check_bounds_name_the_field():
    from assets.recipe import RecipeError, parse_recipe
    from tests.recipes import tiny_recipe

    recipe = tiny_recipe("r")
    recipe["sources"]["fineweb"]["curation"]["checks"] = {"keep_rate": {"min": 0.9, "max": 0.2}}
    with pytest.raises(RecipeError, match=r"sources.fineweb.curation.checks.keep_rate: .*min \(0.9\) is above max"):
        parse_recipe(recipe, origin="r.yaml")
