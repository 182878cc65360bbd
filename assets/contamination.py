"""contamination: which eval items share a word 13-gram with the training corpora.

Inputs are the corpora the mixture draws from (curated and rephrased); every document of
them is scanned, a superset of what training reads, so nothing trained on escapes the check.
Output: contamination.parquet, one row per eval item the report scores. Scores without the
flagged items are one query away (README, `foundry sql`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from dagster import MetadataValue

from dataprep.rephrase.select import iter_docs
from evaluation.contamination import eval_items, scan
from evaluation.tasks import check_tasks

from .engine import BuildContext
from .store import Manifest

SCHEMA = pa.schema([("task", pa.string()), ("item", pa.int64()), ("ngrams", pa.int64()), ("matched", pa.int64()),
                    ("contaminated", pa.bool_()), ("corpus", pa.string())])


def contamination_spec(recipe) -> dict[str, Any]:
    e = recipe.evals
    return {"ngram": recipe.contamination.ngram, "tasks": list(e.tasks), "max_items": e.max_items, "seed": e.seed}


def build_contamination(ctx: BuildContext) -> dict[str, Any]:
    evals, n = ctx.plan.context["evals"], ctx.plan.context["contamination"].ngram
    items = eval_items(check_tasks(list(evals.tasks)), ctx.foundry.data_path(), evals.max_items, evals.seed, n)
    corpora = [(name, (d.get("text") or "" for d in iter_docs(up.dir / "docs"))) for name, up in sorted(ctx.upstream.items())]
    docs = scan(items, corpora, n)
    rows = [{"task": it.task, "item": it.item, "ngrams": it.ngrams, "matched": len(it.matched),
             "contaminated": bool(it.matched), "corpus": it.corpus} for it, _ in items]
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), ctx.out_dir / "contamination.parquet")
    flagged = Counter(r["task"] for r in rows if r["contaminated"])
    total = Counter(r["task"] for r in rows)
    ctx.log.info(f"{ctx.plan.label}: {sum(flagged.values()):,} of {len(rows):,} eval items share a {n}-gram "
                 f"with {sum(docs.values()):,} training documents")
    return {"items": len(rows), "contaminated": sum(flagged.values()), "documents_scanned": docs,
            "unchecked_short_items": sum(1 for r in rows if r["ngrams"] == 0),
            "per_task": {t: {"items": total[t], "contaminated": flagged[t]} for t in sorted(total)}}


def describe_contamination(manifest: Manifest) -> dict[str, Any]:
    c = manifest.counts
    lines = ["| task | items | contaminated |", "|---|---:|---:|"]
    lines += [f"| {t} | {v['items']:,} | {v['contaminated']:,} |" for t, v in c.get("per_task", {}).items()]
    return {"items": c.get("items", 0), "contaminated": c.get("contaminated", 0),
            "contaminated_share": round(c.get("contaminated", 0) / max(c.get("items", 0), 1), 4),
            "per_task": MetadataValue.md("\n".join(lines)),
            "documents_scanned": MetadataValue.json(c.get("documents_scanned", {}))}
