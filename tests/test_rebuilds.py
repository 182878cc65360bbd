"""Only what lies downstream of an edit rebuilds: the scenarios of the foundation issue, on a
real Dagster instance (sqlite in a temp dir), real datatrove, real training and lighteval.

The scenarios share one instance and store and run in order, like a user's session.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.recipes import tiny_recipe
from tests.support.environ import restore_environ


def parse_tiny(recipe: dict):
    from assets.recipe import parse_recipe

    return parse_recipe(recipe)

PROJECT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # end to end: curation, training and lighteval on a real instance (~2 min)

BRANCH_CC = ["filtered_commoncrawl", "curated_commoncrawl", "tokenized_commoncrawl", "mixture", "checkpoint", "eval_report",
             "contamination", "data_stats"]
AFTER_MIXTURE = ["mixture", "checkpoint", "eval_report", "data_stats"]


class Session:
    """A user's workspace: recipe files, one Dagster instance, one store."""

    def __init__(self, root: Path):
        from dagster import DagsterInstance

        self.root = root
        self.store = root / "store"
        os.environ["FOUNDRY_STORE"] = str(self.store)
        os.environ["FOUNDRY_WORKERS"] = "1"
        home = root / "dagster_home"
        home.mkdir()
        self.instance = DagsterInstance.local_temp(str(home))

    def write(self, recipe: dict, name: str | None = None) -> Path:
        path = self.root / f"{name or recipe['name']}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return path

    def sync(self, *paths: Path) -> dict:
        from assets.definitions import build_definitions, load_all
        from assets.sync import sync

        loaded = load_all(list(paths))
        report = sync(build_definitions(loaded), loaded, self.instance)
        assert report.error is None, report.error
        return report.as_json()


def names(labels: list[str], recipe: str = "t1") -> set[str]:
    """Asset names of one recipe; a partition `filtered_x[file]` counts as `filtered_x`."""
    return {label.split("/", 1)[1].split("[")[0] for label in labels if label.startswith(recipe + "/")}


def partitions(labels: list[str], asset: str) -> set[str]:
    return {label.split("[", 1)[1].rstrip("]") for label in labels if label.split("[")[0] == asset}


@pytest.fixture(scope="module")
def session(tmp_path_factory, request):
    saved = {k: os.environ.get(k) for k in ("FOUNDRY_STORE", "FOUNDRY_WORKERS")}
    s = Session(tmp_path_factory.mktemp("rebuilds"))
    s.base = tiny_recipe("t1")
    s.path = s.write(s.base)
    first = s.sync(s.path)
    s.first = first
    yield s
    s.instance.dispose()
    restore_environ(saved)


def test_first_sync_builds_everything(session):
    assert names(session.first["ran"]) == {
        "raw_fineweb", "raw_commoncrawl", "filtered_fineweb", "filtered_commoncrawl", "curated_fineweb",
        "curated_commoncrawl", "tokenizer", "tokenized_fineweb", "tokenized_commoncrawl", "mixture", "checkpoint",
        "eval_report", "contamination", "data_stats",
    }
    # one partition per file of the source folder
    assert partitions(session.first["ran"], "t1/filtered_commoncrawl") == {
        "CC-MAIN-20190717121559-20190717143559-00140.jsonl.gz", "cc_en_head-0091.jsonl.gz",
        "cc_en_head-0174.jsonl.gz", "provided_documents_000.json.gz"}
    assert session.first["cache_hit"] == []
    # the UI page of a curated source: the step funnel and the length histogram
    from dagster import AssetKey

    from assets import lineage

    meta = lineage.latest(session.instance, AssetKey(["t1", "curated_commoncrawl"])).metadata
    assert "| gopher_quality |" in meta["curation_steps"]
    assert meta["length_histogram"].startswith("![length histogram](data:image/png;base64,")


def test_noop_sync_touches_nothing(session):
    report = session.sync(session.path)
    assert report["ran"] == [] and report["cache_hit"] == []
    assert len(report["untouched"]) == 14


def test_threshold_change_rebuilds_only_that_branch(session):
    edited = copy.deepcopy(session.base)
    edited["sources"]["commoncrawl"]["curation"]["gopher_quality"]["min_doc_words"] = 300
    report = session.sync(session.write(edited))
    assert names(report["ran"]) == set(BRANCH_CC)
    assert report["cache_hit"] == []
    assert {"raw_fineweb", "raw_commoncrawl", "filtered_fineweb", "curated_fineweb", "tokenized_fineweb",
            "tokenizer"} <= names(report["untouched"])

    # revert: everything the edit touched is a cache hit, training does not rerun
    report = session.sync(session.write(session.base))
    assert report["ran"] == []
    assert names(report["cache_hit"]) == set(BRANCH_CC)


def test_mix_weight_change_rebuilds_mixture_and_after(session):
    edited = copy.deepcopy(session.base)
    edited["mixture"]["weights"] = {"fineweb": 0.5, "commoncrawl": 0.5}
    report = session.sync(session.write(edited))
    assert names(report["ran"]) == set(AFTER_MIXTURE)
    report = session.sync(session.write(session.base))
    assert report["ran"] == [] and names(report["cache_hit"]) == set(AFTER_MIXTURE)


def test_second_recipe_shares_curated_and_tokenized_outputs(session):
    other = copy.deepcopy(session.base)
    other["name"] = "t2"
    other["mixture"]["weights"] = {"fineweb": 0.9, "commoncrawl": 0.1}
    other_path = session.write(other)
    report = session.sync(session.path, other_path)
    shared = {"raw_fineweb", "raw_commoncrawl", "filtered_fineweb", "filtered_commoncrawl", "curated_fineweb",
              "curated_commoncrawl", "tokenizer", "tokenized_fineweb", "tokenized_commoncrawl", "contamination"}
    assert names(report["cache_hit"], "t2") == shared
    assert names(report["ran"], "t2") == set(AFTER_MIXTURE)
    assert names(report["untouched"], "t1") == names(session.first["ran"])  # t1 stays as it was


def test_stats_tables_answer_queries(session):
    from assets.recipe import source_files
    from assets.settings import data_root
    from assets.stats import query
    from dataprep.readers import iter_records

    cols, rows = query(session.store, "select source, count(*), sum(kept::int) from curation "
                                      "where recipe = 't1' group by 1 order by 1")
    assert cols[0] == "source"
    assert [r[0] for r in rows] == ["commoncrawl", "fineweb"]
    cc = parse_tiny(session.base).sources["commoncrawl"]
    per_file = [sum(1 for _ in iter_records([f], "jsonl", "text", "id", cc.limit)) for f in source_files(cc, data_root())]
    assert rows[0][1] == sum(per_file) and rows[1][1] == 100  # one decision row per input document (limit per file)
    _, rows = query(session.store, "select file, count(*) from curation where recipe = 't1' and "
                                   "source = 'commoncrawl' group by 1 order by 1")
    assert [n for _, n in rows] == per_file
    _, rows = query(session.store, "select count(*) filter (where step = 'minhash'), "
                                   "count(*) filter (where kept and cluster_size is null) from curation")
    assert rows == [(0, 0)]  # no near-duplicates in these samples; every kept row went through dedup
    _, rows = query(session.store, "select count(*) from train_metrics where recipe = 't1'")
    assert rows[0][0] == 6
    _, rows = query(session.store, "select task, metric, n_items from evals where recipe = 't1' "
                                   "and task = 'hellaswag' order by metric")
    assert rows == [("hellaswag", "acc", 6), ("hellaswag", "acc_norm", 6), ("hellaswag", "acc_norm_token", 6)]
    _, rows = query(session.store, "select form, count(*), count(distinct item) from eval_items "
                                   "where recipe = 't1' and task = 'hellaswag' group by form")
    assert rows == [("cloze", 6, 6)]  # per-item results of the eval report
    _, rows = query(session.store, "select sum(tokens) from tokens t join (select distinct recipe from mixture) "
                                   "using (recipe) where recipe = 't2'")
    assert rows[0][0] > 0
    with pytest.raises(Exception):  # read-only: the database cannot be written through foundry sql
        query(session.store, "create table x as select 1")


def test_status_reports_stale_with_reason(session, capsys):
    from assets.definitions import load_all
    from assets.sync import compute_states

    edited = copy.deepcopy(session.base)
    edited["training"]["steps"] = 7
    loaded = load_all([session.write(edited, "t1_edit")])
    states = {s.plan.name: s for s in compute_states(session.instance, loaded).values()}
    assert states["checkpoint"].status == "stale"
    assert "code version" in states["checkpoint"].reason
    assert states["eval_report"].status == "stale" and "checkpoint" in states["eval_report"].reason
    assert states["mixture"].status == "fresh"


def test_cli_sync_json_and_sigkill_recovery(session, tmp_path):
    """`foundry sync --json` as a user runs it; SIGKILL during training leaves nothing partial
    visible, and the next sync completes the same materialization."""
    env = dict(os.environ, FOUNDRY_STORE=str(session.store), FOUNDRY_WORKERS="1",
               DAGSTER_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    slow = copy.deepcopy(session.base)
    slow["name"] = "t3"
    slow["training"]["steps"] = 1500  # long enough to be killed mid-run, short enough to finish
    path = session.write(slow)
    cmd = [sys.executable, "-m", "assets.cli", "sync", "--recipe", str(path), "--json"]
    ckpt_root = session.store / "checkpoint"
    visible_before = {p.name for p in ckpt_root.iterdir() if not p.name.startswith(".")}
    proc = subprocess.Popen(cmd, cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and not any(p.name.startswith(".tmp-") for p in ckpt_root.iterdir()):
        time.sleep(0.1)
    assert proc.poll() is None, "sync ended before training started"
    time.sleep(1.0)  # let training get going
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    visible_after = {p.name for p in ckpt_root.iterdir() if not p.name.startswith(".")}
    assert visible_after == visible_before, "a killed build must not publish anything"
    assert any(p.name.startswith(".tmp-") for p in ckpt_root.iterdir())  # its leftovers are hidden

    done = subprocess.run(cmd, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    # what finished before the kill stays done; the interrupted asset and what follows run now
    assert set(report["ran"]) == {"t3/checkpoint", "t3/eval_report", "t3/data_stats"}
    assert "t3/curated_fineweb" in report["untouched"] and "t3/mixture" in report["untouched"]
    assert not [p for p in ckpt_root.iterdir() if p.name.startswith(".tmp-")], "abandoned temp dir left behind"


def test_source_file_changes_are_detected(session, tmp_path):
    """A touched file is re-hashed but changes nothing; new content rebuilds its branch."""
    import gzip
    import shutil

    from assets.definitions import load_all
    from assets.settings import data_root
    from assets.sync import compute_states

    copy_dir = tmp_path / "cc"
    shutil.copytree(data_root() / "web" / "commoncrawl_raw", copy_dir)
    recipe = copy.deepcopy(session.base)
    recipe["name"] = "t4"
    recipe["sources"]["commoncrawl"]["path"] = str(copy_dir)  # same bytes as t1's source
    path = session.write(recipe)
    report = session.sync(path)
    # Another path is another raw spec (a cheap re-hash), but the same bytes give the same data
    # version, so every other output is shared with t1.
    assert report["ran"] == ["t4/raw_commoncrawl"]
    assert len(report["cache_hit"]) == 16  # 11 assets and 5 file partitions

    target = next(copy_dir.glob("CC-MAIN-*.jsonl.gz"))
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
    states = {s.plan.name: s for s in compute_states(session.instance, load_all([path])).values()}
    assert states["raw_commoncrawl"].reason == "source files changed on disk"
    report = session.sync(path)
    assert report["cache_hit"] == ["t4/raw_commoncrawl"] and report["ran"] == []  # same content

    from dagster import AssetKey

    from assets import lineage

    curated = AssetKey(["t4", "curated_commoncrawl"])
    before = lineage.latest(session.instance, curated).data_version
    with gzip.open(target, "ab") as f:  # a new document at the end: beyond the limit of 40
        f.write(b'{"id": "new-doc", "text": "fresh text"}\n')
    report = session.sync(path)
    # New content: raw, that file's partition and the readers of raw rerun. Curation reads the
    # same first 40 documents, so its output keeps its data version; the tokenizer samples by content.
    assert {"t4/raw_commoncrawl", f"t4/filtered_commoncrawl[{target.name}]", "t4/curated_commoncrawl",
            "t4/tokenizer"} <= set(report["ran"])
    assert partitions(report["ran"] + report["cache_hit"], "t4/filtered_commoncrawl") == {target.name}
    assert "t4/curated_fineweb" in report["untouched"]
    assert lineage.latest(session.instance, curated).data_version == before


def test_new_shard_in_the_folder_is_curated_alone(session, tmp_path):
    """Dropping a file into a source folder: the sensor asks for exactly that partition, and
    sync builds it without touching the other files."""
    import gzip
    import shutil

    from dagster import build_sensor_context

    from assets.definitions import build_definitions, load_all
    from assets.settings import data_root

    folder = tmp_path / "cc"
    shutil.copytree(data_root() / "web" / "commoncrawl_raw", folder)
    recipe = copy.deepcopy(session.base)
    recipe["name"] = "t7"
    recipe["sources"]["commoncrawl"]["path"] = str(folder)
    path = session.write(recipe)
    session.sync(path)

    # the new shard re-publishes the documents of another file with one word changed: MinHash
    # must find each copy across the two files
    with gzip.open(folder / "cc_en_head-0091.jsonl.gz", "rt") as f:
        originals = [json.loads(line) for line in f][:40]
    new = folder / "new_shard.jsonl.gz"
    with gzip.open(new, "wt") as f:
        for doc in originals:
            words = doc["text"].split(" ")
            words[len(words) // 2] = "reportedly"
            f.write(json.dumps({"id": "copy-" + str(doc["id"]), "text": " ".join(words)}) + "\n")
    loaded = load_all([path])
    defs = build_definitions(loaded)
    sensor = defs.resolve_sensor_def("t7__commoncrawl__files_sensor")
    result = sensor(build_sensor_context(instance=session.instance, definitions=defs))
    requested = {r.partition_key for r in result.run_requests if r.partition_key}
    assert requested == {"new_shard.jsonl.gz"}
    assert [r.partition_keys for r in result.dynamic_partitions_requests] == [["new_shard.jsonl.gz"]]

    report = session.sync(path)
    assert partitions(report["ran"], "t7/filtered_commoncrawl") == {"new_shard.jsonl.gz"}
    assert partitions(report["cache_hit"], "t7/filtered_commoncrawl") == set()  # the others: untouched
    assert {"t7/raw_commoncrawl", "t7/curated_commoncrawl", "t7/tokenized_commoncrawl"} <= set(report["ran"])
    assert "t7/curated_fineweb" in report["untouched"]

    from assets.stats import query

    _, rows = query(session.store, "select file, doc_id, cluster_id, cluster_size from curation "
                                   "where recipe = 't7' and reason = 'minhash:duplicate' order by doc_id")
    _, kept_originals = query(session.store, "select count(*) from curation where recipe = 't7' and "
                                             "file = 'cc_en_head-0091.jsonl.gz' and (kept or step = 'minhash')")
    assert len(rows) == kept_originals[0][0] > 0  # every copy of a kept document is a near-duplicate
    assert all(size == 2 for *_, size in rows)
    _, pairs = query(session.store, "select count(distinct file) from curation where recipe = 't7' and "
                                    "cluster_id in (select cluster_id from curation where recipe = 't7' and "
                                    "step = 'minhash') group by cluster_id")
    assert {n for (n,) in pairs} == {2}  # each cluster: the original and its copy, from two files

    # the file leaves the folder: sync drops its partition (as the sensor would), and the rest is
    # back to the outputs of the first sync
    partitions_def = "t7__commoncrawl__files"
    assert "new_shard.jsonl.gz" in session.instance.get_dynamic_partitions(partitions_def)
    new.unlink()
    report = session.sync(path)
    assert report["removed"] == ["t7/filtered_commoncrawl[new_shard.jsonl.gz]"]
    assert "new_shard.jsonl.gz" not in session.instance.get_dynamic_partitions(partitions_def)
    assert "t7/curated_commoncrawl" in report["cache_hit"]
    assert "removed" not in session.sync(path)  # nothing left to remove


def test_automation_conditions_follow_the_recipe_policy(session):
    """The sensor's conditions: a data asset whose spec changed is requested; a manual
    checkpoint is not, even once its inputs update."""
    from dagster import AssetKey, evaluate_automation_conditions

    from assets.definitions import build_definitions, load_all

    defs = build_definitions(load_all([session.path]))
    result = evaluate_automation_conditions(defs=defs, instance=session.instance)
    assert result.total_requested == 0  # everything is up to date

    edited = copy.deepcopy(session.base)
    edited["name"] = "t1"
    edited["sources"]["fineweb"]["curation"]["fineweb_quality"]["short_line_thr"] = 0.5
    edited["automation"] = {"training": "manual", "evaluation": "eager"}
    defs2 = build_definitions(load_all([session.write(edited, "t1_automation")]))
    result = evaluate_automation_conditions(defs=defs2, instance=session.instance, cursor=result.cursor)
    assert result.get_num_requested(AssetKey(["t1", "curated_fineweb"])) == 1
    assert result.get_num_requested(AssetKey(["t1", "filtered_fineweb"])) == 1  # its one file partition
    assert result.get_num_requested(AssetKey(["t1", "curated_commoncrawl"])) == 0
    assert result.get_num_requested(AssetKey(["t1", "filtered_commoncrawl"])) == 0
    assert result.get_num_requested(AssetKey(["t1", "checkpoint"])) == 0


def test_failed_training_reports_its_cause_and_publishes_nothing(session):
    from assets.definitions import build_definitions, load_all
    from assets.sync import sync

    bad = copy.deepcopy(session.base)
    bad["name"] = "t5"
    bad["optimizer"] = {"lr": 1.0e6}  # diverges at once
    loaded = load_all([session.write(bad)])
    before = set((session.store / "checkpoint").iterdir())
    report = sync(build_definitions(loaded), loaded, session.instance)
    assert report.failed == ["t5/checkpoint"]
    assert "TrainingDiverged" in report.error and "aborting the run" in report.error
    assert {"t5/eval_report", "t5/data_stats"} <= set(report.untouched)  # nothing ran past the failure
    assert set((session.store / "checkpoint").iterdir()) == before


def test_blocking_check_stops_the_pipeline(session):
    """A source whose filters drop everything fails `documents_kept`; nothing trains on it."""
    from assets.definitions import build_definitions, load_all
    from assets.sync import compute_states, sync

    empty = copy.deepcopy(session.base)
    empty["name"] = "t6"
    empty["sources"]["commoncrawl"]["curation"]["gopher_quality"]["min_doc_words"] = 10**6
    loaded = load_all([session.write(empty)])
    report = sync(build_definitions(loaded), loaded, session.instance)
    assert "documents_kept" in report.error and "t6/curated_commoncrawl" in report.error
    assert "t6/curated_commoncrawl" in report.ran
    assert {"t6/tokenized_commoncrawl", "t6/mixture", "t6/checkpoint"} <= set(report.untouched)
    states = {s.plan.name: s for s in compute_states(session.instance, loaded).values()}
    assert states["tokenized_commoncrawl"].status == "blocked"
    assert states["checkpoint"].status == "blocked"
    assert states["tokenized_fineweb"].status == "fresh"  # the other branch is fine


def test_moe_recipe_trains_and_reports_expert_load_by_source(session):
    """A recipe that only turns the model into an MoE shares every data asset and reports
    expert load per (layer, expert, source) in DuckDB."""
    from assets.stats import query

    moe = copy.deepcopy(session.base)
    moe["name"] = "tmoe"
    moe["model"].update(moe_experts=4, moe_top_k=2, moe_lb_scope="global_batch")
    moe["training"]["grad_accum_steps"] = 2
    report = session.sync(session.write(moe))
    assert names(report["ran"], "tmoe") == {"checkpoint", "eval_report", "data_stats"}
    assert "tmoe/mixture" in report["cache_hit"]
    _, rows = query(session.store, "select source, sum(tokens) from expert_load where recipe = 'tmoe' "
                                   "group by 1 order by 1")
    # every (layer, expert, source) has a row, zeros included; the first steps' long documents may all
    # come from one source. Routed slots: steps x accumulation x batch x seq_len x top_k x MoE layers.
    assert [r[0] for r in rows] == ["commoncrawl", "fineweb"]
    assert sum(r[1] for r in rows) == 6 * 2 * 4 * 64 * 2 * 2
    _, lb = query(session.store, "select count(moe_lb_loss) from train_metrics where recipe = 'tmoe'")
    assert lb[0][0] > 0
