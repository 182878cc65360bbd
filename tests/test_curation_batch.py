"""Several files curated in one datatrove run give exactly what separate runs per file give."""

from __future__ import annotations

from pathlib import Path

from assets.recipe import CurationSpec
from assets.settings import data_root
from dataprep.curate import run_curation, run_curation_per_file


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_batch_run_matches_runs_per_file(tmp_path):
    files = sorted((data_root() / "web" / "commoncrawl_raw").glob("*.gz"))[:3]
    curation = CurationSpec(language={}, pii={}).model_dump(mode="json")
    alone, batch = [], []
    for i, f in enumerate(files):
        out = tmp_path / "alone" / str(i)
        alone.append(run_curation([f], "jsonl", "text", "id", 30, 2, curation, out, workers=1))
    outs = [tmp_path / "batch" / str(i) for i in range(len(files))]
    batch = run_curation_per_file(files, "jsonl", "text", "id", 30, 2, curation, outs, workers=2)
    assert batch == alone
    for i in range(len(files)):
        a, b = _tree(tmp_path / "alone" / str(i)), _tree(outs[i])
        assert a.keys() == b.keys() and a == b
        assert "decisions.parquet" in a and any(k.startswith("docs/") for k in a)
    assert not list((tmp_path / "batch").glob("*.batch"))  # the shared work folder is gone
