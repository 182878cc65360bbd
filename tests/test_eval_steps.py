"""Evals follow training: kept intermediate checkpoints (training.keep_every) become partitions of
`eval_steps`, evaluated by `foundry sync`, by their sensor and by the nightly job; the `evals`
table gets one row set per step with its training tokens. Also NaN/inf rollback
(training.on_nonfinite: rollback) and the recipe/RUN.json fields.

The Dagster part runs one tiny recipe (one small source, 6 training steps kept every 2, one task
of 4 items) on a real instance in a temp DAGSTER_HOME, once for the whole module.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.recipes import tiny_recipe
from tests.support.environ import restore_environ
from tests.test_training import write_run
from training import train as train_mod
from training.checkpoint import load_checkpoint

DATA_ROOT = Path(os.environ.get("FOUNDRY_DATA_ROOT", "/work/shared/data"))
STEPS, KEEP = 6, 2  # kept: steps 2 and 4; the final checkpoint is step 6


def steps_recipe(name: str = "steps") -> dict:
    recipe = tiny_recipe(name)
    del recipe["sources"]["commoncrawl"]
    off = ("gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality", "minhash")
    recipe["sources"]["fineweb"].update(limit=40, curation=dict.fromkeys(off))  # curation is not under test
    recipe["mixture"] = {"weights": {"fineweb": 1.0}, "total_tokens": 10000}
    recipe["training"].update(steps=STEPS, keep_every=KEEP, log_every=2)
    recipe["evals"] = {"tasks": ["arc_easy"], "max_items": 4, "heldout_max_tokens": 300}
    recipe["contamination"] = None
    return recipe


# ------------------------------------------------------------------ training: kept steps, rollback


def test_kept_steps_are_the_weights_of_those_steps(tmp_path):
    """steps/step_<N>/ holds exactly the weights a run of N steps ends with (constant lr, so a
    run of N steps is the first N steps of a longer one)."""
    long = train_mod.main(["--config", str(write_run(tmp_path / "long", steps=9, schedule="constant",
                                                     keep_every=4, checkpoint_every=3))])
    out = tmp_path / "long" / "out"
    assert long["kept_steps"] == [{"step": 4, "tokens": 4 * 8 * 16}, {"step": 8, "tokens": 8 * 8 * 16}]
    assert sorted(p.name for p in (out / "steps").iterdir()) == ["step_00000004", "step_00000008"]
    assert sorted(p.name for p in (out / "steps" / "step_00000004").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "steps" / "step_00000004" / "config.json").read_text())["tokens"] == 4 * 8 * 16
    train_mod.main(["--config", str(write_run(tmp_path / "short", steps=4, schedule="constant"))])
    kept = load_file(str(out / "steps" / "step_00000004" / "model.safetensors"))
    short = load_file(str(tmp_path / "short" / "out" / "model.safetensors"))
    assert kept.keys() == short.keys() and all(torch.equal(kept[k], short[k]) for k in kept)
    assert load_checkpoint(out / "steps" / "step_00000008").num_params() == long["params"]


def test_kept_steps_survive_an_interrupted_run(tmp_path, monkeypatch):
    """Kept steps are written beside the resume state, so a run that dies (its out_dir lost, as a
    killed build's temp dir is) and resumes still publishes every kept step, bit for bit."""
    cfg = write_run(tmp_path, steps=9, keep_every=2, checkpoint_every=3)
    run = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({**run, "resume_dir": str(tmp_path / "resume")}))
    original, calls = torch.nn.functional.cross_entropy, {"n": 0}

    def dies_at_step_8(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt("killed")  # not an Exception: nothing of the run's own handling runs
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", dies_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        train_mod.main(["--config", str(cfg)])
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", original)
    assert (tmp_path / "resume" / "kept" / "step_00000006").is_dir() and not (tmp_path / "out" / "steps").exists()
    shutil.rmtree(tmp_path / "out", ignore_errors=True)  # whatever the dead run left there is lost
    summary = train_mod.main(["--config", str(cfg)])
    assert summary["resumed_from_step"] == 6
    clean = tmp_path / "clean"
    train_mod.main(["--config", str(write_run(clean, steps=9, keep_every=2))])  # no resume dir: straight to out/
    for step in ("step_00000002", "step_00000004", "step_00000006", "step_00000008"):
        a = load_file(str(tmp_path / "out" / "steps" / step / "model.safetensors"))
        b = load_file(str(clean / "out" / "steps" / step / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in b), step


@pytest.fixture
def nan_at(monkeypatch):
    """nan_at({5}): the loss of those cross-entropy calls (one per step here) is NaN, as a bad
    batch or an overflow would make it."""

    def inject(calls: set[int]) -> None:
        original, seen = torch.nn.functional.cross_entropy, {"n": 0}

        def poisoned(*args, **kwargs):
            seen["n"] += 1
            loss = original(*args, **kwargs)
            return loss * float("nan") if seen["n"] in calls else loss

        monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)

    return inject


def test_nan_rolls_back_to_the_last_checkpoint_and_skips_the_window(tmp_path, nan_at, capsys):
    train_mod.main(["--config", str(write_run(tmp_path / "clean", steps=12))])
    clean = pq.read_table(tmp_path / "clean" / "out" / "metrics.parquet").to_pydict()

    nan_at({8})  # step 8; the last resumable checkpoint is step 6
    cfg = write_run(tmp_path / "rb", steps=12, checkpoint_every=3, on_nonfinite="rollback", max_rollbacks=2)
    summary = train_mod.main(["--config", str(cfg)])
    [rollback] = summary["rollbacks"]
    assert rollback["step"] == 8 and rollback["to_step"] == 6 and rollback["reason"].startswith("loss became nan at step 8")
    assert "rolled back to step 6 (1 of at most 2 rollbacks), skipping the batches of steps 7-8" in capsys.readouterr().err
    m = pq.read_table(tmp_path / "rb" / "out" / "metrics.parquet").to_pydict()
    assert m["step"] == list(range(1, 13))  # every step once: the rolled-back ones were trained again
    assert m["rollbacks"] == [0] * 6 + [1] * 6
    assert all(x == x for x in m["loss"])  # no NaN reached the log or the weights
    assert m["loss"][:6] == clean["loss"][:6]  # restored exactly up to the checkpoint
    # the batches of steps 7-8 were skipped: the new step 7 trains on another batch than the clean one
    assert m["loss"][6] != clean["loss"][6]
    assert m["tokens"] == clean["tokens"] and m["lr"] == clean["lr"]  # the recipe's schedule and token count


def test_nan_stops_by_default_and_after_max_rollbacks(tmp_path, nan_at):
    nan_at({3})
    with pytest.raises(train_mod.TrainingDiverged, match="loss became nan at step 3 .*; aborting the run"):
        train_mod.main(["--config", str(write_run(tmp_path / "stop", steps=6, checkpoint_every=2))])
    nan_at({3, 5})  # both before the first periodic checkpoint: rolled back to the initial state twice
    with pytest.raises(train_mod.TrainingDiverged, match=r"loss became nan at step 2 .*; 1 rollbacks already "
                                                          r"\(training\.max_rollbacks=1\); aborting the run"):
        train_mod.main(["--config", str(write_run(tmp_path / "max", steps=6, checkpoint_every=4,
                                                  on_nonfinite="rollback", max_rollbacks=1))])
    assert "max_rollbacks=1" in (tmp_path / "max" / "out" / "FAILED.txt").read_text()


def test_run_config_and_recipe_fields(tmp_path):
    with pytest.raises(ValueError, match=r"training\.on_nonfinite 'rollback' needs training\.checkpoint_every > 0"):
        train_mod.main(["--config", str(write_run(tmp_path / "a", on_nonfinite="rollback"))])
    with pytest.raises(ValueError, match=r"training\.on_nonfinite must be one of \['stop', 'rollback'\], got 'retry'"):
        train_mod.main(["--config", str(write_run(tmp_path / "b", on_nonfinite="retry"))])
    with pytest.raises(ValueError, match=r"training\.keep_every must be an integer >= 0, got -2"):
        train_mod.main(["--config", str(write_run(tmp_path / "c", keep_every=-2))])

    from assets.launch import TrainLaunch
    from assets.recipe import RecipeError, parse_recipe
    from assets.training import training_spec, with_execution_settings

    run = json.loads(write_run(tmp_path / "d", on_nonfinite="rollback").read_text())
    with pytest.raises(ValueError, match=r"rollback needs resumable checkpoints .* checkpoint_every "
                                         r"\(FOUNDRY_CHECKPOINT_EVERY\) is 0"):
        with_execution_settings(run, launch=TrainLaunch.of(1), checkpoint_every=0, resume_dir=tmp_path / "r")

    base = parse_recipe(tiny_recipe("plain"))
    assert "keep_every" not in json.dumps(training_spec(base))  # off the hash at its defaults
    kept = parse_recipe({**tiny_recipe("kept"), "training": {**tiny_recipe("k")["training"], "keep_every": 2,
                                                             "on_nonfinite": "rollback"}})
    assert training_spec(kept)["training"]["keep_every"] == 2
    assert training_spec(kept)["training"]["on_nonfinite"] == "rollback"
    with pytest.raises(RecipeError, match=r"training: .*keep_every \(6\) must be smaller than steps \(6\)"):
        parse_recipe({**tiny_recipe("bad"), "training": {**tiny_recipe("k")["training"], "keep_every": 6}})


# ------------------------------------------------------------------ Dagster: partitions, sync, sensor, schedule


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The recipe built by the nightly job (a `foundry sync` of every recipe in a Dagster run)."""
    from dagster import DagsterInstance

    if not (DATA_ROOT / "eval").is_dir():
        pytest.skip(f"sample data not found under {DATA_ROOT}")
    root = tmp_path_factory.mktemp("eval_steps")
    saved = {k: os.environ.get(k) for k in ("FOUNDRY_STORE", "FOUNDRY_WORKERS", "FOUNDRY_CHECKPOINT_EVERY")}
    os.environ.update(FOUNDRY_STORE=str(root / "store"), FOUNDRY_WORKERS="1", FOUNDRY_CHECKPOINT_EVERY="3")
    (root / "home").mkdir()
    instance = DagsterInstance.local_temp(str(root / "home"))
    path = root / "steps.yaml"
    path.write_text(yaml.safe_dump(steps_recipe()))
    from assets.definitions import build_definitions, load_all

    loaded = load_all([path])
    defs = build_definitions(loaded)
    result = defs.resolve_job_def("foundry_sync").execute_in_process(instance=instance, raise_on_error=False)
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    yield {"root": root, "instance": instance, "loaded": loaded, "defs": defs, "path": path}
    instance.dispose()
    restore_environ(saved)


def _latest(instance, name: str, partition: str | None = None):
    from dagster import AssetKey

    from assets import lineage

    key = AssetKey(["steps", name])
    if partition is None:
        return lineage.latest(instance, key)
    return lineage.latest_by_partition(instance, key, [partition])[partition]


def test_nightly_sync_evaluates_every_kept_step(built):
    from assets.stats import query
    from assets.sync import compute_states, sync

    instance = built["instance"]
    assert instance.get_dynamic_partitions("steps__eval_steps") == ["step_00000002", "step_00000004"]
    # everything fresh: a second sync runs nothing
    assert all(s.status == "fresh" for s in compute_states(instance, built["loaded"]).values())
    report = sync(built["defs"], built["loaded"], instance)
    assert report.error is None and report.ran == [] and report.cache_hit == []

    ckpt = _latest(instance, "checkpoint")
    manifest = json.loads((Path(ckpt.path) / "_manifest.json").read_text())
    assert {"steps/step_00000002/model.safetensors", "steps/step_00000004/config.json"} <= set(manifest["files"])
    assert [k["step"] for k in manifest["counts"]["kept_steps"]] == [2, 4]

    _, rows = query(built["root"] / "store", "select step, tokens, count(*) from evals where recipe = 'steps' "
                                             "and task = 'arc_easy' group by all order by step")
    tokens_per_step = 4 * 64
    assert rows == [(2, 2 * tokens_per_step, 3), (4, 4 * tokens_per_step, 3), (6, 6 * tokens_per_step, 3)]
    _, rows = query(built["root"] / "store", "select step, count(*) from eval_items group by all order by step")
    assert rows == [(2, 4), (4, 4), (6, 4)]

    meta = _latest(instance, "eval_steps", "step_00000004").metadata
    assert meta["step"] == 4 and "**step 4** (1,024 training tokens)" in meta["scores"]
    curve = _latest(instance, "eval_report").metadata  # eval_report ran first; later steps on their pages
    table = _latest(instance, "eval_steps", "step_00000004").metadata["checkpoints"]
    assert table.splitlines()[0].startswith("| step | tokens | arc_easy/acc |")
    assert "| 2 | 512 |" in table and "| 4 | 1,024 |" in table
    assert meta["score_vs_tokens"].startswith("![score vs training tokens](data:image/png;base64,")
    assert "checkpoints" in curve


def _copy_latest(src, dst, key, partition: str | None = None) -> None:
    """Record in `dst` the latest materialization `src` has of `key` (same metadata and tags, so
    the same store key and data version)."""
    from dagster import AssetMaterialization

    records = src.fetch_materializations(key, limit=20).records
    mat = next(r for r in records if r.partition_key == partition).event_log_entry.asset_materialization
    dst.report_runless_asset_event(AssetMaterialization(key, partition=partition, metadata=dict(mat.metadata),
                                                        tags=dict(mat.tags)))


def test_sensor_adds_and_requests_only_new_steps(built, tmp_path):
    """A second instance that has seen the checkpoint (and its inputs) but no step evaluation: the
    sensor adds both kept steps and requests both; once one is recorded, only the other."""
    from dagster import AssetKey, DagsterInstance, DefaultSensorStatus, build_sensor_context

    from assets.eval_steps import steps_sensor

    plan = built["loaded"][0].plans[AssetKey(["steps", "eval_steps"])]
    sensor = steps_sensor(plan, "eager")
    assert sensor.default_status == DefaultSensorStatus.RUNNING
    assert steps_sensor(plan, "manual").default_status == DefaultSensorStatus.STOPPED  # automation.evaluation
    tick = lambda instance: sensor(build_sensor_context(instance=instance))  # noqa: E731 - the function itself
    assert tick(built["instance"]).skip_message == "all 2 kept steps evaluated"

    (tmp_path / "home").mkdir()
    with DagsterInstance.local_temp(str(tmp_path / "home")) as fresh:
        assert tick(fresh).skip_message == "no checkpoint with kept steps yet"
        for key in (plan.context["checkpoint"], *plan.inputs.values()):
            _copy_latest(built["instance"], fresh, key)
        result = tick(fresh)
        [add] = result.dynamic_partitions_requests
        assert list(add.partition_keys) == ["step_00000002", "step_00000004"]
        assert [(r.partition_key, r.asset_selection) for r in result.run_requests] == [
            ("step_00000002", [plan.key]), ("step_00000004", [plan.key])]
        step2 = _latest(built["instance"], "eval_steps", "step_00000002")
        assert result.run_requests[0].run_key == f"step_00000002@{step2.store_key}"  # the report it will build

        fresh.add_dynamic_partitions(plan.partitions, ["step_00000002", "step_00000004"])
        _copy_latest(built["instance"], fresh, plan.key, "step_00000002")  # step 2 evaluated
        result = tick(fresh)
        assert not result.dynamic_partitions_requests
        assert [r.partition_key for r in result.run_requests] == ["step_00000004"]


def test_nightly_schedule_targets_every_recipe(built):
    from dagster import DefaultScheduleStatus, build_schedule_context

    defs = built["defs"]
    schedule = defs.resolve_schedule_def("foundry_nightly_sync")
    assert schedule.cron_schedule == "0 2 * * *" and schedule.execution_timezone == "UTC"
    assert schedule.default_status == DefaultScheduleStatus.STOPPED
    assert schedule.job_name == "foundry_sync"
    [request] = schedule.evaluate_tick(build_schedule_context(instance=built["instance"])).run_requests
    assert request.job_name in (None, "foundry_sync")
    # its one op syncs every loaded recipe (the fixture built this recipe through it)
    job = defs.resolve_job_def("foundry_sync")
    assert "foundry sync of: steps" in job.graph.node_defs[0].description
