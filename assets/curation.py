"""Curation assets.

filtered_<source>  one partition per source file: extraction and the datatrove filters
                   (`dataprep.curate`), one decision row per input document, and what each
                   step dropped under excluded/<step>/.
curated_<source>   unpartitioned manifest over every file raw_<source> recorded: gathers the
                   partitions' outputs (found by their computed keys), runs MinHash dedup
                   across all of them, and writes the source's decisions.parquet.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from dagster import MetadataValue

from dataprep.curate import STEP_ORDER, run_curation, run_curation_per_file, useful_workers
from dataprep.dedup import run_minhash_dedup
from dataprep.progress import Progress

from . import curation_report
from .engine import BuildContext, read_json
from .identity import code_version
from .plan import AssetPlan
from .recipe import SourceSpec
from .resources import FoundryResource
from .shards import current_files, shard_key, shard_outputs
from .sources import reader_spec
from .store import Manifest, file_sha256

DEDUP_COLUMNS = [("cluster_id", pa.int64()), ("cluster_size", pa.int64())]


def filtered_spec(src: SourceSpec) -> dict[str, Any]:
    # The shard count shapes the output files, so it is part of the identity; workers are not.
    return {"filters": src.curation.filter_spec(), "shards": src.shards, "reader": reader_spec(src)}


def curated_spec(src: SourceSpec) -> dict[str, Any]:
    # The per-file outputs are found by key, not as Dagster inputs: their code version (logic
    # and spec) must be part of this one, or a new filtered logic would reuse an old gathering.
    return {"curation": src.curation.hashed(), "shards": src.shards, "reader": reader_spec(src),
            "per_file": code_version("filtered", filtered_spec(src))}


def reasons_markdown(reasons: dict[str, int], documents: int) -> str:
    rows = sorted(reasons.items(), key=lambda kv: -kv[1])
    body = "\n".join(f"| `{r}` | {n:,} | {100 * n / documents:.1f}% |" for r, n in rows)
    return "| reason | documents | share |\n|---|---:|---:|\n" + body


# --------------------------------------------------------------------- one file


def build_filtered(ctx: BuildContext, file: Path) -> dict[str, Any]:
    src: SourceSpec = ctx.plan.context["source"]
    counts = run_curation(
        files=[file],
        kind=src.kind,
        text_key=src.text_key,
        id_key=src.id_key,
        limit=src.limit,
        shards=src.shards,
        curation=src.curation.model_dump(mode="json"),
        out_dir=ctx.out_dir,
        workers=useful_workers([file], ctx.foundry.workers, src.shards, src.limit),
        logs_dir=ctx.logs_dir,
        executor=ctx.foundry.executor_settings(),
        progress=ctx.progress("curating"),
    )
    ctx.log.info(f"{ctx.plan.label}[{file.name}]: kept {counts['kept']:,} of {counts['documents']:,} documents; "
                 f"datatrove logs in {ctx.logs_dir}")
    return counts


def prebuild_filtered(plan: AssetPlan, names: list[str], foundry: FoundryResource,
                      progress: Progress | None = None) -> list[str]:
    """Build the store outputs of several file partitions in one datatrove run.

    Each partition run then finds its output (a cache hit) and records it; without this, every
    partition would start its own process pool. Outputs are the same bytes either way.
    Returns the partitions whose outputs it built.
    """
    src: SourceSpec = plan.context["source"]
    store = foundry.store()
    files = current_files(plan, foundry.data_path())
    todo = []
    for name in names:
        if name in files:
            key = shard_key(plan, file_sha256(files[name]))
            if store.lookup("filtered", key) is None and key not in {k for _, _, k in todo}:
                todo.append((name, files[name], key))
    if len(todo) < 2:
        return []  # one file: its own run is as fast
    todo.sort(key=lambda t: t[2])  # claims taken in one order: two syncs never wait on each other in a cycle
    with contextlib.ExitStack() as stack:
        for _, _, key in todo:
            stack.enter_context(store.claim("filtered", key))
        todo = [t for t in todo if store.lookup("filtered", t[2]) is None]  # a concurrent sync built some
        if len(todo) < 2:
            return []
        paths = [path for _, path, _ in todo]
        builds = [stack.enter_context(store.build("filtered", key, spec=plan.spec)) for _, _, key in todo]
        counts = run_curation_per_file(
            paths, src.kind, src.text_key, src.id_key, src.limit, src.shards, src.curation.model_dump(mode="json"),
            out_dirs=[b.dir for b in builds], workers=useful_workers(paths, foundry.workers, src.shards * len(paths),
                                                                    None if src.limit is None else src.limit * len(paths)),
            logs_dir=store.root / "logs" / "filtered" / f"batch-{todo[0][2]}", executor=foundry.executor_settings(),
            progress=progress,
        )
        for build, c in zip(builds, counts, strict=True):
            build.counts.update(c)
    return [name for name, _, _ in todo]


def describe_filtered(manifest: Manifest) -> dict[str, Any]:
    c = manifest.counts
    docs = max(c.get("documents", 0), 1)
    return {
        "documents": c.get("documents", 0),
        "kept": c.get("kept", 0),
        "kept_fraction": round(c.get("kept", 0) / docs, 4),
        "drop_reasons": MetadataValue.md(reasons_markdown(c.get("reasons", {}), docs)),
    }


# --------------------------------------------------------------------- the whole source


def _link(src: Path, dst: Path) -> None:
    """Hard-link an immutable store file into a new output (copy across filesystems)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _gather(shards: list[tuple[str, Manifest]], out: Path, with_docs: bool) -> pa.Table:
    """Link each partition's excluded files (and docs, if not deduplicated) and stack decisions."""
    tables = []
    for i, (name, manifest) in enumerate(shards):
        for rel in sorted(manifest.files):
            parts = rel.split("/")
            if parts[0] == "excluded" or (with_docs and parts[0] == "docs"):
                _link(manifest.path / rel, out / Path(*parts[:-1]) / f"{i:05d}-{parts[-1]}")
        table = pq.read_table(manifest.path / "decisions.parquet")
        tables.append(table.append_column("file", pa.array([name] * table.num_rows, pa.string())))
    if not tables:
        raise RuntimeError("a source without files has nothing to curate")
    return pa.concat_tables(tables)


def _shard_doc_files(shards: list[tuple[str, Manifest]]) -> list[Path]:
    return [m.path / rel for _, m in shards for rel in sorted(m.files) if rel.startswith("docs/")]


def _with_dedup(decisions: pa.Table, dedup: pa.Table) -> pa.Table:
    """Mark MinHash duplicates in the decisions and add cluster columns.

    dedup.parquet has one row per kept document in the order the docs files were read, which
    is the order of the kept rows here (decision rows and docs share rank order per file).
    """
    kept_rows = [i for i, k in enumerate(decisions["kept"].to_pylist()) if k]
    ids = decisions["doc_id"].to_pylist()
    if len(kept_rows) != dedup.num_rows or any(ids[r] != d for r, d in zip(kept_rows, dedup["doc_id"].to_pylist(), strict=True)):
        raise RuntimeError("MinHash output does not line up with the filtered documents")
    n = decisions.num_rows
    kept, reason, step = (decisions[c].to_pylist() for c in ("kept", "reason", "step"))
    cluster_id: list[int | None] = [None] * n
    cluster_size: list[int | None] = [None] * n
    for r, dup, cid, size in zip(kept_rows, dedup["duplicate"].to_pylist(), dedup["cluster_id"].to_pylist(),
                                 dedup["cluster_size"].to_pylist(), strict=True):
        cluster_id[r], cluster_size[r] = cid, size
        if dup:
            kept[r], reason[r], step[r] = False, "minhash:duplicate", "minhash"
    out = decisions
    for name, values, typ in (("kept", kept, pa.bool_()), ("reason", reason, pa.string()), ("step", step, pa.string())):
        out = out.set_column(out.schema.get_field_index(name), name, pa.array(values, typ))
    out = out.append_column("cluster_id", pa.array(cluster_id, pa.int64()))
    return out.append_column("cluster_size", pa.array(cluster_size, pa.int64()))


def build_curated(ctx: BuildContext) -> dict[str, Any]:
    src: SourceSpec = ctx.plan.context["source"]
    filtered: AssetPlan = ctx.plan.context["filtered_plan"]
    files = read_json(ctx.upstream["raw"].dir / "files.json")
    shards = shard_outputs(ctx.foundry.store(), filtered, files)
    minhash = src.curation.minhash
    decisions = _gather(shards, ctx.out_dir, with_docs=minhash is None)
    dedup_counts: dict[str, Any] = {}
    if minhash is None:
        for name, typ in DEDUP_COLUMNS:
            decisions = decisions.append_column(name, pa.nulls(decisions.num_rows, typ))
    else:
        work = ctx.logs_dir / "minhash-work"
        shutil.rmtree(work, ignore_errors=True)
        doc_files = _shard_doc_files(shards)
        dedup_counts = run_minhash_dedup(
            doc_files, ctx.out_dir, minhash.model_dump(mode="json"), tasks=src.shards,
            workers=useful_workers(doc_files, ctx.foundry.workers, src.shards), work_dir=work,
            logs_dir=ctx.logs_dir / "minhash", executor=ctx.foundry.executor_settings(),
        )
        shutil.rmtree(work, ignore_errors=True)
        dedup_file = ctx.out_dir / "dedup.parquet"
        decisions = _with_dedup(decisions, pq.read_table(dedup_file))
        dedup_file.unlink()
    pq.write_table(decisions, ctx.out_dir / "decisions.parquet")
    counts = summarize(decisions)
    counts["files"] = len(shards)
    counts["clusters"] = dedup_counts.get("clusters", 0)
    counts["largest_cluster"] = dedup_counts.get("largest_cluster", 0)
    counts["steps"] = curation_report.step_table(decisions, STEP_ORDER)
    ctx.log.info(f"{ctx.plan.label}: kept {counts['kept']:,} of {counts['documents']:,} documents from "
                 f"{len(shards)} file(s); {counts['reasons'].get('minhash:duplicate', 0):,} near-duplicates")
    return counts


def summarize(decisions: pa.Table) -> dict[str, Any]:
    kept = pc.sum(decisions["kept"].cast(pa.int64())).as_py() or 0
    reasons: dict[str, int] = {}
    for r in decisions["reason"].to_pylist():
        if r is not None:
            reasons[r] = reasons.get(r, 0) + 1
    return {"documents": decisions.num_rows, "kept": kept, "dropped": decisions.num_rows - kept,
            "reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1]))}


def describe_curated(manifest: Manifest) -> dict[str, Any]:
    c = manifest.counts
    docs = max(c.get("documents", 0), 1)
    out: dict[str, Any] = {
        "documents": c.get("documents", 0),
        "kept": c.get("kept", 0),
        "dropped": c.get("dropped", 0),
        "kept_fraction": round(c.get("kept", 0) / docs, 4),
        "files": c.get("files", 0),
        "minhash_clusters": c.get("clusters", 0),
        "drop_reasons": MetadataValue.md(reasons_markdown(c.get("reasons", {}), docs)),
    }
    decisions = manifest.path / "decisions.parquet"
    if decisions.is_file():  # per-step funnel and the length histogram before/after
        out.update(curation_report.curation_report_metadata(decisions, STEP_ORDER))
    return out
