"""data_stats: DuckDB views over the Parquet statistics of each recipe's current outputs.

Each recipe's data_stats output is `tables.json` (which Parquet file feeds which table, with
the recipe/source columns to add). Publishing it points `<store>/stats/recipes/<recipe>.json`
at it and rebuilds `<store>/stats.duckdb` from every recipe's pointer: built in a temp file
under a lock and renamed into place, so readers never see a half-written database and
concurrent writers never interleave.

The database holds only views, so it is disposable: one DuckDB cannot open (garbage bytes, a
truncated copy, a bad checksum) is rebuilt from the recipes' pointers and the Parquet files by
`repair_database`, which `foundry sql` and `foundry sync` call.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

from .store import Manifest, atomic_write_json

if TYPE_CHECKING:  # engine imports Dagster (~3 s): `foundry sql` needs none of it
    from .engine import BuildContext


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())

STATS_DB = "stats.duckdb"

# table -> the producing asset kind, the parquet file inside its output, and the columns taken
# from it with their DuckDB types (a column an older output lacks reads as a typed NULL)
TABLES: dict[str, dict[str, Any]] = {
    "curation": {
        "kind": "curated", "file": "decisions.parquet",
        "columns": {"doc_id": "VARCHAR", "kept": "BOOLEAN", "reason": "VARCHAR", "step": "VARCHAR",
                    "chars": "BIGINT", "words": "BIGINT", "shard": "INTEGER", "language": "VARCHAR",
                    "language_score": "DOUBLE", "file": "VARCHAR", "url": "VARCHAR", "domain": "VARCHAR",
                    "cluster_id": "BIGINT", "cluster_size": "BIGINT"},
    },
    "ocr_queue": {
        "kind": "ocr_queue", "file": "ocr_queue.parquet",
        "columns": {"source": "VARCHAR", "doc_id": "VARCHAR", "file": "VARCHAR", "pages": "BIGINT",
                    "ocr_score": "DOUBLE", "reason": "VARCHAR", "chars": "BIGINT", "producer": "VARCHAR",
                    "chars_per_page": "DOUBLE", "image_only_share": "DOUBLE", "scanned_share": "DOUBLE",
                    "garbled_share": "DOUBLE", "bad_word_share": "DOUBLE", "vowel_share": "DOUBLE"},
    },
    "rephrase": {
        "kind": "rephrased", "file": "rephrase.parquet",
        "columns": {"name": "VARCHAR", "source": "VARCHAR", "source_id": "VARCHAR", "style": "VARCHAR",
                    "status": "VARCHAR", "reason": "VARCHAR", "chunks": "BIGINT", "tokens_in": "BIGINT",
                    "tokens_out": "BIGINT", "latency_s": "DOUBLE", "attempts": "BIGINT", "cached_chunks": "BIGINT",
                    "backend": "VARCHAR", "model": "VARCHAR"},
    },
    "contamination": {
        "kind": "contamination", "file": "contamination.parquet",
        "columns": {"task": "VARCHAR", "item": "BIGINT", "ngrams": "BIGINT", "matched": "BIGINT",
                    "contaminated": "BOOLEAN", "corpus": "VARCHAR"},
    },
    "tokens": {
        "kind": "tokenized", "file": "stats.parquet",
        # heldout_*: documents held out of training (evals.heldout_share); NULL where none are
        "columns": {"documents": "BIGINT", "tokens": "BIGINT", "heldout_documents": "BIGINT", "heldout_tokens": "BIGINT"},
    },
    "mixture": {
        "kind": "mixture", "file": "mixture.parquet",
        "columns": {"source": "VARCHAR", "weight": "DOUBLE", "tokens": "BIGINT", "epochs": "DOUBLE",
                    "target_tokens": "BIGINT", "available_tokens": "BIGINT", "documents": "BIGINT",
                    "shortfall_tokens": "BIGINT"},
    },
    "train_metrics": {
        "kind": "checkpoint", "file": "metrics.parquet",
        "columns": {"step": "BIGINT", "tokens": "BIGINT", "loss": "DOUBLE", "lr": "DOUBLE", "grad_norm": "DOUBLE",
                    "tokens_per_s": "DOUBLE", "max_attn_logit": "DOUBLE", "moe_lb_loss": "DOUBLE",
                    "moe_z_loss": "DOUBLE", "skipped": "BOOLEAN",
                    "rollbacks": "BIGINT"},  # NaN/inf rollbacks before the step (on_nonfinite: rollback; else NULL)
    },
    "expert_load": {  # MoE checkpoints only: tokens routed per (layer, expert, source) per logging window
        "kind": "checkpoint", "file": "expert_load.parquet",
        "columns": {"step": "BIGINT", "layer": "BIGINT", "expert": "BIGINT", "source": "VARCHAR", "tokens": "BIGINT"},
    },
    "evals": {  # step, tokens: the checkpoint's step and training tokens (final report: the last step)
        "kind": "eval_report", "file": "evals.parquet",
        "columns": {"step": "BIGINT", "tokens": "BIGINT", "task": "VARCHAR", "form": "VARCHAR", "metric": "VARCHAR",
                    "value": "DOUBLE", "stderr": "DOUBLE", "n_items": "BIGINT"},
    },
    "eval_items": {
        "kind": "eval_report", "file": "details.parquet",
        "columns": {"step": "BIGINT", "task": "VARCHAR", "form": "VARCHAR", "item": "BIGINT", "pred": "BIGINT",
                    "gold": "BIGINT", "correct": "BOOLEAN", "correct_norm": "BOOLEAN"},
    },
    "ablations": {  # one row per ablation run (variant x seed) and metric; `grid` is the ablation's name
        "kind": "ablation_report", "file": "ablations.parquet",
        "columns": {"grid": "VARCHAR", "variant": "VARCHAR", "seed": "BIGINT", "metric": "VARCHAR", "value": "DOUBLE"},
    },
}
# producing kind -> its tables (an eval report feeds both evals and eval_items)
KIND_TO_TABLES: dict[str, list[str]] = {}
for _name, _spec in TABLES.items():
    KIND_TO_TABLES.setdefault(_spec["kind"], []).append(_name)
# the reports of kept checkpoint steps (assets/eval_steps.py) feed the same tables, same files
KIND_TO_TABLES["eval_step"] = KIND_TO_TABLES["eval_report"]
# tables whose rows carry no per-source column added here (mixture, rephrase and ocr_queue bring
# their own)
NO_SOURCE_TABLES = ("ocr_queue", "mixture", "rephrase", "contamination", "train_metrics", "expert_load", "evals",
                    "eval_items", "ablations")


def build_data_stats(ctx: BuildContext, gathered: Sequence[Manifest] = ()) -> dict[str, Any]:
    """tables.json: rows of (table, recipe, source, store-relative parquet path). `gathered`:
    outputs that are not inputs but whose statistics belong here (reports of kept checkpoint steps)."""
    recipe = ctx.plan.recipe
    entries = []
    outputs = [(role, ctx.upstream[role].manifest) for role in sorted(ctx.upstream)] + [(None, m) for m in gathered]
    for role, manifest in outputs:
        for table in KIND_TO_TABLES.get(manifest.kind, []):
            parquet = manifest.path / TABLES[table]["file"]
            if not parquet.is_file():
                continue  # e.g. an eval report built before details.parquet existed
            source = role.split("_", 1)[1] if role and role.startswith(("curated_", "tokenized_")) else None
            entries.append({"table": table, "recipe": recipe, "source": source,
                            "file": f"{manifest.kind}/{manifest.key}/{TABLES[table]['file']}"})
    atomic_write_json(ctx.out_dir / "tables.json", entries)
    return {"tables": sorted({e["table"] for e in entries}), "files": len(entries)}


def describe_data_stats(manifest: Manifest) -> dict[str, Any]:
    return {"tables": ", ".join(manifest.counts.get("tables", [])), "parquet_files": manifest.counts.get("files", 0)}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def publish(store_root: Path, recipe: str, manifest: Manifest) -> Path:
    """Point the recipe at this output and rebuild the shared stats database."""
    pointer_dir = store_root / "stats" / "recipes"
    with _locked(store_root / "stats" / ".lock"):
        atomic_write_json(pointer_dir / f"{recipe}.json", read_json(manifest.path / "tables.json"))
        return rebuild_database(store_root)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _null(column: str, sql_type: str) -> str:
    return f"NULL::{sql_type} AS {column}"


def _select_columns(path: Path, spec: dict[str, Any]) -> list[str]:
    """The table's columns; one an older output lacks is a typed NULL."""
    import pyarrow.parquet as pq

    present = set(pq.read_schema(path).names)
    return [c if c in present else _null(c, t) for c, t in spec["columns"].items()]


def view_sql(store_root: Path, entries: list[dict[str, Any]]) -> dict[str, str]:
    selects: dict[str, list[str]] = {name: [] for name in TABLES}
    for e in entries:
        spec = TABLES[e["table"]]
        path = store_root / e["file"]
        if not path.is_file():
            continue  # output deleted from the store: leave it out rather than break every query
        cols = ", ".join(_select_columns(path, spec))
        # mixture.parquet has its own source column; the other NO_SOURCE_TABLES have none
        src = "" if e["table"] in NO_SOURCE_TABLES else f"{_quote(e['source'] or '')} AS source, "
        selects[e["table"]].append(
            f"SELECT {_quote(e['recipe'])} AS recipe, {src}{cols} FROM read_parquet({_quote(str(path))})"
        )
    sql = {}
    for name, spec in TABLES.items():
        if selects[name]:
            sql[name] = " UNION ALL ".join(selects[name])
        else:
            columns = {"recipe": "VARCHAR"} | ({} if name in NO_SOURCE_TABLES else {"source": "VARCHAR"})
            columns |= spec["columns"]
            sql[name] = f"SELECT {', '.join(_null(c, t) for c, t in columns.items())} WHERE false"
    return sql


def rebuild_database(store_root: Path) -> Path:
    entries: list[dict[str, Any]] = []
    for pointer in sorted((store_root / "stats" / "recipes").glob("*.json")):
        entries.extend(read_json(pointer))
    target = store_root / STATS_DB
    tmp = store_root / f".tmp-{STATS_DB}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        con = duckdb.connect(str(tmp))
        try:
            for name, sql in view_sql(store_root, entries).items():
                con.execute(f"CREATE VIEW {name} AS {sql}")
        finally:
            con.close()
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
        Path(f"{tmp}.wal").unlink(missing_ok=True)
    return target


def _unreadable(db: Path) -> str | None:
    """Why DuckDB cannot open the database, or None if it can."""
    try:
        con = duckdb.connect(str(db), read_only=True)
    except duckdb.Error as err:
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    con.close()
    return None


def repair_database(store_root: Path) -> str | None:
    """Rebuild stats.duckdb if it exists but cannot be opened, or is gone while recipes point
    at statistics. Returns what was wrong (None if nothing was)."""
    db = store_root / STATS_DB
    has_pointers = any((store_root / "stats" / "recipes").glob("*.json"))
    if not db.exists() and not has_pointers:
        return None
    why = _unreadable(db) if db.exists() else "missing"
    if why is None:
        return None
    with _locked(store_root / "stats" / ".lock"):
        why = _unreadable(db) if db.exists() else "missing"
        if why is None:
            return None  # another process repaired it while this one waited
        rebuild_database(store_root)
    return f"{db} was unreadable ({why}); rebuilt it from the Parquet statistics"


def _to_stderr(note: str) -> None:
    print(note, file=sys.stderr, flush=True)


def query(store_root: Path, sql: str, notice: Callable[[str], None] = _to_stderr) -> tuple[list[str], list[tuple]]:
    """Run one read-only query against the stats database (repaired first if it is corrupt)."""
    db = store_root / STATS_DB
    if not db.is_file():
        raise FileNotFoundError(f"{db} does not exist yet: run `foundry sync` (or `foundry demo`) first")
    note = repair_database(store_root)
    if note:
        notice(note)
    con = duckdb.connect(str(db), read_only=True)
    try:
        cur = con.execute(sql)
        columns = [d[0] for d in cur.description] if cur.description else []
        return columns, cur.fetchall()
    finally:
        con.close()
