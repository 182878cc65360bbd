"""A PDF source in batches (`batches: N`): partitions are batches of files, outputs stay per file.

A folder made in tmp from the sample PDFs is curated twice, each build in its own store: once with
one partition per file and once in 3 batches. Then files are added and removed and the sensor
and sync are asked what to rebuild. Only raw -> filtered -> curated -> ocr_queue are built (by
sync's own round function), not the tokenizer or model of the recipe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from assets.file_batches import batch_of, group_names
from assets.recipe import RecipeError, parse_recipe
from assets.settings import data_root
from assets.store import MANIFEST
from tests.recipes import tiny_recipe
from tests.support.environ import restore_environ

PDF = data_root() / "pdf"
PLUMBER = PDF / "pdfplumber"
pytestmark = pytest.mark.skipif(not PDF.is_dir(), reason=f"sample PDFs not found under {PDF}")

BATCHES = 3  # the files below fill batch-001 and batch-002; batch-000 stays empty, so no partition
CUPERTINO = PLUMBER / "cupertino_usd_4-6-16.pdf"
FILES = {  # name in the source folder -> sample (the four first are kept under the PDF defaults)
    "milwaukee.pdf": PLUMBER / "150109DSP-Milw-505-90D.pdf",
    "cupertino.pdf": CUPERTINO,
    "crazyones.pdf": PDF / "pypdf_samples" / "crazyones-pdfa.pdf",
    "google-doc.pdf": PDF / "pypdf_samples" / "google-doc-document.pdf",
    "locked.pdf": PLUMBER / "password-example.pdf",
    "empty.pdf": PLUMBER / "empty.pdf",
    "scans/letter.pdf": PDF / "olmocr" / "bench_sample" / "pdfs" / "lincoln_letter.pdf",
}
CUT = "cut.pdf"  # the first half of cupertino.pdf
ADDED = ("minutes.pdf", PLUMBER / "senate-expenditures.pdf")  # lands in batch-001
REMOVED = "google-doc.pdf"  # from batch-002, which keeps three files
STEPS = ("raw", "filtered", "curated", "ocr_queue")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def environment(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        restore_environ(saved)


class Workspace:
    """One recipe over the shared folder, with its own store, on the shared Dagster instance."""

    def __init__(self, root: Path, name: str, folder: Path, instance, batches: int | None):
        from assets.definitions import build_definitions, load_all

        recipe = tiny_recipe(name)
        # MinHash off: it runs on the gathered outputs, the same with or without batches (and takes seconds)
        recipe["sources"] = {"pdfs": {"kind": "pdf", "path": str(folder), "curation": {"minhash": None}}}
        if batches is not None:
            recipe["sources"]["pdfs"]["batches"] = batches
        recipe["mixture"] = {"weights": {"pdfs": 1.0}, "total_tokens": 1000}
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        self.name, self.instance, self.store = name, instance, root / f"store-{name}"
        with self.env():
            self.loaded = load_all([path])
            self.defs = build_definitions(self.loaded)
        self.plans = {p.name: p for p in self.loaded[0].plans.values()}

    def env(self):
        return environment(FOUNDRY_STORE=str(self.store), FOUNDRY_WORKERS="1")

    def states(self):
        from assets.store import ArtifactStore
        from assets.sync import compute_states

        return compute_states(self.instance, self.loaded, ArtifactStore(self.store), data_root())

    def sync(self):
        """sync's rounds, limited to the curation assets: returns its report (ran / cache_hit)."""
        from assets.sync import SyncReport, _run_round, frontier

        report, touched = SyncReport(), set()
        job = self.defs.resolve_implicit_global_asset_job_def()
        with self.env():
            for _ in range(len(STEPS) + 1):
                states = self.states()
                todo = [k for k in frontier(states) if states[k].plan.kind in STEPS]
                if not todo:
                    break
                error = _run_round(job, self.instance, states, todo, report, touched, lambda s: None)
                assert not report.failed, error
        return report

    def materialize(self, partition: str):
        with self.env():
            job = self.defs.resolve_implicit_global_asset_job_def()
            result = job.execute_in_process(instance=self.instance, asset_selection=[self.plans["filtered_pdfs"].key],
                                            partition_key=partition)
        assert result.success
        return result

    def latest(self, asset: str):
        from assets.lineage import latest

        return latest(self.instance, self.plans[asset].key)

    def output(self, asset: str) -> Path:
        return Path(self.latest(asset).path)

    def decisions(self) -> dict[str, tuple]:
        table = pq.read_table(self.output("curated_pdfs") / "decisions.parquet",
                              columns=["file", "doc_id", "kept", "reason", "step", "chars"])
        rows = {r["file"]: (r["doc_id"], r["kept"], r["reason"], r["step"], r["chars"]) for r in table.to_pylist()}
        assert len(rows) == table.num_rows  # one decision row per file
        return rows

    def partitions(self) -> set[str]:
        return set(self.instance.get_dynamic_partitions(self.plans["filtered_pdfs"].partitions))

    def by_partition(self) -> dict:
        from assets.lineage import latest_by_partition

        return latest_by_partition(self.instance, self.plans["filtered_pdfs"].key, sorted(self.partitions()))


def built_partitions(labels: list[str], name: str) -> set[str]:
    prefix = f"{name}/filtered_pdfs["
    return {label[len(prefix):-1] for label in labels if label.startswith(prefix)}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from dagster import DagsterInstance

    root = tmp_path_factory.mktemp("pdf_batches")
    folder = root / "pdfs"
    for name, sample in FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample, folder / name)
    (folder / CUT).write_bytes(CUPERTINO.read_bytes()[: CUPERTINO.stat().st_size // 2])
    (root / "dagster_home").mkdir()
    instance = DagsterInstance.local_temp(str(root / "dagster_home"))
    flat = Workspace(root, "flat", folder, instance, batches=None)
    batched = Workspace(root, "batched", folder, instance, batches=BATCHES)
    reports = {"flat": flat.sync(), "batched": batched.sync()}
    yield {"folder": folder, "flat": flat, "batched": batched, "reports": reports}
    instance.dispose()


def test_a_file_keeps_its_batch_whatever_else_is_in_the_folder():
    names = [f"reports/{i:04d}.pdf" for i in range(500)]
    before = group_names(names[:400], 16)
    after = group_names(names, 16)
    moved = {n for key, members in before.items() for n in members if n not in after[key]}
    assert not moved  # 100 new files changed which batches they joined, and nothing else
    assert set(after) == {f"batch-{i:03d}" for i in range(16)}
    assert group_names(names[:3], None) == {n: [n] for n in names[:3]}  # no batches: a partition per file
    # pinned: another hash would move every file of every batched source to another batch
    assert (batch_of("a.pdf", 5000), batch_of("reports/2024/q1.pdf", 64)) == ("batch-2082", "batch-063")


@pytest.mark.parametrize("value, message", [
    (0, "greater than or equal to 1"), (-3, "greater than or equal to 1"), (70000, "less than or equal to 65536"),
    ("many", "valid integer"), (2.5, "valid integer"), (True, "valid integer"),
])
def test_bad_batches_are_rejected_naming_the_field(value, message):
    recipe = tiny_recipe("bad")
    recipe["sources"]["fineweb"]["batches"] = value
    with pytest.raises(RecipeError) as err:
        parse_recipe(recipe, origin="bad.yaml")
    text = str(err.value)
    assert "bad.yaml" in text and "sources.fineweb.batches" in text and message in text


def test_partitions_are_the_non_empty_batches(ws):
    batched = ws["batched"]
    expected = group_names([*FILES, CUT], BATCHES)
    assert sorted(expected) == ["batch-001", "batch-002"] and len(expected["batch-001"]) == 4  # 8 files, 2 batches
    assert batched.partitions() == set(expected)
    assert batched.plans["filtered_pdfs"].partitions == "batched__pdfs__batches"
    assert built_partitions(ws["reports"]["batched"].ran, "batched") == set(expected)
    for key, rec in batched.by_partition().items():  # each batch records its members' outputs, by content
        members = (Path(rec.path) / "members.json").read_text()
        for name in expected[key]:
            assert f'"{name}"' in members and sha256(ws["folder"] / name) in members
        assert rec.metadata["files"] == len(expected[key])
    flat = ws["flat"]
    assert flat.partitions() == {*FILES, CUT}  # one partition per file without batches


def test_decisions_equal_the_unbatched_build(ws):
    flat, batched = ws["flat"].decisions(), ws["batched"].decisions()
    assert batched == flat
    reasons = {file: row[2] for file, row in batched.items()}
    assert reasons["locked.pdf"] == "encrypted" and reasons["empty.pdf"] == "empty" and reasons[CUT] == "truncated"
    assert reasons["scans/letter.pdf"] == "no_text_layer"
    assert {file for file, row in batched.items() if row[1]} == {"milwaukee.pdf", "cupertino.pdf", "crazyones.pdf",
                                                                 "google-doc.pdf"}
    for file, row in batched.items():  # `file` names each document's own file
        assert row[0] == sha256(ws["folder"] / file)
    queue = pq.read_table(ws["batched"].output("ocr_queue_pdfs") / "ocr_queue.parquet").to_pylist()
    assert [(q["file"], q["reason"]) for q in queue] == [("scans/letter.pdf", "no_text_layer")]


def test_batching_is_in_no_hash(ws):
    flat, batched = ws["flat"].plans, ws["batched"].plans
    for asset in ("raw_pdfs", "filtered_pdfs", "curated_pdfs", "ocr_queue_pdfs"):
        assert flat[asset].code_version == batched[asset].code_version, asset
    curated = [ws[w].output("curated_pdfs") for w in ("flat", "batched")]
    assert curated[0] != curated[1] and curated[0].name == curated[1].name  # two stores, one key
    # built apart: the same tables byte for byte, the same documents (ocr_queue's key differs: its
    # input's data version includes extraction timings)
    for asset, table in (("curated_pdfs", "decisions.parquet"), ("ocr_queue_pdfs", "ocr_queue.parquet")):
        files = [json.loads((ws[w].output(asset) / MANIFEST).read_text())["files"] for w in ("flat", "batched")]
        assert files[0].keys() == files[1].keys() and files[0][table] == files[1][table]
    docs = [kept_documents(ws[w].output("curated_pdfs")) for w in ("flat", "batched")]
    assert len(docs[0]) == 4 and docs[0] == docs[1]


def kept_documents(curated: Path) -> list[dict]:
    """The kept documents in output order, less the one field that differs per run (a timing)."""
    docs = [json.loads(line) for f in sorted(curated.glob("docs/*.jsonl")) for line in f.read_text().splitlines()]
    for doc in docs:
        assert doc["metadata"].pop("extraction_seconds") > 0
    return docs


def test_a_changed_file_changes_the_key_of_its_batch_only(ws):
    from assets.shards import expected_partitions

    plan = ws["batched"].plans["filtered_pdfs"]
    rows = [{"name": name, "sha256": hashlib.sha256(name.encode()).hexdigest()} for name in [*FILES, CUT]]
    before = expected_partitions(plan, rows)
    assert expected_partitions(plan, rows[::-1]) == before  # the listing's order does not matter
    rewritten = [{**row, "sha256": "0" * 64} if row["name"] == "milwaukee.pdf" else row for row in rows]
    after = expected_partitions(plan, rewritten)  # milwaukee.pdf rewritten under the same name
    assert after.keys() == before.keys()
    assert {key for key in before if before[key][0] != after[key][0]} == {batch_of("milwaukee.pdf", BATCHES)}


def test_adding_a_pdf_rebuilds_exactly_its_batch(ws):
    from dagster import build_sensor_context

    batched, folder = ws["batched"], ws["folder"]
    name, sample = ADDED
    target = batch_of(name, BATCHES)
    sensor = batched.defs.resolve_sensor_def("batched__pdfs__batches_sensor")
    with batched.env():
        first = sensor(build_sensor_context(instance=batched.instance, definitions=batched.defs))
        assert not first.run_requests  # every batch was registered and built by sync
        shutil.copyfile(sample, folder / name)
        tick = sensor(build_sensor_context(instance=batched.instance, definitions=batched.defs, cursor=first.cursor))
    assert {r.partition_key for r in tick.run_requests if r.partition_key} == {target}
    assert not tick.dynamic_partitions_requests  # its batch is a partition already

    before = batched.by_partition()
    report = batched.sync()
    assert built_partitions(report.ran, "batched") == {target} and not built_partitions(report.cache_hit, "batched")
    after = batched.by_partition()
    assert after[target].metadata["files_curated"] == 1  # the new file alone was curated
    assert after[target].metadata["files"] == before[target].metadata["files"] + 1
    for key in set(after) - {target}:
        assert after[key].run_id == before[key].run_id  # not run again
    other = sorted(set(after) - {target})[0]
    result = batched.materialize(other)  # asked anyway: a cache hit
    from assets.lineage import of_run

    [rec] = of_run(batched.instance, result.run_id).values()
    assert rec.cache == "hit" and rec.store_key == before[other].store_key
    assert batched.decisions()[name][0] == sha256(sample)


def test_a_removed_file_drops_from_its_batch(ws):
    from dagster import build_sensor_context

    batched, folder = ws["batched"], ws["folder"]
    target = batch_of(REMOVED, BATCHES)
    sensor = batched.defs.resolve_sensor_def("batched__pdfs__batches_sensor")
    with batched.env():
        first = sensor(build_sensor_context(instance=batched.instance, definitions=batched.defs))
        (folder / REMOVED).unlink()
        tick = sensor(build_sensor_context(instance=batched.instance, definitions=batched.defs, cursor=first.cursor))
    assert {r.partition_key for r in tick.run_requests if r.partition_key} == {target}
    report = batched.sync()
    assert built_partitions(report.ran, "batched") == {target}
    rec = batched.by_partition()[target]
    assert rec.metadata["files_curated"] == 0  # what remains was curated before
    assert f'"{REMOVED}"' not in (Path(rec.path) / "members.json").read_text()
    decisions = batched.decisions()
    assert REMOVED not in decisions and {"crazyones.pdf", "cupertino.pdf", "scans/letter.pdf"} <= set(decisions)
