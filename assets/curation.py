"""Curation assets.

filtered_<source>  one partition per source file (or per batch of files, `batches: N`):
                   extraction and the datatrove filters (`dataprep.curate`) on each file, one
                   decision row per input document, and what each step dropped under
                   excluded/<step>/. Outputs are per file either way; a batch records an index.
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
from dagster import AssetExecutionContext, MaterializeResult, MetadataValue

from dataprep.curate import STEP_ORDER, run_curation, run_curation_per_file, useful_workers
from dataprep.dedup import run_minhash_dedup
from dataprep.progress import Progress, describe

from . import curation_report
from .engine import BuildContext, materialize, read_json
from .file_batches import members_digest
from .identity import code_version
from .plan import AssetPlan
from .recipe import SourceSpec
from .resources import FoundryResource
from .settings import resolve_data_path
from .shards import PartitionsMissing, current_partitions, shard_key, shard_outputs
from .sources import reader_spec
from .store import Manifest, atomic_write_json, file_sha256

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


def build_file_outputs(plan: AssetPlan, files: list[tuple[str, Path, str]], foundry: FoundryResource,
                       progress: Progress | None = None, min_files: int = 1) -> list[str]:
    """Build the per-file outputs missing from the store among `files` (name, path, sha256) in one
    datatrove run; fewer than `min_files` missing: build nothing. Returns the names it built.

    Outputs are the same bytes as a file's own run (`run_curation_per_file`), so whichever path
    built a file's output, every later lookup of its key is a hit.
    """
    src: SourceSpec = plan.context["source"]
    store = foundry.store()
    todo: dict[str, tuple[Path, list[str]]] = {}  # key -> (file, every name with that content)
    for name, path, sha in files:
        key = shard_key(plan, sha)
        if key in todo:
            todo[key][1].append(name)
        elif store.lookup("filtered", key) is None:
            todo[key] = (path, [name])
    if len(todo) < min_files:
        return []
    with contextlib.ExitStack() as stack:
        for key in sorted(todo):  # claims taken in one order: two syncs never wait on each other in a cycle
            stack.enter_context(store.claim("filtered", key))
        keys = [k for k in sorted(todo) if store.lookup("filtered", k) is None]  # a concurrent sync built some
        if len(keys) < min_files:
            return []
        paths = [todo[k][0] for k in keys]
        builds = [stack.enter_context(store.build("filtered", k, spec=plan.spec)) for k in keys]
        counts = run_curation_per_file(
            paths, src.kind, src.text_key, src.id_key, src.limit, src.shards, src.curation.model_dump(mode="json"),
            out_dirs=[b.dir for b in builds], workers=useful_workers(paths, foundry.workers, src.shards * len(paths),
                                                                    None if src.limit is None else src.limit * len(paths)),
            logs_dir=store.root / "logs" / "filtered" / f"batch-{keys[0]}", executor=foundry.executor_settings(),
            progress=progress,
        )
        for build, c in zip(builds, counts, strict=True):
            build.counts.update(c)
    return [name for k in keys for name in todo[k][1]]


def prebuild_filtered(plan: AssetPlan, names: list[str], foundry: FoundryResource,
                      progress: Progress | None = None) -> list[str]:
    """Build the files of several partitions in one datatrove run.

    Each partition run then finds its files' outputs (cache hits) and records them; without this,
    every partition would start its own process pool. Returns the partitions whose files it built.
    """
    partitions = current_partitions(plan, foundry.data_path())
    members = {part: partitions.get(part, {}) for part in names}
    files = [(name, path, file_sha256(path)) for part in names for name, path in members[part].items()]
    built = set(build_file_outputs(plan, files, foundry, progress, min_files=2))  # one file: its own run is as fast
    return [part for part in names if built.intersection(members[part])]


def materialize_filtered(context: AssetExecutionContext, foundry: FoundryResource, plan: AssetPlan) -> MaterializeResult:
    """The body of a filtered_<source> partition: one file, or a batch of them."""
    name = context.partition_key
    files = current_partitions(plan, foundry.data_path()).get(name)
    if not files:
        folder = resolve_data_path(plan.context["source"].path, foundry.data_path())
        raise FileNotFoundError(f"{plan.label}: partition '{name}' has no file under {folder} any more")
    if plan.context["source"].batches is None:
        [path] = files.values()
        return materialize(context, foundry, plan, lambda ctx: build_filtered(ctx, path), describe_filtered,
                           extra_inputs={"file": file_sha256(path)}, extra_metadata={"file": name})
    rows = [(n, p, file_sha256(p)) for n, p in files.items()]
    progress = Progress(f"curating {len(rows)} files",
                        report=lambda r: context.log.info(f"{plan.label}[{name}]: {describe(r)}"))
    # Outside the index build: a member output gone from the store is rebuilt even when the
    # index itself is a cache hit.
    built = build_file_outputs(plan, rows, foundry, progress)
    members = [{"name": n, "sha256": sha, "key": shard_key(plan, sha)} for n, _, sha in rows]
    return materialize(context, foundry, plan, lambda ctx: build_batch_index(ctx, members), describe_filtered,
                       extra_inputs={"batch": members_digest((m["name"], m["sha256"]) for m in members)},
                       extra_metadata={"files": len(rows), "files_curated": len(built)})


def build_batch_index(ctx: BuildContext, members: list[dict[str, str]]) -> dict[str, Any]:
    """A batch's output: its members' output keys (members.json) and their summed counts."""
    store = ctx.foundry.store()
    counts: dict[str, Any] = {"files": len(members), "documents": 0, "kept": 0, "dropped": 0, "reasons": {}}
    for m in members:
        manifest = store.lookup("filtered", m["key"])
        if manifest is None:
            raise PartitionsMissing(f"{ctx.plan.label}: the output of {m['name']} (key {m['key']}) left the store "
                                    "while its batch was recorded; materialize the batch again")
        for field in ("documents", "kept", "dropped"):
            counts[field] += manifest.counts.get(field, 0)
        for reason, n in manifest.counts.get("reasons", {}).items():
            counts["reasons"][reason] = counts["reasons"].get(reason, 0) + n
    atomic_write_json(ctx.out_dir / "members.json", members)
    return counts


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
