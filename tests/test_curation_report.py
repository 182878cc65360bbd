"""The curation report: per-step funnel counts on a hand-built decisions table, and the PNG."""

from __future__ import annotations

import base64
import io
from itertools import pairwise

import pyarrow as pa
import pyarrow.parquet as pq
from dagster import MetadataValue
from PIL import Image

from assets.curation_report import (
    curation_report_metadata,
    histogram_markdown,
    length_bins,
    length_histogram_png,
    length_lists,
    step_table,
    step_table_markdown,
)

ORDER = ["reader", "url_filter", "language", "gopher_repetition", "gopher_quality"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# (reason, step) per dropped document; 5 more documents are kept. 14 documents in all.
DROPS = [
    ("reader:empty_text", "reader"),
    ("url_filter:domain", "url_filter"),
    ("url_filter:domain", "url_filter"),
    ("language:en_low", "language"),
    ("gopher_quality:gopher_short_doc", "gopher_quality"),
    ("gopher_quality:gopher_too_many_ellipsis", "gopher_quality"),
    ("gopher_quality:gopher_short_doc", "gopher_quality"),
    ("gopher_quality:gopher_enough_stop_words", "gopher_quality"),
    ("gopher_quality:gopher_below_alpha_threshold", "gopher_quality"),
]
KEPT_CHARS = [800, 1200, 5000, 25000, 150]


def decisions() -> pa.Table:
    rows = [(f"d{i}", False, reason, step, 10 * (i + 1)) for i, (reason, step) in enumerate(DROPS)]
    rows += [(f"k{i}", True, None, None, c) for i, c in enumerate(KEPT_CHARS)]
    n = len(rows)
    return pa.table(
        {
            "doc_id": [r[0] for r in rows],
            "shard": pa.array([i % 2 for i in range(n)], pa.int32()),
            "kept": [r[1] for r in rows],
            "reason": pa.array([r[2] for r in rows], pa.string()),
            "step": pa.array([r[3] for r in rows], pa.string()),
            "chars": pa.array([r[4] for r in rows], pa.int64()),
            "words": pa.array([r[4] // 5 for r in rows], pa.int64()),
            "language": pa.array(["en"] * n, pa.string()),
            "language_score": pa.array([0.9] * n, pa.float64()),
        }
    )


def test_step_table_counts_in_pipeline_order():
    rows = step_table(decisions(), ORDER)
    got = [(r["step"], r["in"], r["kept"], r["dropped"]) for r in rows]
    assert got == [
        ("reader", 14, 13, 1),
        ("url_filter", 13, 11, 2),
        ("language", 11, 10, 1),
        ("gopher_repetition", 10, 10, 0),
        ("gopher_quality", 10, 5, 5),
    ]
    by = {r["step"]: r for r in rows}
    assert by["url_filter"]["keep_rate"] == 11 / 13
    assert by["gopher_repetition"]["keep_rate"] == 1.0 and by["gopher_repetition"]["top_reasons"] == []
    assert by["gopher_quality"]["keep_rate"] == 0.5
    # most frequent first, ties by name, only three
    assert by["gopher_quality"]["top_reasons"] == [
        ("gopher_quality:gopher_short_doc", 2),
        ("gopher_quality:gopher_below_alpha_threshold", 1),
        ("gopher_quality:gopher_enough_stop_words", 1),
    ]
    assert by["url_filter"]["top_reasons"] == [("url_filter:domain", 2)]


def test_step_table_appends_unlisted_steps_and_reads_parquet(tmp_path):
    path = tmp_path / "decisions.parquet"
    pq.write_table(decisions(), path)
    rows = step_table(path, ["reader", "url_filter", "gopher_quality"])  # `language` not listed
    got = [(r["step"], r["in"], r["kept"], r["dropped"]) for r in rows]
    assert got == [
        ("reader", 14, 13, 1),
        ("url_filter", 13, 11, 2),
        ("gopher_quality", 11, 6, 5),
        ("language", 6, 5, 1),  # appended after the listed steps: totals still add up
    ]


def test_step_table_empty_table():
    rows = step_table(decisions().slice(0, 0), ["reader", "gopher_quality"])
    assert [(r["in"], r["kept"], r["dropped"], r["keep_rate"]) for r in rows] == [(0, 0, 0, None)] * 2
    assert "| reader | 0 | 0 | 0 | – | – |" in step_table_markdown(rows)


def test_step_table_markdown():
    md = step_table_markdown(step_table(decisions(), ORDER))
    lines = md.strip().splitlines()
    assert lines[0] == "| step | in | kept | dropped | keep rate | top drop reasons |"
    assert lines[1] == "|---|---:|---:|---:|---:|---|"
    assert len(lines) == 2 + len(ORDER)
    assert lines[3] == "| url_filter | 13 | 11 | 2 | 84.6% | `url_filter:domain` 2 |"
    assert lines[5] == "| gopher_repetition | 10 | 10 | 0 | 100.0% | – |"
    assert lines[6].startswith("| gopher_quality | 10 | 5 | 5 | 50.0% | `gopher_quality:gopher_short_doc` 2<br>")
    big = [{"step": "a|b", "in": 12345, "kept": 1000, "dropped": 11345, "keep_rate": 0.081, "top_reasons": []}]
    assert "| a\\|b | 12,345 | 1,000 | 11,345 | 8.1% | – |" in step_table_markdown(big)


def test_length_histogram_png_is_valid():
    before, after = length_lists(decisions())
    assert len(before) == 14 and sorted(after) == sorted(KEPT_CHARS)
    png = length_histogram_png(before, after)
    assert png[:8] == PNG_MAGIC
    image = Image.open(io.BytesIO(png))
    image.load()  # decodes every pixel: raises on a truncated or corrupt file
    assert image.format == "PNG" and image.size == (512, 288)
    assert length_histogram_png(before, after) == png  # deterministic bytes
    empty = length_histogram_png([], [])
    assert empty[:8] == PNG_MAGIC and Image.open(io.BytesIO(empty)).size == (512, 288)


def test_length_bins_are_log_spaced_and_cover_the_longest():
    edges = length_bins([3, 25000])
    assert edges[0] == 1 and edges[-1] >= 25000 and len(edges) == 5 * 5 + 1
    ratios = {round(b / a, 6) for a, b in pairwise(edges)}
    assert ratios == {round(10 ** 0.2, 6)}
    assert length_bins([150, 900])[0] == 100 and length_bins([150, 900])[-1] == 1000
    assert length_bins([0])[0] == 1 and length_bins([])[-1] == 10


def test_histogram_markdown_embeds_a_data_uri():
    png = length_histogram_png([100, 1000], [1000])
    md = histogram_markdown(png)
    prefix = "![length histogram](data:image/png;base64,"
    assert md.startswith(prefix) and md.endswith(")")
    assert base64.b64decode(md[len(prefix) : -1]) == png


def test_curation_report_metadata():
    meta = curation_report_metadata(decisions(), ORDER)
    assert set(meta) == {"curation_steps", "length_histogram"}
    assert all(isinstance(v, MetadataValue.md("").__class__) for v in meta.values())
    assert "| gopher_quality | 10 | 5 | 5 | 50.0% |" in meta["curation_steps"].md_str
    assert meta["length_histogram"].md_str.startswith("![length histogram](data:image/png;base64,")
