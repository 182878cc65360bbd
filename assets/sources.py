"""raw_<source>: the source files, identified by their content.

Nothing is copied: the output is `files.json` (name, bytes, sha256 of each file), so the data
version is the content of the source and moving the data root changes nothing. Readers find
the files again through the recipe and refuse to read them if their size changed since.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from dagster import MetadataValue

from .engine import BuildContext, read_json
from .recipe import SourceSpec, source_files
from .store import Manifest, atomic_write_json, file_sha256


def raw_spec(src: SourceSpec) -> dict[str, Any]:
    """The part of a source that defines what is read (curation settings and partitioning excluded)."""
    return src.model_dump(mode="json", exclude={"curation", "shards", "batches"})


def reader_spec(src: SourceSpec) -> dict[str, Any]:
    """How documents are read from the files (the path is not part of it: content is)."""
    spec = src.model_dump(mode="json", include={"kind", "text_key", "id_key", "limit"})
    if src.kind == "pdf":  # extraction code is the reader here: a new version re-extracts every file
        from dataprep.pdf import LOGIC_VERSION as PDF_LOGIC_VERSION

        spec["extraction"] = PDF_LOGIC_VERSION
    return spec


def _common_parent(files: list[Path]) -> Path:
    return Path(os.path.commonpath([str(f.parent) for f in files]))


def file_names(files: list[Path]) -> dict[str, Path]:
    """Name of each file relative to the source folder (its partition key) -> path."""
    if not files:
        return {}
    base = _common_parent(files)
    return {f.relative_to(base).as_posix(): f for f in files}


def file_table(files: list[Path]) -> list[dict[str, Any]]:
    return [{"name": name, "bytes": f.stat().st_size, "sha256": file_sha256(f)} for name, f in file_names(files).items()]


def content_hash(table: list[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for row in table:
        h.update(f"{row['name']}\0{row['sha256']}\n".encode())
    return h.hexdigest()[:16]


def fingerprint(files: list[Path]) -> dict[str, list[int]]:
    """Cheap change detector (size, mtime) used by sync to decide whether to re-hash."""
    return {name: [f.stat().st_size, f.stat().st_mtime_ns] for name, f in file_names(files).items()}


def build_raw(ctx: BuildContext, table: list[dict[str, Any]]) -> dict[str, Any]:
    atomic_write_json(ctx.out_dir / "files.json", table)
    # How the files are read is part of what this asset hands on: a new `limit` or text key
    # must give a new data version, or curated/tokenizer would reuse outputs of the old reading.
    atomic_write_json(ctx.out_dir / "reader.json", reader_spec(ctx.plan.context["source"]))
    return {"files": len(table), "source_bytes": sum(r["bytes"] for r in table)}


def describe_raw(manifest: Manifest) -> dict[str, Any]:
    table = read_json(manifest.path / "files.json")
    rows = "\n".join(f"| {r['name']} | {r['bytes']:,} | `{r['sha256'][:12]}` |" for r in table)
    return {
        "files": len(table),
        "source_bytes": sum(r["bytes"] for r in table),
        "listing": MetadataValue.md("| file | bytes | sha256 |\n|---|---:|---|\n" + rows),
    }


def resolve_files(src: SourceSpec, data_root: Path, raw_dir: Path, label: str) -> list[Path]:
    """The source's files now, checked against what raw_<source> recorded."""
    files = source_files(src, data_root)
    recorded = read_json(raw_dir / "files.json")
    base = _common_parent(files) if files else data_root
    now = {f.relative_to(base).as_posix(): f.stat().st_size for f in files}
    then = {r["name"]: r["bytes"] for r in recorded}
    if now != then:
        raise RuntimeError(
            f"{label}: source files changed since they were recorded ({sorted(set(now) ^ set(then)) or 'sizes differ'}); "
            "run `foundry sync` so raw data is re-recorded first"
        )
    return files
