"""Which curated documents get rephrased: a filter on the curation columns, then a seeded sample.

    where: {chars: [400, 6000], language_score: [0.8, null], domain: [en.wikipedia.org]}

A numeric column takes an inclusive [min, max] range (null = open end); a text column takes
the list of values to keep. Only documents the curation kept are candidates. The sample is
the `sample` candidates with the smallest H(seed, doc id): it does not depend on file order,
and growing `sample` keeps every document chosen before.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb

NUMERIC_COLUMNS = ("chars", "words", "language_score", "cluster_size")
TEXT_COLUMNS = ("language", "domain", "file", "url")


def where_sql(where: dict[str, Any]) -> tuple[str, list[Any]]:
    clauses, params = ["kept"], []
    for column, condition in sorted(where.items()):
        if column in NUMERIC_COLUMNS:
            low, high = condition
            if low is not None:
                clauses.append(f"{column} >= ?")
                params.append(low)
            if high is not None:
                clauses.append(f"{column} <= ?")
                params.append(high)
        elif column in TEXT_COLUMNS:
            clauses.append(f"{column} IN ({', '.join('?' * len(condition))})")
            params.extend(condition)
        else:
            raise ValueError(f"where: unknown column '{column}'; numeric: {list(NUMERIC_COLUMNS)}, "
                             f"text: {list(TEXT_COLUMNS)}")
    return " AND ".join(clauses), params


def candidate_ids(decisions: Path, where: dict[str, Any]) -> list[str]:
    sql, params = where_sql(where)
    con = duckdb.connect()
    try:
        present = {row[0] for row in con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [str(decisions)]).fetchall()}
        missing = sorted(set(where) - present)
        if missing:
            raise ValueError(f"{decisions}: no column(s) {missing} in this curated output (rebuild it with the "
                             "current Foundry)")
        rows = con.execute(f"SELECT doc_id FROM read_parquet(?) WHERE {sql}", [str(decisions), *params]).fetchall()
    finally:
        con.close()
    return [r[0] for r in rows]


def sample_ids(ids: list[str], sample: int | None, seed: int) -> list[str]:
    ranked = sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())
    return ranked if sample is None else ranked[:sample]


def iter_docs(docs_dir: Path) -> Iterator[dict]:
    for path in sorted(docs_dir.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


def select_documents(curated_dir: Path, where: dict[str, Any], sample: int | None, seed: int) -> list[dict]:
    """[{id, text}] of the chosen documents, in sample order."""
    chosen = sample_ids(candidate_ids(curated_dir / "decisions.parquet", where), sample, seed)
    rank = {doc_id: i for i, doc_id in enumerate(chosen)}
    found: list[dict | None] = [None] * len(chosen)
    for doc in iter_docs(curated_dir / "docs"):
        i = rank.get(doc.get("id"))
        if i is not None and found[i] is None:
            found[i] = {"id": doc["id"], "text": doc.get("text") or ""}
    missing = [doc_id for doc_id, doc in zip(chosen, found, strict=True) if doc is None]
    if missing:
        raise ValueError(f"{curated_dir}: {len(missing)} kept document(s) of decisions.parquet are not in docs/, "
                         f"e.g. {missing[:3]}")
    return [d for d in found if d is not None]
