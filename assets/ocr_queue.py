"""ocr_queue_<source>: the documents of a kind pdf source whose text layer should be replaced by OCR.

Curation drops them at the reader (`needs_ocr`: a text layer that looks scanned or garbled; or
`no_text_layer` on pages that hold images) and keeps their text out of every corpus. This asset
lists them, highest ocr_score first, so an OCR backend (none runs here; Foundry ships none by
default) can take them in order: ocr_queue.parquet with one row per document, and the `ocr_queue`
stats table.

The reader does not keep a dropped document's metadata, so the queued files are extracted again
with the source's settings (only those files: the figures are those curation decided on). Only
deterministic columns are written (no timings), so an identical rebuild keeps its data version.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from dagster import MetadataValue

from .engine import BuildContext
from .recipe import PdfExtractionSpec, SourceSpec
from .sources import file_names, resolve_files
from .store import Manifest

QUEUE_FILE = "ocr_queue.parquet"
QUEUED_REASONS = ("needs_ocr", "no_text_layer")  # reader drops that OCR can fix (no_text_layer: if images)
TOP_ENTRIES = 10
FIGURES = ("chars_per_page", "image_only_share", "scanned_share", "garbled_share", "bad_word_share", "vowel_share")
SCHEMA = pa.schema([
    ("source", pa.string()),
    ("doc_id", pa.string()),  # the file's sha256, as in the curation table
    ("file", pa.string()),  # path under the source folder (as in files.json and the curation table)
    ("pages", pa.int64()),
    ("ocr_score", pa.float64()),
    ("reason", pa.string()),  # needs_ocr | no_text_layer
    ("chars", pa.int64()),  # characters of the text layer that was judged
    ("producer", pa.string()),
    *((name, pa.float64()) for name in FIGURES),
])


def ocr_queue_spec(src: SourceSpec) -> dict[str, Any]:
    # The extraction settings decide the score and pages of each queued file.
    return {"pdf": src.curation.pdf.model_dump(mode="json") if src.curation.pdf else None}


def build_ocr_queue(ctx: BuildContext) -> dict[str, Any]:
    from dataprep.pdf import PdfExtractor

    src: SourceSpec = ctx.plan.context["source"]
    name: str = ctx.plan.context["name"]
    decisions = pq.read_table(ctx.upstream["curated"].dir / "decisions.parquet", columns=["doc_id", "reason", "file"])
    candidates = decisions.filter(pc.is_in(decisions["reason"], pa.array(QUEUED_REASONS)))
    rows: list[dict[str, Any]] = []
    if candidates.num_rows:
        files = file_names(resolve_files(src, ctx.foundry.data_path(), ctx.upstream["raw"].dir, ctx.plan.label))
        settings = src.curation.pdf or PdfExtractionSpec()
        with PdfExtractor(time_limit_s=settings.time_limit_s, max_pages=settings.max_pages,
                          ocr_threshold=settings.ocr_threshold) as extractor:
            for doc_id, reason, file in zip(*(candidates[c].to_pylist() for c in ("doc_id", "reason", "file")),
                                            strict=True):
                result = extractor.extract(files[file])
                if result.sha256 != doc_id:
                    raise RuntimeError(f"{ctx.plan.label}: {file} changed since it was curated "
                                       f"(sha256 {result.sha256} != {doc_id}); run `foundry sync`")
                if reason == "no_text_layer" and not result.needs_ocr:
                    continue  # blank pages: nothing for OCR to read
                figures = result.figures
                rows.append({
                    "source": name, "doc_id": doc_id, "file": file, "pages": result.pages,
                    "ocr_score": round(result.ocr_score, 4), "reason": reason, "chars": result.chars,
                    "producer": result.producer,
                    **{f: (None if figures is None or getattr(figures, f) is None else round(getattr(figures, f), 4))
                       for f in FIGURES},
                })
    rows.sort(key=lambda r: (-r["ocr_score"], r["file"]))
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    pq.write_table(table, ctx.out_dir / QUEUE_FILE)
    reasons: dict[str, int] = {}
    for r in rows:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    ctx.log.info(f"{ctx.plan.label}: {len(rows):,} of {decisions.num_rows:,} documents need OCR "
                 f"({sum(r['pages'] for r in rows):,} pages)")
    return {"queued": len(rows), "pages": sum(r["pages"] for r in rows), "documents": decisions.num_rows,
            "reasons": reasons}


def top_entries_markdown(table: pa.Table, n: int = TOP_ENTRIES) -> str:
    head = "| file | pages | ocr_score | reason |\n|---|---:|---:|---|\n"
    rows = table.slice(0, n).to_pylist()
    body = "\n".join(f"| {r['file']} | {r['pages']:,} | {r['ocr_score']:.3f} | `{r['reason']}` |" for r in rows)
    more = f"\n\n{table.num_rows - n:,} more in the `ocr_queue` table." if table.num_rows > n else ""
    return head + body + more if rows else "Nothing needs OCR."


def describe_ocr_queue(manifest: Manifest) -> dict[str, Any]:
    c = manifest.counts
    docs = c.get("documents", 0)
    out: dict[str, Any] = {
        "queued": c.get("queued", 0),
        "queued_pages": c.get("pages", 0),
        "documents": docs,
        "queued_share": round(c.get("queued", 0) / docs, 4) if docs else 0.0,
        "reasons": MetadataValue.json(c.get("reasons", {})),
    }
    queue = manifest.path / QUEUE_FILE
    if queue.is_file():
        out["top_entries"] = MetadataValue.md(top_entries_markdown(pq.read_table(queue)))
    return out
