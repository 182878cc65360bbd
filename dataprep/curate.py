"""Curation: a datatrove pipeline that keeps every decision as data.

Pipeline (one datatrove task per output shard; the steps in brackets only when configured):
    SourceReader -> [Extracted(Trafilatura), WARC sources] -> [Judged(URLFilter)]
    -> [Judged(language ID)] -> Judged(GopherRepetition) -> Judged(GopherQuality)
    -> Judged(C4Quality) -> Judged(FineWebQuality) -> [Formatted(PII)] -> DecisionSink
    -> JsonlWriter(kept documents)

datatrove's own filters decide; `Judged` only records *which* step dropped a document and
why, instead of discarding it, so `DecisionSink` can write one row per input document. Each
filter step also writes what it dropped to `excluded/<step>/<rank>.jsonl` (datatrove's
exclusion writer), so a user can read what a step removed.

The four quality filters run on one of two paths, with the same decisions (an execution knob,
$FOUNDRY_CURATION_PATH, in no hash): `fused` (default), datatrove's filters sharing each
document's words and counting only what a decision needs (`fused_filters`), or `datatrove`,
the plain classes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.extractors import Trafilatura
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from datatrove.pipeline.filters.base_filter import BaseFilter, get_filter_result
from datatrove.pipeline.formatters import PIIFormatter
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.batching import batched

from .executors import ExecutorSettings, make_executor, run_executor
from .fused_filters import FUSED_FILTERS, curation_path
from .progress import Progress
from .readers import CHARS_KEY, DROP_KEY, SHARD_KEY, SourceReader
from .web import LANG_KEY, LANG_SCORE_KEY, STEP_KEY, Extracted, FastTextLanguageFilter, Formatted, OfflineURLFilter

# Seconds Trafilatura may spend on one page before it is dropped as `extraction:timeout`.
EXTRACTION_TIMEOUT = 10.0

# Filter name in the recipe -> datatrove class. The order is FineWeb's.
FILTERS: dict[str, type[BaseFilter]] = {
    "gopher_repetition": GopherRepetitionFilter,
    "gopher_quality": GopherQualityFilter,
    "c4_quality": C4QualityFilter,
    "fineweb_quality": FineWebQualityFilter,
}

# Every step that can drop a document, in pipeline order (minhash runs across files, later).
STEP_ORDER = ["reader", "extraction", "url_filter", "language", *FILTERS, "minhash"]

DECISION_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("shard", pa.int32()),
        ("kept", pa.bool_()),
        ("reason", pa.string()),
        ("step", pa.string()),
        ("chars", pa.int64()),
        ("words", pa.int64()),
        ("language", pa.string()),  # null unless the language step ran on the document
        ("language_score", pa.float64()),
        ("url", pa.string()),  # null where the source has no url
        ("domain", pa.string()),
    ]
)


# Starting datatrove's process pool costs ~5 s (each worker imports datatrove and spaCy), which
# is more than one process needs for ~16 MB of text; below that, one process is faster.
POOL_MIN_TEXT_BYTES = 16 * 2**20
COMPRESSED_SUFFIXES = (".gz", ".zst", ".parquet", ".arrow")  # ~4x more text than bytes on disk


POOL_MIN_DOCUMENTS = 5000  # ~16 MB of typical web text


def useful_workers(files: list[Path], workers: int, tasks: int, limit: int | None = None) -> int:
    """Processes worth starting for these inputs (the output never depends on it)."""
    text_bytes = sum(f.stat().st_size * (4 if f.name.endswith(COMPRESSED_SUFFIXES) else 1) for f in files)
    if text_bytes < POOL_MIN_TEXT_BYTES or (limit is not None and limit < POOL_MIN_DOCUMENTS):
        return 1
    return max(1, min(workers, tasks))


def build_filter(name: str, params: dict[str, Any], path: str | None = None) -> BaseFilter:
    """The recipe's filter `name`: datatrove's class (path `datatrove`) or its fused subclass
    (`fused`, the default: same parameters, same decisions; see fused_filters)."""
    kwargs = dict(params)
    # YAML mappings {n: fraction} -> datatrove's ((n, fraction), ...) tuples
    for key in ("top_n_grams", "dup_n_grams"):
        if key in kwargs:
            kwargs[key] = tuple(sorted((int(n), float(v)) for n, v in kwargs[key].items()))
    classes = FUSED_FILTERS if curation_path(path) == "fused" else FILTERS
    return classes[name](**kwargs)


class Judged(PipelineStep):
    """Runs a datatrove filter but passes dropped documents on, marked with step:reason."""

    type = "🔻 - FILTER"

    def __init__(self, step: str, inner: BaseFilter, excluded_dir: str | None = None):
        self.name = f"⚖ {step}"  # set before super().__init__, which names the stats
        super().__init__()
        self.step = step
        self.inner = inner
        self.excluded_dir = excluded_dir

    def _exclusion_writer(self):
        if self.excluded_dir is None:
            return contextlib.nullcontext(None)
        return JsonlWriter(self.excluded_dir, output_filename="${rank}.jsonl", compression=None, adapter=_adapter)

    def run(self, data: Iterator[Document], rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        with self._exclusion_writer() as excluded:
            for batch in batched(data, self.inner.batch_size):
                live = [d for d in batch if DROP_KEY not in d.metadata]
                with self.track_time():
                    results = self.inner.filter_batch(live) if live else []
                for doc, result in zip(live, results, strict=True):
                    keep, reason = get_filter_result(result)
                    self.stat_update("total")
                    if keep:
                        self.stat_update("forwarded")
                        continue
                    self.stat_update("dropped", f"dropped_{reason}")
                    doc.metadata[DROP_KEY] = f"{self.step}:{reason or 'dropped'}"
                    doc.metadata[STEP_KEY] = self.step
                    if excluded is not None:
                        excluded.write(doc, rank)
                yield from batch


class ProgressCounter(PipelineStep):
    """Counts the documents that went through every step and writes its rank's count to
    `<out_dir>/<rank>.json` about once a second, so the launching process can report progress
    whichever process (or node) runs the task."""

    name = "⏱ progress"
    type = "📊 - STATS"

    def __init__(self, out_dir: str, every: float = 1.0):
        super().__init__()
        self.out_dir = out_dir
        self.every = every

    def _write(self, rank: int, documents: int, finished: bool) -> None:
        target = Path(self.out_dir) / f"{rank:05d}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"documents": documents, "finished": finished}))
        os.replace(tmp, target)  # the reader sees the old count or the new one, never half a file

    def run(self, data: Iterator[Document], rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        count, last = 0, time.monotonic()
        for doc in data:
            count += 1
            if time.monotonic() - last >= self.every:
                self._write(rank, count, False)
                last = time.monotonic()
            yield doc
        self._write(rank, count, True)


def read_progress(counts_dir: Path, tasks: int) -> tuple[int, float]:
    """(documents counted so far over every task, share of tasks finished)."""
    documents, finished = 0, 0
    for path in counts_dir.glob("*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # replaced while reading: the next poll sees it
        documents += int(data.get("documents", 0))
        finished += bool(data.get("finished"))
    return documents, finished / max(tasks, 1)


@contextlib.contextmanager
def watch_progress(progress: Progress | None, counts_dir: Path, tasks: int, poll_s: float = 1.0) -> Iterator[None]:
    """While the body runs, feed `progress` from the ProgressCounter files; report the end."""
    if progress is None:
        yield
        return
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(poll_s):
            progress.update(*read_progress(counts_dir, tasks))

    thread = threading.Thread(target=poll, name="curation-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    progress.update(*read_progress(counts_dir, tasks))
    progress.finish()


class DecisionSink(PipelineStep):
    """Writes one decision row per document to decisions/<rank>.parquet; yields kept ones."""

    name = "🧾 decisions"
    type = "💽 - WRITER"

    def __init__(self, out_dir: str):
        super().__init__()
        self.out_dir = out_dir

    def run(self, data: Iterator[Document], rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        rows: dict[str, list] = {f.name: [] for f in DECISION_SCHEMA}
        for doc in data:
            drop = doc.metadata.pop(DROP_KEY, None)
            step = doc.metadata.pop(STEP_KEY, None)
            chars = doc.metadata.pop(CHARS_KEY, len(doc.text))
            shard = doc.metadata.pop(SHARD_KEY, rank)
            rows["doc_id"].append(doc.id)
            rows["shard"].append(shard)
            rows["kept"].append(drop is None)
            rows["reason"].append(drop)
            rows["step"].append(step or ("reader" if drop else None))
            rows["chars"].append(chars)
            rows["words"].append(len(doc.text.split()))
            rows["language"].append(doc.metadata.pop(LANG_KEY, None))
            rows["language_score"].append(doc.metadata.pop(LANG_SCORE_KEY, None))
            url = doc.metadata.get("url")
            rows["url"].append(url if isinstance(url, str) else None)
            rows["domain"].append(url_domain(url))
            if drop is None:
                self.stat_update("kept")
                yield doc
            else:
                self.stat_update("dropped")
        out = Path(self.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(rows, schema=DECISION_SCHEMA), out / f"{rank:05d}.parquet")


def url_domain(url) -> str | None:
    """Host of a URL without a leading www. (None when there is no parseable URL)."""
    if not isinstance(url, str) or not url:
        return None
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return None
    return host.removeprefix("www.") if host else None


def _strip_internal(doc: Document) -> dict:
    meta = {k: v for k, v in doc.metadata.items() if not k.startswith("foundry_")}
    return {"id": doc.id, "text": doc.text, "metadata": meta}


def curation_steps(
    files: list[Path], kind: str, text_key: str, id_key: str, limit: int | None, curation: dict[str, Any],
    excluded_dir: Path | None = None, shards_per_file: int | None = None, path: str | None = None,
) -> list[PipelineStep]:
    """Reader, extraction and the configured steps in FineWeb's order (no sink, no writer).

    With `excluded_dir`, each filter step writes the documents it drops to excluded_dir/<step>/.
    `path`: `fused` or `datatrove` quality filters (default: $FOUNDRY_CURATION_PATH, else fused).
    """
    path = curation_path(path)

    def judged(step: str, inner: BaseFilter) -> Judged:
        return Judged(step, inner, str(excluded_dir / step) if excluded_dir is not None else None)

    steps: list[PipelineStep] = [SourceReader([str(f) for f in files], kind, text_key, id_key, limit, shards_per_file,
                                              pdf=curation.get("pdf"))]
    if kind == "warc":
        # deduplicate=False: Trafilatura's own dedup caches paragraphs across pages, so a page's
        # text would depend on the pages its process saw before; MinHash removes duplicates.
        steps.append(Extracted(Trafilatura(timeout=EXTRACTION_TIMEOUT, deduplicate=False)))
    if curation.get("url_filter") is not None:
        steps.append(judged("url_filter", OfflineURLFilter(**curation["url_filter"])))
    if curation.get("language") is not None:
        steps.append(judged("language", FastTextLanguageFilter(**curation["language"])))
    for name in FILTERS:
        params = curation.get(name)
        if params is not None:
            steps.append(judged(name, build_filter(name, params, path)))
    if curation.get("pii") is not None:
        steps.append(Formatted("pii", PIIFormatter(**curation["pii"])))
    return steps


def run_curation(
    files: list[Path],
    kind: str,
    text_key: str,
    id_key: str,
    limit: int | None,
    shards: int,
    curation: dict[str, Any],
    out_dir: Path,
    workers: int,
    logs_dir: Path | None = None,
    executor: ExecutorSettings | None = None,
    path: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Curate one source into out_dir/{docs,decisions}; returns counts.

    datatrove's task logs and per-step stats go to logs_dir (default: beside out_dir, removed).
    `executor` picks where the tasks run (local processes by default; Slurm or Ray); `path`
    which quality filters (`fused` or `datatrove`, see curation_steps): neither changes the output.
    `progress` is fed with the documents done so far (its total, if unset, from `limit`).
    """
    steps = curation_steps(files, kind, text_key, id_key, limit, curation, excluded_dir=out_dir / "excluded",
                           path=path)
    _expect(progress, files, limit)
    _run_with_sinks(steps, out_dir, shards, workers, logs_dir, executor, progress)
    return merge_decisions(out_dir / "decisions", out_dir / "decisions.parquet")


def run_curation_per_file(
    files: list[Path],
    kind: str,
    text_key: str,
    id_key: str,
    limit: int | None,
    shards: int,
    curation: dict[str, Any],
    out_dirs: list[Path],
    workers: int,
    logs_dir: Path | None = None,
    executor: ExecutorSettings | None = None,
    path: str | None = None,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Curate each file into its own out_dir, exactly as `run_curation([file], ...)` would, but
    in one datatrove run (one process pool for all files: ranks = files x shards)."""
    if len(files) != len(out_dirs):
        raise ValueError(f"{len(files)} files but {len(out_dirs)} output folders")
    work = out_dirs[0].parent / f"{out_dirs[0].name}.batch"
    shutil.rmtree(work, ignore_errors=True)
    steps = curation_steps(files, kind, text_key, id_key, limit, curation, excluded_dir=work / "excluded",
                           shards_per_file=shards, path=path)
    _expect(progress, files, limit)
    try:
        _run_with_sinks(steps, work, shards * len(files), workers, logs_dir, executor, progress)
        # rank r of the batch is shard r % shards of file r // shards: move each part home
        for part in sorted(p for p in work.rglob("*") if p.is_file()):
            rank = int(part.name.split(".")[0])
            index, shard = divmod(rank, shards)
            target = out_dirs[index] / part.parent.relative_to(work) / f"{shard:05d}{''.join(part.suffixes)}"
            target.parent.mkdir(parents=True, exist_ok=True)
            part.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return [merge_decisions(out / "decisions", out / "decisions.parquet") for out in out_dirs]


def _expect(progress: Progress | None, files: list[Path], limit: int | None) -> None:
    if progress is not None and progress.total is None and limit is not None:
        progress.total = limit * len(files)  # at most: a file may hold fewer documents than the limit


def _run_with_sinks(steps: list[PipelineStep], out_dir: Path, tasks: int, workers: int, logs_dir: Path | None,
                    executor: ExecutorSettings | None, progress: Progress | None = None) -> None:
    """Add the progress counter, the decision sink and the kept-documents writer, and run the pipeline."""
    keep_logs = logs_dir is not None
    logs = Path(logs_dir) if keep_logs else out_dir.parent / f"{out_dir.name}.logs"
    counts_dir = logs / "progress"
    if progress is not None:
        steps = [*steps, ProgressCounter(str(counts_dir))]
    steps = [*steps, DecisionSink(str(out_dir / "decisions"))]
    # Uncompressed output: gzip headers carry timestamps, which would make identical
    # content hash differently and wake up everything downstream.
    steps.append(
        JsonlWriter(str(out_dir / "docs"), output_filename="${rank}.jsonl", compression=None, adapter=_adapter)
    )
    if keep_logs:
        shutil.rmtree(logs, ignore_errors=True)  # a previous, interrupted attempt of this key
    settings = executor or ExecutorSettings()
    with watch_progress(progress, counts_dir, tasks):
        run_executor(make_executor(steps, tasks, workers, str(logs), settings, job_name="curate"), settings)
    if not keep_logs:
        shutil.rmtree(logs, ignore_errors=True)


def _adapter(self, doc: Document) -> dict:  # datatrove calls adapter(writer, doc)
    return _strip_internal(doc)


def merge_decisions(parts_dir: Path, target: Path) -> dict[str, Any]:
    parts = sorted(parts_dir.glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(p) for p in parts]) if parts else DECISION_SCHEMA.empty_table()
    pq.write_table(table, target)
    shutil.rmtree(parts_dir)
    kept = pa.compute.sum(table["kept"].cast(pa.int64())).as_py() or 0
    reasons: dict[str, int] = {}
    for r in table["reason"].to_pylist():
        if r is not None:
            reasons[r] = reasons.get(r, 0) + 1
    return {"documents": table.num_rows, "kept": kept, "dropped": table.num_rows - kept, "reasons": reasons}
