"""MinHash near-duplicate removal across all shards of one source, with datatrove's own stages.

`run_minhash_dedup` runs datatrove 0.10.1's four MinHash stages, one executor each (local
processes by default, Slurm or Ray through `dataprep.executors`):

1. signatures  `DealtJsonlReader -> MinhashDedupSignature`                    (`tasks` ranks)
2. buckets     `MinhashDedupBuckets`                                          (`num_buckets` ranks)
3. clusters    `MinhashDedupCluster`                                          (1 rank)
4. filter      `DealtJsonlReader -> MinhashDedupFilter -> JsonlWriter`        (`tasks` ranks)

datatrove names a document by (rank, index within the rank's stream), so stages 1 and 4 must
see the same documents in the same order per rank. `DealtJsonlReader` guarantees that: the
documents of all input files, in list order, are cut into `tasks` contiguous runs, so rank r
always gets the same run, whatever `workers` is. Reading rank 0, 1, ... in turn therefore gives
the input order back, and the output depends on the input and `tasks` only.

Outputs in `out_dir`:
- `docs/<rank:05d>.jsonl`: kept documents (metadata plus `minhash_cluster_id`, -1 when the
  document is in no cluster, and `minhash_cluster_size`, 1 when in none).
- `excluded/minhash/<rank:05d>.jsonl`: the removed duplicates, same format.
- `dedup.parquet`: one row per input document, in input order: doc_id, duplicate,
  cluster_id (null when in no cluster), cluster_size (1 when in no cluster).
Every rank gets both JSONL files, empty ones included, so readers see `tasks` files.

A line whose text is empty is kept as a document: it has no shingles, so no signature and no
cluster, and it passes through (datatrove's JsonlWriter then leaves the empty "text" out).
"""

from __future__ import annotations

import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from datatrove.data import Document, DocumentsPipeline, Media
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.writers.jsonl import JsonlWriter
from datatrove.utils.hashing import HashConfig
from datatrove.utils.typeshelper import Languages

from .executors import ExecutorSettings, make_executor, run_executor

# spec key -> default. n_grams .. seed are MinhashConfig's own fields and defaults; hash_fc is
# HashConfig's hash function ("xxhash" or "sha1"); language picks datatrove's word tokenizer for
# shingling. Hash precision stays at datatrove's default of 64 bits.
SPEC_DEFAULTS: dict = {
    "n_grams": 5,
    "num_buckets": 14,
    "hashes_per_bucket": 8,
    "seed": 1,
    "hash_fc": "xxhash",
    "language": Languages.english,
}

CLUSTER_ID_KEY = "minhash_cluster_id"  # names datatrove's MinhashDedupFilter writes
CLUSTER_SIZE_KEY = "minhash_cluster_size"

PARQUET_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("duplicate", pa.bool_()),
        ("cluster_id", pa.int64()),
        ("cluster_size", pa.int64()),
    ]
)


# --------------------------------------------------------------------- reading


def count_documents(path: Path) -> int:
    """Documents in a JSONL file: its non-blank lines."""
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def rank_range(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous run [start, end) of global document indices that `rank` owns."""
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def to_document(record: dict, path: str, index: int) -> Document:
    """A JSONL record as datatrove's default reader adapter builds it, empty text included."""
    metadata = record.pop("metadata", None) or {}
    text = record.pop("text", None) or ""
    doc_id = record.pop("id", None)
    media = [Media(**m) for m in record.pop("media", None) or []]
    return Document(
        text=text,
        id=str(doc_id) if doc_id is not None else f"{path}/{index}",
        media=media,
        metadata=metadata | record,  # stray top-level keys land in metadata, as in datatrove
    )


class DealtJsonlReader(PipelineStep):
    """Reads one rank's contiguous run of the documents of `files` (in list order).

    `counts` (documents per file) is computed once by the caller, so a rank can skip whole
    files without opening them and every stage deals exactly the same runs.
    """

    type = "📖 - READER"
    name = "🐿 Dealt JSONL"

    def __init__(self, files: list[str], counts: list[int]):
        super().__init__()
        if len(files) != len(counts):
            raise ValueError("files and counts differ in length")
        self.files = files
        self.counts = counts

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        start, end = rank_range(sum(self.counts), rank, world_size)
        first = 0  # global index of the current file's first document
        for path, count in zip(self.files, self.counts, strict=True):
            if first < end and first + count > start:
                yield from self._read(path, max(start - first, 0), min(end - first, count))
            first += count

    def _read(self, path: str, lo: int, hi: int) -> Iterator[Document]:
        """Documents lo..hi-1 of one file."""
        index = 0
        with open(path, "rb") as f:
            for line in f:
                if not line.strip():
                    continue
                if index >= hi:
                    return
                if index >= lo:
                    with self.track_time():
                        doc = to_document(orjson.loads(line), path, index)
                    self.stat_update("documents")
                    self.update_doc_stats(doc)
                    yield doc
                index += 1


# --------------------------------------------------------------------- stages


def resolve_spec(spec: dict | None) -> dict:
    spec = dict(spec or {})
    unknown = sorted(set(spec) - set(SPEC_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown minhash spec keys {unknown}; known: {sorted(SPEC_DEFAULTS)}")
    return SPEC_DEFAULTS | spec


def minhash_config(spec: dict) -> MinhashConfig:
    return MinhashConfig(
        n_grams=int(spec["n_grams"]),
        num_buckets=int(spec["num_buckets"]),
        hashes_per_bucket=int(spec["hashes_per_bucket"]),
        seed=int(spec["seed"]),
        hash_config=HashConfig(precision=64, hash_fc=spec["hash_fc"]),
    )


def run_stage(pipeline: list, tasks: int, workers: int, logs: Path, executor: ExecutorSettings | None = None) -> None:
    # skip_completed=False (make_executor): a rerun into old logs must recompute, never trust
    # stale work files. Stages run one after the other: Python runs between them.
    settings = executor or ExecutorSettings()
    run_executor(make_executor(pipeline, tasks, workers, str(logs), settings, job_name=f"minhash-{logs.name}"), settings)


def fill_missing_cluster_files(clusters: Path, tasks: int) -> None:
    """Give every rank (possibly empty) .remove/.clusters/.sizes files.

    datatrove's filter passes a rank through untouched, without cluster metadata, when it has
    no .remove file, i.e. when none of its documents is removed even if some are kept cluster
    members. Empty files make it tag every document the same way.
    """
    clusters.mkdir(parents=True, exist_ok=True)
    for rank in range(tasks):
        for suffix in ("remove", "clusters", "sizes"):
            (clusters / f"{rank:06d}.{suffix}").touch(exist_ok=True)


def ensure_rank_files(folder: Path, tasks: int) -> None:
    """JsonlWriter creates a file only on its first document; empty ranks get an empty one."""
    folder.mkdir(parents=True, exist_ok=True)
    for rank in range(tasks):
        (folder / f"{rank:05d}.jsonl").touch(exist_ok=True)


# --------------------------------------------------------------------- report


def read_removed(path: Path) -> set[int]:
    """Document indices listed in one rank's .remove file (little-endian uint32)."""
    raw = path.read_bytes()
    return {v for (v,) in struct.iter_unpack("<I", raw)}


def read_jsonl(path: Path) -> Iterator[dict]:
    with open(path, "rb") as f:
        for line in f:
            yield orjson.loads(line)


def rank_rows(kept: Path, excluded: Path, removed: set[int]) -> Iterator[tuple]:
    """(doc_id, duplicate, cluster_id, cluster_size) per input document of one rank, in order.

    The filter numbered the rank's stream 0, 1, ...; an index in `removed` went to the
    exclusion file, any other to the kept file, each in stream order, so merging restores it.
    """
    kept_it, excluded_it = read_jsonl(kept), read_jsonl(excluded)
    index = 0
    while True:
        duplicate = index in removed
        record = next(excluded_it if duplicate else kept_it, None)
        if record is None:
            break
        meta = record.get("metadata", {})
        cluster_id = meta.get(CLUSTER_ID_KEY, -1)
        yield (
            record["id"],
            duplicate,
            None if cluster_id < 0 else cluster_id,
            meta.get(CLUSTER_SIZE_KEY, 1),
        )
        index += 1
    if next(kept_it, None) is not None or next(excluded_it, None) is not None:
        raise RuntimeError(f"kept/excluded files of {kept.name} disagree with the .remove file")


def write_report(out_dir: Path, clusters: Path, tasks: int) -> dict:
    rows: list[tuple] = []
    for rank in range(tasks):
        name = f"{rank:05d}.jsonl"
        removed = read_removed(clusters / f"{rank:06d}.remove")
        rows.extend(rank_rows(out_dir / "docs" / name, out_dir / "excluded" / "minhash" / name, removed))
    columns = list(zip(*rows, strict=True)) if rows else [[] for _ in PARQUET_SCHEMA]
    arrays = [pa.array(c, type=f.type) for c, f in zip(columns, PARQUET_SCHEMA, strict=True)]
    table = pa.Table.from_arrays(arrays, schema=PARQUET_SCHEMA)
    pq.write_table(table, out_dir / "dedup.parquet")
    return {
        "documents": len(rows),
        "duplicates": sum(1 for r in rows if r[1]),
        "clusters": len({r[2] for r in rows if r[2] is not None}),
        "largest_cluster": max((r[3] for r in rows), default=0),
    }


# --------------------------------------------------------------------- entry point


def run_minhash_dedup(
    doc_files: list[Path],
    out_dir: Path,
    spec: dict,
    tasks: int,
    workers: int,
    work_dir: Path,
    logs_dir: Path,
    executor: ExecutorSettings | None = None,
) -> dict:
    """Remove near-duplicates across `doc_files` (uncompressed JSONL, read in list order).

    `tasks` sets how the documents are dealt (and so the output files and which member of a
    cluster datatrove keeps); `workers` only sets parallelism and never changes the output.
    Returns {"documents", "duplicates", "clusters" (size > 1), "largest_cluster"}.
    """
    if tasks < 1:
        raise ValueError(f"tasks must be >= 1, got {tasks}")
    spec = resolve_spec(spec)
    config = minhash_config(spec)
    out_dir, work_dir, logs_dir = Path(out_dir), Path(work_dir), Path(logs_dir)
    sigs, buckets, clusters = work_dir / "signatures", work_dir / "buckets", work_dir / "clusters"
    docs_dir, excluded_dir = out_dir / "docs", out_dir / "excluded" / "minhash"
    # leftovers of an earlier run (other tasks count) would be listed and read as ours
    for stale in (sigs, buckets, clusters, docs_dir, excluded_dir):
        shutil.rmtree(stale, ignore_errors=True)
    (out_dir / "dedup.parquet").unlink(missing_ok=True)

    files = [str(Path(p)) for p in doc_files]
    counts = [count_documents(Path(p)) for p in files]

    run_stage(
        [DealtJsonlReader(files, counts), MinhashDedupSignature(str(sigs), config=config, language=spec["language"])],
        tasks, workers, logs_dir / "signatures", executor,
    )
    run_stage(
        [MinhashDedupBuckets(str(sigs), str(buckets), config=config)],
        config.num_buckets, workers, logs_dir / "buckets", executor,
    )
    run_stage(
        [MinhashDedupCluster(str(buckets), str(clusters), config=config, save_cluster_id=True,
                             save_cluster_size=True)],
        1, 1, logs_dir / "clusters", executor,
    )
    fill_missing_cluster_files(clusters, tasks)
    run_stage(
        [
            DealtJsonlReader(files, counts),
            MinhashDedupFilter(
                str(clusters),
                exclusion_writer=JsonlWriter(str(excluded_dir), compression=None),
                load_cluster_ids=True,
                load_cluster_sizes=True,
            ),
            JsonlWriter(str(docs_dir), compression=None),
        ],
        tasks, workers, logs_dir / "filter", executor,
    )
    ensure_rank_files(docs_dir, tasks)
    ensure_rank_files(excluded_dir, tasks)
    return write_report(out_dir, clusters, tasks)
