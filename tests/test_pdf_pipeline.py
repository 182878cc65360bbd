"""A folder of PDFs end to end on a real Dagster instance: raw -> one partition per file ->
curated (PDF curation defaults) -> ocr_queue -> tokenized -> mixture, with the stats tables.

The folder is made in tmp from the sample PDFs: two documents worth keeping, blind text, an
encrypted, an empty and a cut file, and (in a subfolder) a scan with an old OCR layer and a scan
with no text layer at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml

from assets.settings import data_root
from tests.recipes import tiny_recipe
from tests.support.environ import restore_environ

PDF = data_root() / "pdf"
pytestmark = [pytest.mark.skipif(not PDF.is_dir(), reason=f"sample PDFs not found under {PDF}"),
              pytest.mark.slow]  # ~2 min on 2 cores: curation, tokenizer, a 6-step model and lighteval

PAPER = PDF / "pdfplumber" / "issue-982-example.pdf"
FILES = {  # name in the source folder -> sample
    "paper.pdf": PAPER,
    "federal-register.pdf": PDF / "pdfplumber" / "federal-register-2020-17221.pdf",
    "blind-text.pdf": PDF / "pypdf_samples" / "pdflatex-4-pages.pdf",
    "locked.pdf": PDF / "pdfplumber" / "password-example.pdf",
    "empty.pdf": PDF / "pdfplumber" / "empty.pdf",
    "scans/old-ocr-layer.pdf": PDF / "olmocr" / "gnarly" / "horribleocr.pdf",
    "scans/letter.pdf": PDF / "olmocr" / "bench_sample" / "pdfs" / "lincoln_letter.pdf",
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from dagster import DagsterInstance

    from assets.definitions import build_definitions, load_all
    from assets.sync import sync

    root = tmp_path_factory.mktemp("pdf_pipeline")
    folder = root / "reports"
    for name, sample in FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample, folder / name)
    (folder / "cut.pdf").write_bytes(PAPER.read_bytes()[: PAPER.stat().st_size // 2])
    (folder / "notes.txt").write_text("not a PDF: not part of the source\n")

    recipe = tiny_recipe("pdfmix")
    del recipe["sources"]["commoncrawl"]
    recipe["sources"]["reports"] = {"kind": "pdf", "path": str(folder)}  # curation: the PDF defaults
    recipe["mixture"] = {"weights": {"fineweb": 0.8, "reports": 0.2}, "total_tokens": 30000}
    path = root / "pdfmix.yaml"
    path.write_text(yaml.safe_dump(recipe))

    saved = {k: os.environ.get(k) for k in ("FOUNDRY_STORE", "FOUNDRY_WORKERS")}
    os.environ.update(FOUNDRY_STORE=str(root / "store"), FOUNDRY_WORKERS="1")
    (root / "dagster_home").mkdir()
    instance = DagsterInstance.local_temp(str(root / "dagster_home"))
    loaded = load_all([path])
    t0 = time.time()
    report = sync(build_definitions(loaded), loaded, instance)
    seconds = time.time() - t0
    assert report.error is None, report.error
    yield {"root": root, "folder": folder, "store": root / "store", "instance": instance, "loaded": loaded,
           "report": report.as_json(), "seconds": seconds}
    instance.dispose()
    restore_environ(saved)


def test_every_asset_of_the_pdf_source_is_built(built):
    ran = {label.split("/", 1)[1] for label in built["report"]["ran"]}
    assert {"raw_reports", "curated_reports", "ocr_queue_reports", "tokenized_reports", "mixture", "data_stats"} <= ran
    partitions = {label.split("[", 1)[1].rstrip("]") for label in ran if label.startswith("filtered_reports[")}
    assert partitions == {*FILES, "cut.pdf"}  # one partition per PDF, subfolders included, other files not
    print(f"\nPDF pipeline: first sync {built['seconds']:.1f}s")


def test_curation_rows_name_the_pdf_source_with_exact_reasons(built):
    from assets.stats import query

    _, rows = query(built["store"], "select file, doc_id, kept, reason, step, chars from curation "
                                    "where recipe = 'pdfmix' and source = 'reports' order by file")
    by_file = {r[0]: r[1:] for r in rows}
    assert set(by_file) == {*FILES, "cut.pdf"}
    reasons = {f: r[2] for f, r in by_file.items()}
    assert reasons == {
        "paper.pdf": None, "federal-register.pdf": None,  # kept under the PDF defaults
        "blind-text.pdf": "gopher_repetition:dup_line_char_frac",
        "locked.pdf": "encrypted", "empty.pdf": "empty", "cut.pdf": "truncated",
        "scans/old-ocr-layer.pdf": "needs_ocr", "scans/letter.pdf": "no_text_layer",
    }
    assert by_file["paper.pdf"][0] == sha256(PAPER) and by_file["paper.pdf"][1]
    assert by_file["locked.pdf"][3] == "reader" and by_file["paper.pdf"][4] > 20_000


def test_kept_documents_carry_the_pdf_metadata(built):
    docs = [json.loads(line) for f in (built["store"] / "curated").glob("*/docs/*.jsonl")
            for line in f.read_text().splitlines()]
    [paper] = [d for d in docs if d["id"] == sha256(PAPER)]
    meta = paper["metadata"]
    assert (meta["pages"], meta["producer"]) == (8, "pdfTeX-1.40.12")
    assert (meta["encrypted"], meta["needs_ocr"]) == (False, False)
    assert meta["chars"] == len(paper["text"]) and meta["extraction_seconds"] > 0 and meta["file"] == "paper.pdf"
    offsets = meta["page_offsets"]
    assert len(offsets) == 8 and offsets[0] == 0
    # no step rewrote the text, so the page boundaries still hold: each page starts after a blank line
    assert all(paper["text"][o - 2:o] == "\n\n" for o in offsets[1:])
    assert "Creativity in Machine Learning" in paper["text"][: offsets[1]]


def test_ocr_queue_lists_the_scans_with_scores(built):
    from dagster import AssetKey

    from assets import lineage
    from assets.stats import query

    cols, rows = query(built["store"], "select source, file, pages, ocr_score, reason, doc_id from ocr_queue "
                                       "where recipe = 'pdfmix' order by ocr_score desc, file")
    assert cols[:5] == ["source", "file", "pages", "ocr_score", "reason"]
    assert [(r[0], r[1], r[2], r[4]) for r in rows] == [
        ("reports", "scans/letter.pdf", 1, "no_text_layer"), ("reports", "scans/old-ocr-layer.pdf", 1, "needs_ocr")]
    assert rows[0][3] == 1.0 and 0.5 <= rows[1][3] < 1.0
    assert rows[1][5] == sha256(built["folder"] / "scans" / "old-ocr-layer.pdf")
    meta = lineage.latest(built["instance"], AssetKey(["pdfmix", "ocr_queue_reports"])).metadata
    assert (meta["queued"], meta["queued_pages"], meta["documents"]) == (2, 2, 8)
    assert "| scans/letter.pdf | 1 | 1.000 | `no_text_layer` |" in meta["top_entries"]


def test_the_mixture_draws_tokens_from_the_pdf_source(built):
    from assets.stats import query

    _, rows = query(built["store"], "select source, tokens, documents from mixture where recipe = 'pdfmix' "
                                    "order by source")
    by = {r[0]: r[1:] for r in rows}
    assert set(by) == {"fineweb", "reports"}
    assert by["reports"][0] > 0 and by["reports"][1] >= 1
    _, tokens = query(built["store"], "select source, documents from tokens where recipe = 'pdfmix' order by 1")
    assert dict(tokens)["reports"] == 2  # the two kept PDFs


def test_a_second_sync_changes_nothing(built):
    from assets.sync import compute_states

    states = compute_states(built["instance"], built["loaded"])
    assert {s.plan.name for s in states.values() if s.status != "fresh"} == set()
