"""eval_report: lighteval tasks and held-out loss on the checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from dagster import MetadataValue

from .engine import BuildContext
from .store import Manifest, atomic_write_json

EVAL_COLUMNS = ["task", "metric", "value", "stderr", "n_items", "form"]  # form: cloze | mc | heldout
# per-item results (details.parquet): item is the 0-based row of the task's source file
DETAIL_COLUMNS = ["task", "form", "item", "pred", "gold", "correct", "correct_norm"]


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
            num_fewshot=spec.num_fewshot,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = result["rows"]
    failed = result.get("failed") or {}  # task -> error: a broken task is reported, the others kept
    write_eval_tables(ctx.out_dir, rows, result.get("details") or [])
    atomic_write_json(ctx.out_dir / "report.json", {"rows": rows, "failed": failed})
    for r in rows:
        ctx.log.info(f"{ctx.plan.label}: {r['task']} {r['metric']} = {r['value']:.4f} (n={r['n_items']})")
    for task, error in failed.items():
        ctx.log.error(f"{ctx.plan.label}: eval task {task} FAILED: {error}")
    return {"rows": rows, "failed": failed} if failed else {"rows": rows}


def write_eval_tables(out_dir: Path, rows: list[dict], details: list[dict]) -> None:
    """evals.parquet (one row per task x metric) and, when there are any, details.parquet
    (one row per task x item) — the files behind the `evals` and `eval_items` tables."""
    pq.write_table(
        pa.table({c: [r.get(c) for r in rows] for c in EVAL_COLUMNS},
                 schema=pa.schema([("task", pa.string()), ("metric", pa.string()), ("value", pa.float64()),
                                   ("stderr", pa.float64()), ("n_items", pa.int64()), ("form", pa.string())])),
        out_dir / "evals.parquet",
    )
    if details:
        pq.write_table(
            pa.table({c: [d.get(c) for d in details] for c in DETAIL_COLUMNS},
                     schema=pa.schema([("task", pa.string()), ("form", pa.string()), ("item", pa.int64()),
                                       ("pred", pa.int64()), ("gold", pa.int64()), ("correct", pa.bool_()),
                                       ("correct_norm", pa.bool_())])),
            out_dir / "details.parquet",
        )


def describe_eval_report(manifest: Manifest) -> dict[str, Any]:
    rows = manifest.counts.get("rows", [])
    table = "\n".join(
        f"| {r['task']} | {r.get('form', '')} | {r['metric']} | {r['value']:.4f} | {_stderr(r)} | {r['n_items']:,} |"
        for r in rows
    )
    failed = manifest.counts.get("failed") or {}
    if failed:
        table += "".join(f"\n| {task} | | FAILED | | | 0 |" for task in failed)
    meta: dict[str, Any] = {
        "scores": MetadataValue.md(
            "| task | form | metric | value | stderr | items |\n|---|---|---|---:|---:|---:|\n" + table
        )
    }
    if failed:
        meta["failed_tasks"] = MetadataValue.md("\n".join(f"- **{t}**: {e}" for t, e in failed.items()))
    for r in rows:
        meta[f"{r['task']}/{r['metric']}"] = float(r["value"])
    return meta


def _stderr(row: dict) -> str:
    return "" if row.get("stderr") is None else f"±{row['stderr']:.4f}"
