"""The curation report shown in the Dagster UI: a per-step funnel and a length histogram.

Pure functions over the curation decisions table (one row per input document; columns
doc_id, shard, kept, reason, step, chars, words, language, language_score). `step` names the
step that dropped the document (`reader` for reader drops) and is null when it was kept;
`reason` is `<step>:<why>`. A document is dropped by at most one step: later steps never see it.
"""

from __future__ import annotations

import base64
import io
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from dagster import MetadataValue

TOP_REASONS = 3


def _table(decisions: pa.Table | str | Path) -> pa.Table:
    if isinstance(decisions, (str, Path)):
        return pq.read_table(decisions, columns=["kept", "reason", "step", "chars"])
    return decisions


def step_table(decisions: pa.Table | str | Path, step_order: list[str]) -> list[dict[str, Any]]:
    """Per step, in pipeline order: documents in, kept, dropped, keep rate, top reasons.

    `in` of a step is what the previous step kept (the first step sees every document).
    Steps that drop documents but are missing from `step_order` are appended after it in
    name order, so the last row's `kept` is always the number of kept documents.
    Row keys: step, in, kept, dropped, keep_rate (None when nothing came in),
    top_reasons (list of (reason, count), most frequent first, ties by name).
    """
    table = _table(decisions)
    steps = table.column("step").to_pylist()
    reasons = table.column("reason").to_pylist()
    kept_flags = table.column("kept").to_pylist()
    dropped_by: Counter[str] = Counter()
    reasons_by: dict[str, Counter[str]] = {}
    for step, reason, kept in zip(steps, reasons, kept_flags, strict=True):
        if kept:
            continue
        name = step or "unknown"
        dropped_by[name] += 1
        reasons_by.setdefault(name, Counter())[reason or f"{name}:dropped"] += 1
    order = list(dict.fromkeys(step_order))
    order += sorted(s for s in dropped_by if s not in order)
    rows = []
    remaining = table.num_rows
    for step in order:
        dropped = dropped_by.get(step, 0)
        kept = remaining - dropped
        top = sorted(reasons_by.get(step, Counter()).items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_REASONS]
        rows.append(
            {
                "step": step,
                "in": remaining,
                "kept": kept,
                "dropped": dropped,
                "keep_rate": kept / remaining if remaining else None,
                "top_reasons": top,
            }
        )
        remaining = kept
    return rows


def step_table_markdown(rows: list[dict[str, Any]]) -> str:
    """The step table as GitHub markdown (for MetadataValue.md)."""
    lines = [
        "| step | in | kept | dropped | keep rate | top drop reasons |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        rate = "–" if r["keep_rate"] is None else f"{100 * r['keep_rate']:.1f}%"
        reasons = "<br>".join(f"`{_cell(reason)}` {n:,}" for reason, n in r["top_reasons"]) or "–"
        lines.append(f"| {_cell(r['step'])} | {r['in']:,} | {r['kept']:,} | {r['dropped']:,} | {rate} | {reasons} |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def length_bins(values: list[int], per_decade: int = 5) -> list[float]:
    """Log-spaced bin edges (characters) over whole decades covering every value (lengths below 1 count as 1)."""
    low = max(1, min(values, default=1))
    high = max(1, max(values, default=1))
    first = math.floor(math.log10(low))
    last = max(first + 1, math.ceil(math.log10(high + 1)))
    return [10 ** (i / per_decade) for i in range(first * per_decade, last * per_decade + 1)]


def length_histogram_png(before_chars: list[int], after_chars: list[int]) -> bytes:
    """PNG histogram of document length (characters, log-spaced bins): before vs after curation."""
    # The Agg canvas on a bare Figure: no pyplot, no global backend switch, thread-safe.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    edges = length_bins(list(before_chars) + list(after_chars))
    fig = Figure(figsize=(6.4, 3.6), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    clip = [max(1, c) for c in before_chars], [max(1, c) for c in after_chars]
    ax.hist(clip[0], bins=edges, alpha=0.5, label=f"before ({len(before_chars):,})", color="#7f7f7f")
    ax.hist(clip[1], bins=edges, alpha=0.7, label=f"after ({len(after_chars):,})", color="#1f77b4")
    ax.set_xscale("log")
    ax.set_xlabel("document length (characters)")
    ax.set_ylabel("documents")
    ax.set_title("Document length before vs after curation")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version stamp in the bytes
    return buf.getvalue()


def histogram_markdown(png: bytes, title: str = "length histogram") -> str:
    """Markdown embedding the PNG as a data URI.

    Dagster's UI renders it: its markdown sanitizer adds `data` to the allowed `src` protocols
    (ui-core MarkdownWithPlugins.tsx) and react-markdown v8 applies no image URI transform.
    """
    return f"![{title}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


def length_lists(decisions: pa.Table | str | Path) -> tuple[list[int], list[int]]:
    """(chars of every document, chars of kept documents)."""
    table = _table(decisions)
    chars = [c or 0 for c in table.column("chars").to_pylist()]
    kept = table.column("kept").to_pylist()
    return chars, [c for c, k in zip(chars, kept, strict=True) if k]


def curation_report_metadata(decisions: pa.Table | str | Path, step_order: list[str]) -> dict[str, Any]:
    """Dagster metadata: the step funnel and the length histogram as markdown."""
    table = _table(decisions)
    before, after = length_lists(table)
    return {
        "curation_steps": MetadataValue.md(step_table_markdown(step_table(table, step_order))),
        "length_histogram": MetadataValue.md(histogram_markdown(length_histogram_png(before, after))),
    }
