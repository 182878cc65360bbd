"""MinHash dedup with real datatrove stages on real FineWeb text, planted near-duplicates."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.minhash import (
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers.jsonl import JsonlWriter

from dataprep.dedup import minhash_config, resolve_spec, run_minhash_dedup

SAMPLE = Path("/work/shared/data/web/fineweb_sample/fineweb_legal_dedup.jsonl.gz")
N_DOCS = 300
TEXT_CHARS = 2000  # truncated texts keep the signature stage (spaCy tokenizing) fast
N_CLUSTERS = 20  # originals that get planted copies; every 4th gets two copies
TASKS = 3


def sample_docs() -> list[dict]:
    docs = []
    with gzip.open(SAMPLE, "rt") as f:
        for line in f:
            row = json.loads(line)
            docs.append({"id": row["id"], "text": row["text"][:TEXT_CHARS], "metadata": {"url": row["url"]}})
            if len(docs) == N_DOCS:
                return docs
    raise AssertionError("sample too small")


def near_copy(doc: dict, tag: str, seed: int) -> dict:
    """The document with 3 words replaced: near-identical, but not byte-identical."""
    words = doc["text"].split(" ")
    rng = random.Random(seed)
    for pos in rng.sample(range(len(words)), 3):
        words[pos] = f"qzx{tag}{pos}"
    return {"id": f"{doc['id']}#copy{tag}", "text": " ".join(words), "metadata": dict(doc["metadata"])}


def write_jsonl(path: Path, docs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))


def build_input(root: Path) -> tuple[list[Path], dict[str, list[str]]]:
    """Originals in 3 partition folders, copies in a later file than their original.

    Returns the files in reading order and {original id: [original id, copy ids...]}.
    """
    docs = sample_docs()
    parts: list[list[dict]] = [docs[0:100], docs[100:200], docs[200:300], []]
    clusters: dict[str, list[str]] = {}
    for i in range(N_CLUSTERS):
        source = (i % 3) * 100 + i  # originals from all three files
        original = docs[source]
        n_copies = 2 if i % 4 == 0 else 1
        clusters[original["id"]] = [original["id"]]
        for c in range(n_copies):
            copy = near_copy(original, f"{i}_{c}", seed=i * 10 + c)
            later = min(source // 100 + 1 + c, 3)  # a later file, so the original comes first
            parts[later].append(copy)
            clusters[original["id"]].append(copy["id"])
    files = [root / f"part={k}" / "00000.jsonl" for k in range(4)]
    for path, part in zip(files, parts, strict=True):
        write_jsonl(path, part)
    return files, clusters


def dedup(files: list[Path], base: Path, tasks: int = TASKS, workers: int = 1, spec: dict | None = None) -> dict:
    return run_minhash_dedup(
        files, base / "out", spec or {}, tasks=tasks, workers=workers, work_dir=base / "work", logs_dir=base / "logs"
    )


def read_ids(folder: Path) -> list[str]:
    return [json.loads(line)["id"] for p in sorted(folder.glob("*.jsonl")) for line in p.read_text().splitlines()]


def input_ids(files: list[Path]) -> list[str]:
    return [json.loads(line)["id"] for p in files for line in p.read_text().splitlines()]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("dedup")
    files, clusters = build_input(root / "in")
    result = dedup(files, root / "w1")
    return root, files, clusters, result


def test_planted_copies_removed_one_per_cluster_kept(planted):
    root, files, clusters, result = planted
    out = root / "w1" / "out"
    copies = {c for members in clusters.values() for c in members[1:]}
    all_ids = input_ids(files)

    kept, excluded = read_ids(out / "docs"), read_ids(out / "excluded" / "minhash")
    assert sorted(excluded) == sorted(copies)
    assert kept == [i for i in all_ids if i not in copies]  # originals and unrelated docs, in input order
    assert sorted(p.name for p in (out / "docs").iterdir()) == [f"{r:05d}.jsonl" for r in range(TASKS)]
    assert result == {
        "documents": len(all_ids),
        "duplicates": len(copies),
        "clusters": N_CLUSTERS,
        "largest_cluster": 3,
    }

    table = pq.read_table(out / "dedup.parquet")
    assert [str(f.type) for f in table.schema] == ["string", "bool", "int64", "int64"]
    rows = table.to_pylist()
    assert [r["doc_id"] for r in rows] == all_ids
    by_id = {r["doc_id"]: r for r in rows}
    seen_cluster_ids = set()
    for members in clusters.values():
        cids = {by_id[m]["cluster_id"] for m in members}
        assert len(cids) == 1 and None not in cids
        seen_cluster_ids |= cids
        assert all(by_id[m]["cluster_size"] == len(members) for m in members)
        assert [by_id[m]["duplicate"] for m in members] == [False] + [True] * (len(members) - 1)
    assert len(seen_cluster_ids) == N_CLUSTERS
    in_cluster = {m for members in clusters.values() for m in members}
    for r in rows:
        if r["doc_id"] not in in_cluster:
            assert (r["duplicate"], r["cluster_id"], r["cluster_size"]) == (False, None, 1)

    # kept documents keep their metadata and carry datatrove's cluster fields, matching the parquet
    for line in (out / "docs" / "00000.jsonl").read_text().splitlines():
        doc = json.loads(line)
        row = by_id[doc["id"]]
        assert doc["metadata"]["url"].startswith("http")
        assert doc["metadata"]["minhash_cluster_size"] == row["cluster_size"]
        assert doc["metadata"]["minhash_cluster_id"] == (-1 if row["cluster_id"] is None else row["cluster_id"])


def bare_datatrove_kept(in_root: Path, base: Path, tasks: int) -> set[str]:
    """The four stages wired the way datatrove's own example does, on the same files."""
    config = minhash_config(resolve_spec({}))
    sigs, buckets, clusters, out = (base / n for n in ("sigs", "buckets", "clusters", "out"))

    def reader():
        return JsonlReader(str(in_root), glob_pattern="*/*.jsonl")

    stages = [
        ([reader(), MinhashDedupSignature(str(sigs), config=config)], tasks),
        ([MinhashDedupBuckets(str(sigs), str(buckets), config=config)], config.num_buckets),
        ([MinhashDedupCluster(str(buckets), str(clusters), config=config)], 1),
        ([reader(), MinhashDedupFilter(str(clusters)), JsonlWriter(str(out), compression=None)], tasks),
    ]
    for i, (pipeline, n) in enumerate(stages):
        LocalPipelineExecutor(pipeline, tasks=n, workers=1, logging_dir=str(base / f"logs{i}")).run()
    return set(read_ids(out))


def test_same_kept_set_as_bare_datatrove(planted):
    root, files, _, _ = planted
    bare = bare_datatrove_kept(root / "in", root / "bare", tasks=1)
    ours = dedup(files, root / "t1", tasks=1)
    assert set(read_ids(root / "t1" / "out" / "docs")) == bare
    assert ours["duplicates"] == len(input_ids(files)) - len(bare)

    # cluster membership does not depend on how documents are dealt to tasks
    def partition(run: Path) -> set[frozenset]:
        groups: dict[int, set] = {}
        for r in pq.read_table(run / "out" / "dedup.parquet").to_pylist():
            if r["cluster_id"] is not None:
                groups.setdefault(r["cluster_id"], set()).add(r["doc_id"])
        return {frozenset(g) for g in groups.values()}

    assert partition(root / "t1") == partition(root / "w1")


def test_output_identical_for_any_workers(planted):
    root, files, _, _ = planted
    dedup(files, root / "w2", workers=2)
    names = ["dedup.parquet"] + [f"{d}/{r:05d}.jsonl" for d in ("docs", "excluded/minhash") for r in range(TASKS)]
    for name in names:
        assert (root / "w1" / "out" / name).read_bytes() == (root / "w2" / "out" / name).read_bytes(), name


@pytest.mark.parametrize("n_files", [0, 2])
def test_zero_documents(tmp_path, n_files):
    files = [tmp_path / "in" / f"p{k}" / "00000.jsonl" for k in range(n_files)]
    for path in files:
        write_jsonl(path, [])
    result = dedup(files, tmp_path, tasks=2)
    assert result == {"documents": 0, "duplicates": 0, "clusters": 0, "largest_cluster": 0}
    out = tmp_path / "out"
    for folder in (out / "docs", out / "excluded" / "minhash"):
        assert [(p.name, p.stat().st_size) for p in sorted(folder.iterdir())] == [("00000.jsonl", 0), ("00001.jsonl", 0)]
    table = pq.read_table(out / "dedup.parquet")
    assert table.num_rows == 0 and table.column_names == ["doc_id", "duplicate", "cluster_id", "cluster_size"]


def test_short_and_empty_documents_pass_through(tmp_path):
    # fewer words than n_grams: no shingles, so no signature; even exact copies are not seen
    docs = [
        {"id": "a", "text": "Too short.", "metadata": {}},
        {"id": "b", "text": "Too short.", "metadata": {}},
        {"id": "c", "text": "", "metadata": {"k": 1}},
    ]
    files = [tmp_path / "in" / "p0" / "00000.jsonl"]
    write_jsonl(files[0], docs)
    result = dedup(files, tmp_path, tasks=2)
    assert result == {"documents": 3, "duplicates": 0, "clusters": 0, "largest_cluster": 1}
    assert read_ids(tmp_path / "out" / "docs") == ["a", "b", "c"]


def test_unknown_spec_key_rejected(tmp_path):
    with pytest.raises(ValueError, match="n_gram"):
        dedup([], tmp_path, spec={"n_gram": 3})
