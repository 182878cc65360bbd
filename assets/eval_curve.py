"""Score against training tokens: the evaluated kept steps of a checkpoint and its final report,
as a markdown table (one row per checkpoint) and a PNG plot for the Dagster UI."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any

from dagster import MetadataValue

from . import lineage
from .eval_steps import evaluated, records
from .plan import AssetPlan
from .store import ArtifactStore, Manifest


@dataclass(frozen=True)
class Point:
    step: int
    tokens: int
    rows: list[dict]  # the report's rows: task, form, metric, value, stderr, n_items
    final: bool = False


def points(steps_plan: AssetPlan, instance, store: ArtifactStore, final: Manifest | None = None) -> list[Point]:
    """Every evaluated kept step of the current checkpoint, then its final eval report: `final`
    (one being materialized now) or else the latest eval_report if it was built from this checkpoint."""
    checkpoint, inputs = records(steps_plan, instance)
    found = [Point(kept.step, kept.tokens, m.counts.get("rows", []))
             for kept, m in evaluated(steps_plan, store, checkpoint, inputs)]
    ckpt = store.lookup("checkpoint", checkpoint.store_key) if checkpoint and checkpoint.store_key else None
    if final is None and ckpt is not None:
        report = lineage.latest(instance, steps_plan.context["report"])
        if report is not None and report.store_key and report.inputs.get("checkpoint") == checkpoint.data_version:
            final = store.lookup("eval_report", report.store_key)
    if final is not None and ckpt is not None and "steps" in ckpt.counts:
        found.append(Point(int(ckpt.counts["steps"]), int(ckpt.counts.get("tokens", 0)), final.counts.get("rows", []),
                           final=True))
    return sorted(found, key=lambda p: p.step)


def _columns(pts: list[Point]) -> list[str]:
    return sorted({f"{r['task']}/{r['metric']}" for p in pts for r in p.rows})


def table_markdown(pts: list[Point]) -> str:
    columns = _columns(pts)
    lines = ["| step | tokens | " + " | ".join(columns) + " |", "|---:|---:|" + "---:|" * len(columns)]
    for p in pts:
        values = {f"{r['task']}/{r['metric']}": r["value"] for r in p.rows}
        cells = [f"{values[c]:.4f}" if c in values else "" for c in columns]
        lines.append(f"| {p.step:,}{' (final)' if p.final else ''} | {p.tokens:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _series(pts: list[Point]) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[tuple[int, float]]]]:
    """Task accuracies (acc_norm where a task has it, else acc) and held-out bits per byte, per label."""
    scores: dict[str, list[tuple[int, float]]] = {}
    heldout: dict[str, list[tuple[int, float]]] = {}
    for p in pts:
        by_task: dict[str, dict[str, float]] = {}
        for r in p.rows:
            by_task.setdefault(r["task"], {})[r["metric"]] = r["value"]
        for task, metrics in by_task.items():
            if "bits_per_byte" in metrics:
                heldout.setdefault(f"{task} bits/byte", []).append((p.tokens, metrics["bits_per_byte"]))
            for name in ("acc_norm", "acc"):
                if name in metrics:
                    scores.setdefault(f"{task} {name}", []).append((p.tokens, metrics[name]))
                    break
    return scores, heldout


def plot_png(pts: list[Point], title: str) -> bytes:
    # the Agg canvas on a bare Figure: no pyplot, no global backend switch
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scores, heldout = _series(pts)
    fig = Figure(figsize=(7.2, 3.8 if not heldout else 6.4), dpi=80)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if heldout else 1, 1, squeeze=False)[:, 0]
    for ax, series, label in zip(axes, (scores, heldout), ("accuracy", "bits per byte (lower is better)"),
                                 strict=False):
        for name, xy in sorted(series.items()):
            xs, ys = zip(*xy, strict=True)
            ax.plot(xs, ys, marker="o", label=name)
        ax.set_xlabel("training tokens")
        ax.set_ylabel(label)
        if series:
            ax.legend(fontsize=7)
    axes[0].set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version stamp in the bytes
    return buf.getvalue()


def curve_metadata(pts: list[Point], title: str) -> dict[str, Any]:
    """Dagster metadata: the per-checkpoint table and the plot (a PNG data URI, as the curated
    sources' length histogram)."""
    if not pts:
        return {}
    png = base64.b64encode(plot_png(pts, title)).decode("ascii")
    return {
        "checkpoints": MetadataValue.md(table_markdown(pts)),
        "score_vs_tokens": MetadataValue.md(f"![score vs training tokens](data:image/png;base64,{png})"),
        "curve_checkpoints": len(pts),
    }
