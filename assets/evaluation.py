"""eval_report: lighteval tasks and held-out loss on the checkpoint; eval_step: the same on one
kept intermediate step of it (a partition of eval_steps, see assets/eval_steps.py).

Both write evals.parquet with the checkpoint's step and training tokens, so one query plots
score against tokens. Reports built before those columns existed read them as NULL in `evals`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
from dagster import AssetKey, MetadataValue

from dataprep.tokenize import HELDOUT_DIR

from .engine import BuildContext
from .recipe import Recipe
from .store import Manifest, atomic_write_json

if TYPE_CHECKING:
    from .eval_steps import KeptStep

# form: cloze | mc | heldout; step and tokens: the checkpoint's training step and tokens seen
EVAL_COLUMNS = ["task", "metric", "value", "stderr", "n_items", "form", "step", "tokens"]
# per-item results (details.parquet): item is the 0-based row of the task's source file
DETAIL_COLUMNS = ["task", "form", "item", "pred", "gold", "correct", "correct_norm", "step"]


def build_eval_report(ctx: BuildContext) -> dict[str, Any]:
    counts = ctx.upstream["checkpoint"].manifest.counts  # the final step
    return _evaluate(ctx, ctx.upstream["checkpoint"].dir, counts.get("steps"), counts.get("tokens"))


def build_eval_step(ctx: BuildContext, kept: KeptStep) -> dict[str, Any]:
    """One kept step of the checkpoint, evaluated exactly as the final one is."""
    return _evaluate(ctx, kept.dir, kept.step, kept.tokens) | {"step": kept.step, "tokens": kept.tokens}


def _evaluate(ctx: BuildContext, ckpt_dir: Path, step: int | None, tokens: int | None) -> dict[str, Any]:
    from evaluation.run import evaluate_checkpoint  # heavy import (lighteval): only when evaluating

    spec = ctx.plan.context["evals"]
    work = ctx.out_dir.parent / f"{ctx.out_dir.name}.work"
    try:
        result = evaluate_checkpoint(
            ckpt_dir=ckpt_dir,
            tokenizer_path=ctx.upstream["tokenizer"].dir / "tokenizer.json",
            tasks=list(spec.tasks),
            max_items=spec.max_items,
            data_root=ctx.foundry.data_path(),
            work_dir=work,
            heldout=spec.heldout,
            heldout_max_tokens=spec.heldout_max_tokens,
            seed=spec.seed,
            num_fewshot=spec.num_fewshot,
            heldout_sources=heldout_folders(ctx),
            progress=ctx.progress("scoring eval choices", unit="choices"),
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = result["rows"]
    failed = result.get("failed") or {}  # task -> error: a broken task is reported, the others kept
    write_eval_tables(ctx.out_dir, rows, result.get("details") or [], step=step, tokens=tokens)
    atomic_write_json(ctx.out_dir / "report.json", {"rows": rows, "failed": failed})
    for r in rows:
        ctx.log.info(f"{ctx.plan.label}: {r['task']} {r['metric']} = {r['value']:.4f} (n={r['n_items']})")
    for task, error in failed.items():
        ctx.log.error(f"{ctx.plan.label}: eval task {task} FAILED: {error}")
    return {"rows": rows, "failed": failed} if failed else {"rows": rows}


HELDOUT_ROLE = "heldout_"  # input role of tokenized_<source> whose held-out split is scored


def heldout_inputs(recipe: Recipe) -> dict[str, AssetKey]:
    """Extra inputs of eval_report: tokenized_<source> for every source with a held-out share
    (none while the recipe holds nothing out, so its identity is unchanged)."""
    return {f"{HELDOUT_ROLE}{s}": AssetKey([recipe.name, f"tokenized_{s}"])
            for s in recipe.sources if recipe.heldout_share(s) > 0}


def heldout_folders(ctx: BuildContext) -> dict[str, Path]:
    """Source name -> the held-out token folder of its tokenized output."""
    return {role.removeprefix(HELDOUT_ROLE): up.dir / HELDOUT_DIR
            for role, up in ctx.upstream.items() if role.startswith(HELDOUT_ROLE)}


def write_eval_tables(out_dir: Path, rows: list[dict], details: list[dict], step: int | None = None,
                      tokens: int | None = None) -> None:
    """evals.parquet (one row per task x metric) and, when there are any, details.parquet
    (one row per task x item) — the files behind the `evals` and `eval_items` tables."""
    rows = [{**r, "step": step, "tokens": tokens} for r in rows]
    pq.write_table(
        pa.table({c: [r.get(c) for r in rows] for c in EVAL_COLUMNS},
                 schema=pa.schema([("task", pa.string()), ("metric", pa.string()), ("value", pa.float64()),
                                   ("stderr", pa.float64()), ("n_items", pa.int64()), ("form", pa.string()),
                                   ("step", pa.int64()), ("tokens", pa.int64())])),
        out_dir / "evals.parquet",
    )
    if details:
        details = [{**d, "step": step} for d in details]
        pq.write_table(
            pa.table({c: [d.get(c) for d in details] for c in DETAIL_COLUMNS},
                     schema=pa.schema([("task", pa.string()), ("form", pa.string()), ("item", pa.int64()),
                                       ("pred", pa.int64()), ("gold", pa.int64()), ("correct", pa.bool_()),
                                       ("correct_norm", pa.bool_()), ("step", pa.int64())])),
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


def describe_eval_step(manifest: Manifest) -> dict[str, Any]:
    """A kept step's scores (the eval report's table) headed by its step and tokens."""
    c = manifest.counts
    meta = describe_eval_report(manifest)
    meta["scores"] = MetadataValue.md(f"**step {c['step']:,}** ({c['tokens']:,} training tokens)\n\n"
                                      + meta["scores"].value)
    return {"step": c["step"], "tokens": c["tokens"], **meta}


def _stderr(row: dict) -> str:
    return "" if row.get("stderr") is None else f"±{row['stderr']:.4f}"
