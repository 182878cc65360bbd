"""Foundry's curation keeps exactly the documents a bare datatrove pipeline keeps.

Same input, same filters and parameters: `run_curation` (Judged filters, decision rows,
round-robin shards) against `benchmarks.bare_datatrove` (JsonlReader -> datatrove filters ->
JsonlWriter, nothing from Foundry). Foundry deals documents round-robin to its shards while
JsonlReader gives whole files to tasks, so the kept ids are compared as sets.

The two sides run at once (the bare one in a second process) to use both cores.
"""

from __future__ import annotations

import gzip
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from assets.recipe import CurationSpec
from benchmarks.bare_datatrove import run_bare
from dataprep.curate import run_curation

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "web"
FINEWEB = DATA / "fineweb_sample" / "fineweb_legal_dedup.jsonl.gz"
COMMONCRAWL = DATA / "commoncrawl_raw"

pytestmark = [
    pytest.mark.skipif(not FINEWEB.is_file(), reason="sample data not found"),
    # datatrove's URLFilter reads tldextract's renamed property (both sides alike)
    pytest.mark.filterwarnings("ignore:The 'registered_domain' property is deprecated:DeprecationWarning"),
]

DEFAULT = CurationSpec().model_dump(mode="json")
WEB = CurationSpec(url_filter={}, language={}).model_dump(mode="json")


def commoncrawl_files() -> list[Path]:
    return sorted(p for p in COMMONCRAWL.iterdir() if p.name.endswith((".jsonl.gz", ".json.gz")))


def fineweb_slice(folder: Path, start: int, stop: int) -> Path:
    """FineWeb documents start..stop-1, as a jsonl.gz of their own."""
    target = folder / f"fineweb_{start}_{stop}.jsonl.gz"
    with gzip.open(FINEWEB, "rb") as src, gzip.open(target, "wb") as dst:
        for i, line in enumerate(src):
            if i >= stop:
                break
            if i >= start:
                dst.write(line)
    return target


def commoncrawl_flat(folder: Path, n: int | None = None) -> Path:
    """commoncrawl_raw documents with their url copied to the top level (where Foundry's reader reads it)."""
    target = folder / f"commoncrawl_flat_{n or 'all'}.jsonl.gz"
    written = 0
    with gzip.open(target, "wt", encoding="utf-8") as dst:
        for path in commoncrawl_files():
            with gzip.open(path, "rt", encoding="utf-8") as src:
                for line in src:
                    if n is not None and written == n:
                        return target
                    record = json.loads(line)
                    record["url"] = record["metadata"]["url"]
                    dst.write(json.dumps(record) + "\n")
                    written += 1
    return target


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("equivalence-inputs")
    return {
        "fineweb_40": fineweb_slice(folder, 0, 40),
        "fineweb_270_330": fineweb_slice(folder, 270, 330),  # two of them on datatrove's domain block list
        "fineweb_400": fineweb_slice(folder, 0, 400),
        "commoncrawl_flat_200": commoncrawl_flat(folder, 200),  # one url with a banned word, non-English pages
        "commoncrawl_flat": commoncrawl_flat(folder),
    }


def foundry_kept(files: list[Path], curation: dict, out: Path, shards: int) -> tuple[set[str], dict[str, str]]:
    """Kept ids as written to docs/, and every dropped id's reason from decisions.parquet."""
    counts = run_curation(files=files, kind="jsonl", text_key="text", id_key="id", limit=None, shards=shards,
                          curation=curation, out_dir=out, workers=1)
    kept = {json.loads(line)["id"] for part in sorted((out / "docs").glob("*.jsonl"))
            for line in part.read_text().splitlines()}
    rows = pq.read_table(out / "decisions.parquet", columns=["doc_id", "kept", "reason"]).to_pylist()
    assert counts["kept"] == len(kept) == sum(r["kept"] for r in rows)
    return kept, {r["doc_id"]: r["reason"] for r in rows if not r["kept"]}


def _warm_up() -> None:
    from datatrove.utils.word_tokenizers import load_word_tokenizer

    load_word_tokenizer("en").word_tokenize("warm up")  # spaCy's blank English pipeline


@pytest.fixture(scope="module")
def bare_side():
    """One process, kept for the module, that runs the bare pipelines beside Foundry's."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(_warm_up)  # start it, its imports and spaCy now, while Foundry's side starts
        yield pool


def compare(pool: ProcessPoolExecutor, files: list[Path], curation: dict, tmp: Path,
            shards: int = 2) -> tuple[set[str], set[str], dict]:
    """(Foundry's kept ids, bare datatrove's kept ids, Foundry's drop reasons), both run at once."""
    bare = pool.submit(run_bare, files, curation, tmp / "bare", tasks=len(files), workers=1)
    foundry, reasons = foundry_kept(files, curation, tmp / "foundry", shards)
    bare_ids = bare.result()
    assert len(bare_ids) == len(set(bare_ids)), "bare pipeline wrote a document twice"
    return foundry, set(bare_ids), reasons


def assert_same(foundry: set[str], bare: set[str], reasons: dict[str, str]) -> None:
    only_bare = sorted(bare - foundry)
    only_foundry = sorted(foundry - bare)
    assert not only_bare and not only_foundry, (
        f"kept only by bare datatrove: {[(i, reasons.get(i)) for i in only_bare[:10]]} ({len(only_bare)}); "
        f"kept only by Foundry: {only_foundry[:10]} ({len(only_foundry)})"
    )


def test_default_chain_keeps_what_bare_datatrove_keeps(bare_side, inputs, tmp_path):
    """FineWeb head + every commoncrawl_raw file, one source, the four quality filters."""
    files = [inputs["fineweb_40"], *commoncrawl_files()]
    foundry, bare, reasons = compare(bare_side, files, DEFAULT, tmp_path, shards=2)
    assert 100 < len(foundry) < 40 + 727  # the filters keep some and drop some
    assert_same(foundry, bare, reasons)


def test_web_chain_keeps_what_bare_datatrove_keeps(bare_side, inputs, tmp_path):
    """URL filter + language ID + the quality filters, on documents with a top-level url."""
    files = [inputs["fineweb_270_330"], inputs["commoncrawl_flat_200"]]
    foundry, bare, reasons = compare(bare_side, files, WEB, tmp_path, shards=1)
    assert len(foundry) > 40
    steps = {reason.split(":")[0] for reason in reasons.values()}
    assert {"url_filter", "language"} <= steps, steps  # both steps drop something here
    assert_same(foundry, bare, reasons)


@pytest.mark.slow
@pytest.mark.parametrize("chain", ["default", "web"])
def test_larger_samples_keep_the_same(bare_side, inputs, tmp_path, chain):
    curation = DEFAULT if chain == "default" else WEB
    files = [inputs["fineweb_400"], inputs["commoncrawl_flat"]]
    foundry, bare, reasons = compare(bare_side, files, curation, tmp_path, shards=3)
    assert_same(foundry, bare, reasons)


@pytest.mark.slow
def test_web_chain_on_nested_metadata_urls(bare_side, tmp_path):
    """Dolma/CCNet records keep the url under `metadata`: both readers must lift it for the URL filter."""
    foundry, bare, reasons = compare(bare_side, commoncrawl_files(), WEB, tmp_path, shards=2)
    assert bare, "the bare pipeline keeps some commoncrawl documents"
    assert_same(foundry, bare, reasons)
