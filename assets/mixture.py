"""mixture: weights + token budget -> shuffled document index over the tokenized sources."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from dagster import MetadataValue

from dataprep.mixture import build_mixture

from .engine import BuildContext
from .store import Manifest, atomic_write_json


def build_mixture_asset(ctx: BuildContext) -> dict[str, Any]:
    spec = ctx.plan.context["mixture"]
    # sorted: the spec hash ignores key order, so the output must too
    names = sorted(n for n, w in spec.weights.items() if w > 0)
    lengths = {}
    for name in names:
        offsets = np.load(ctx.upstream[name].dir / "offsets.npy")
        lengths[name] = np.diff(offsets)
    index, shares = build_mixture(
        lengths, {n: spec.weights[n] for n in names}, spec.total_tokens,
        {n: spec.epoch_cap(n) for n in names}, spec.seed,
    )
    np.save(ctx.out_dir / "index.npy", index)
    # Relative to the mixture dir, so moving the store changes neither content nor version.
    sources = [
        {"id": i, "name": n, "tokenized": os.path.relpath(ctx.upstream[n].dir, ctx.out_dir)}
        for i, n in enumerate(names)
    ]
    atomic_write_json(ctx.out_dir / "sources.json", sources)
    table = pa.table({
        "source": [s.name for s in shares],
        "weight": [float(s.weight) for s in shares],
        "target_tokens": [s.target_tokens for s in shares],
        "tokens": [s.tokens for s in shares],
        "available_tokens": [s.available_tokens for s in shares],
        "documents": [s.documents for s in shares],
        "epochs": [round(s.epochs, 4) for s in shares],
        "shortfall_tokens": [s.shortfall_tokens for s in shares],
    })
    pq.write_table(table, ctx.out_dir / "mixture.parquet")
    shortfall = sum(s.shortfall_tokens for s in shares)
    for s in shares:
        if s.shortfall_tokens:
            ctx.log.warning(
                f"{ctx.plan.label}: source '{s.name}' has {s.available_tokens:,} tokens; its share of "
                f"{s.target_tokens:,} needs {s.target_tokens / max(s.available_tokens, 1):.2f} epochs, above the "
                f"cap of {spec.epoch_cap(s.name)}: {s.shortfall_tokens:,} tokens short (not filled from other sources)"
            )
    return {"tokens": int(sum(s.tokens for s in shares)), "documents": int(len(index)),
            "shortfall_tokens": int(shortfall),
            "shares": [s.__dict__ for s in shares]}


def describe_mixture(manifest: Manifest) -> dict[str, Any]:
    c = manifest.counts
    rows = "\n".join(
        f"| {s['name']} | {s['weight']:g} | {s['tokens']:,} | {s['epochs']:.2f} | {s['shortfall_tokens']:,} |"
        for s in c.get("shares", [])
    )
    return {
        "tokens": c.get("tokens", 0),
        "documents": c.get("documents", 0),
        "shortfall_tokens": c.get("shortfall_tokens", 0),
        "shares": MetadataValue.md("| source | weight | tokens | epochs | shortfall |\n|---|---:|---:|---:|---:|\n" + rows),
    }
