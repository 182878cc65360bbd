"""eval_report: lighteval tasks and held-out loss on the checkpoint."""

from __future__ import annotations

import shutil
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from dagster import MetadataValue

from .engine import BuildContext
from .store import Manifest, atomic_write_json

EVAL_COLUMNS = ["task", "metric", "value", "stderr", "n_items"]


def build_eval_report(ctx: BuildContext) -> dict[str, Any]:
    from evaluation.run import evaluate_checkpoint  # heavy import (lighteval): only when evaluating

    spec = ctx.plan.context["evals"]
    work = ctx.out_dir.parent / f"{ctx.out_dir.name}.work"
    try:
        result = evaluate_checkpoint(
            ckpt_dir=ctx.upstream["checkpoint"].dir,
            tokenizer_path=ctx.upstream["tokenizer"].dir / "tokenizer.json",
            tasks=list(spec.tasks),
            max_items=spec.max_items,
            data_root=ctx.foundry.data_path(),
            work_dir=work,
            heldout=spec.heldout,
            heldout_max_tokens=spec.heldout_max_tokens,
            seed=spec.seed,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = result["rows"]
    pq.write_table(
        pa.table({c: [r.get(c) for r in rows] for c in EVAL_COLUMNS},
                 schema=pa.schema([("task", pa.string()), ("metric", pa.string()), ("value", pa.float64()),
                                   ("stderr", pa.float64()), ("n_items", pa.int64())])),
        ctx.out_dir / "evals.parquet",
    )
    details = result.get("details") or []
    if details:
        cols = ["task", "item", "pred", "gold", "correct"]
        pq.write_table(pa.table({c: [d.get(c) for d in details] for c in cols}), ctx.out_dir / "details.parquet")
    atomic_write_json(ctx.out_dir / "report.json", {"rows": rows})
    for r in rows:
        ctx.log.info(f"{ctx.plan.label}: {r['task']} {r['metric']} = {r['value']:.4f} (n={r['n_items']})")
    return {"rows": rows}


def describe_eval_report(manifest: Manifest) -> dict[str, Any]:
    rows = manifest.counts.get("rows", [])
    table = "\n".join(
        f"| {r['task']} | {r['metric']} | {r['value']:.4f} | {_stderr(r)} | {r['n_items']:,} |" for r in rows
    )
    meta: dict[str, Any] = {
        "scores": MetadataValue.md("| task | metric | value | stderr | items |\n|---|---|---:|---:|---:|\n" + table)
    }
    for r in rows:
        meta[f"{r['task']}/{r['metric']}"] = float(r["value"])
    return meta


def _stderr(row: dict) -> str:
    return "" if row.get("stderr") is None else f"±{row['stderr']:.4f}"
