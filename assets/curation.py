"""curated_<source>: datatrove filters over one source, one decision row per input document."""

from __future__ import annotations

from typing import Any

from dagster import MetadataValue

from dataprep.curate import run_curation

from .engine import BuildContext
from .recipe import SourceSpec
from .sources import resolve_files
from .store import Manifest


def curated_spec(src: SourceSpec) -> dict[str, Any]:
    # The shard count shapes the output files, so it is part of the identity; workers are not.
    return {"curation": src.curation.hashed(), "shards": src.shards}


def build_curated(ctx: BuildContext) -> dict[str, Any]:
    src: SourceSpec = ctx.plan.context["source"]
    files = resolve_files(src, ctx.foundry.data_path(), ctx.upstream["raw"].dir, ctx.plan.label)
    counts = run_curation(
        files=files,
        kind=src.kind,
        text_key=src.text_key,
        id_key=src.id_key,
        limit=src.limit,
        shards=src.shards,
        curation=src.curation.model_dump(mode="json"),
        out_dir=ctx.out_dir,
        workers=ctx.foundry.workers,
        logs_dir=ctx.logs_dir,
    )
    ctx.log.info(f"{ctx.plan.label}: datatrove logs and step stats in {ctx.logs_dir}")
    ctx.log.info(f"{ctx.plan.label}: kept {counts['kept']:,} of {counts['documents']:,} documents")
    return counts


def describe_curated(manifest: Manifest) -> dict[str, Any]:
    c = manifest.counts
    docs = max(c.get("documents", 0), 1)
    reasons = sorted(c.get("reasons", {}).items(), key=lambda kv: -kv[1])
    table = "\n".join(f"| `{r}` | {n:,} | {100 * n / docs:.1f}% |" for r, n in reasons)
    return {
        "documents": c.get("documents", 0),
        "kept": c.get("kept", 0),
        "dropped": c.get("dropped", 0),
        "kept_fraction": round(c.get("kept", 0) / docs, 4),
        "drop_reasons": MetadataValue.md("| reason | documents | share |\n|---|---:|---:|\n" + table),
    }
