"""rephrased_<name>: kept documents of a curated source rewritten in the recipe's styles.

Identity (code version) = selection + style identities (name, version, digest) + backend
kind, model and sampling parameters; endpoint, key, concurrency and timeouts are knobs. A
transformers model folder also enters as a content fingerprint. Generations live in the
request cache (`<store>/cache/rephrase.sqlite`) the moment they arrive, so a killed build
resumes where it stopped and a build that differs only in, say, the sample size asks the
model only for the new documents.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from dagster import MetadataValue

from dataprep.rephrase.cache import RequestCache
from dataprep.rephrase.run import rephrase_documents
from dataprep.rephrase.select import select_documents
from dataprep.rephrase.styles import load_style

from .engine import BuildContext
from .recipe import RephraseBackendSpec, RephraseSpec
from .settings import PROJECT_ROOT, expand_vars, resolve_data_path
from .store import Manifest

CACHE_FILE = "cache/rephrase.sqlite"
ROW_SCHEMA = pa.schema([
    ("name", pa.string()), ("source", pa.string()), ("source_id", pa.string()), ("style", pa.string()),
    ("status", pa.string()), ("reason", pa.string()), ("chunks", pa.int64()), ("tokens_in", pa.int64()),
    ("tokens_out", pa.int64()), ("latency_s", pa.float64()), ("attempts", pa.int64()),
    ("cached_chunks", pa.int64()), ("backend", pa.string()), ("model", pa.string()),
])


class RephraseFailed(RuntimeError):
    pass


def rephrase_spec(spec: RephraseSpec) -> dict[str, Any]:
    return spec.hashed()


def model_folder(backend: RephraseBackendSpec, data_root: Path) -> Path:
    return resolve_data_path(backend.model or "", data_root)


def make_backend(spec: RephraseBackendSpec, data_root: Path, fingerprint: str | None = None):
    """The backend a spec names, with its knobs; the API key is read from the environment here only."""
    if spec.kind == "extractive":
        from dataprep.rephrase.extractive import ExtractiveBackend

        return ExtractiveBackend(max_items=spec.max_items)
    if spec.kind == "openai":
        from dataprep.rephrase.openai_backend import OpenAIBackend

        api_key = None
        if spec.api_key_env:
            api_key = os.environ.get(spec.api_key_env)
            if not api_key:
                raise RephraseFailed(f"backend.api_key_env names {spec.api_key_env}, which is not set")
        params = {k: v for k, v in spec.params().items()}
        return OpenAIBackend(base_url=expand_vars(spec.base_url).rstrip("/"), model=spec.model, params=params,
                             api_key=api_key, concurrency=spec.concurrency, timeout_s=spec.timeout_s,
                             max_retries=spec.max_retries, backoff_s=spec.backoff_s)
    from dataprep.rephrase.hf_backend import TransformersBackend, model_fingerprint

    folder = model_folder(spec, data_root)
    backend = TransformersBackend(folder, params=spec.params(), batch_size=spec.batch_size, device=spec.device)
    # the folder's content, not its name, is the model's identity in every request key
    backend.model = f"{folder.name}@{(fingerprint or model_fingerprint(folder))[:12]}"
    return backend


def build_rephrased(ctx: BuildContext) -> dict[str, Any]:
    spec: RephraseSpec = ctx.plan.context["rephrase"]
    name = ctx.plan.context["name"]
    curated = ctx.upstream["curated"]
    docs = select_documents(curated.dir, spec.where, spec.sample, spec.seed)
    if not docs:
        raise RephraseFailed(f"{ctx.plan.label}: no kept document of curated_{spec.source} matches "
                             f"where={json.dumps(spec.where)}")
    styles = [load_style(ref, PROJECT_ROOT) for ref in spec.styles]
    backend = make_backend(spec.backend, ctx.foundry.data_path(), ctx.plan.context.get("model_fingerprint"))
    with RequestCache(ctx.foundry.store().root / CACHE_FILE) as cache:
        outputs, rows, counts = rephrase_documents(
            docs, styles, backend, cache, spec.backend.params(), spec.max_chunk_chars,
            log=ctx.log.info, label=ctx.plan.label)
    status = Counter(r["status"] for r in rows)
    if rows and status["ok"] == 0:
        reasons = Counter(r["reason"] for r in rows).most_common(3)
        raise RephraseFailed(f"{ctx.plan.label}: every one of {len(rows):,} documents failed "
                             f"({'; '.join(f'{n}x {r}' for r, n in reasons)}); finished requests stay in the "
                             "request cache, so a rerun asks only for the rest")
    docs_dir = ctx.out_dir / "docs"
    docs_dir.mkdir()
    with open(docs_dir / "00000.jsonl", "w", encoding="utf-8") as f:
        for doc in outputs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    for r in rows:
        r.update(name=name, source=spec.source, backend=backend.name, model=backend.model)
    pq.write_table(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), ctx.out_dir / "rephrase.parquet")
    reasons = Counter(r["reason"] for r in rows if r["status"] != "ok")
    ctx.log.info(f"{ctx.plan.label}: {status['ok']:,} of {len(rows):,} document-styles rephrased "
                 f"({status['failed']:,} failed, {status['empty']:,} empty); {counts['requested']:,} requests sent, "
                 f"{counts['cached']:,} from the cache")
    return {
        "selected": len(docs), "pairs": len(rows), "documents": status["ok"], "failed": status["failed"],
        "empty": status["empty"], "requests": counts["requests"], "requested": counts["requested"],
        "cached_requests": counts["cached"], "tokens_in": sum(r["tokens_in"] for r in rows),
        "tokens_out": sum(r["tokens_out"] for r in rows), "backend": backend.name, "model": backend.model,
        "styles": {s.name: s.version for s in styles},
        "reasons": dict(reasons.most_common(20)),
    }


def describe_rephrased(manifest: Manifest) -> dict[str, Any]:
    c = manifest.counts
    pairs = max(c.get("pairs", 0), 1)
    meta: dict[str, Any] = {
        "documents": c.get("documents", 0),
        "failed": c.get("failed", 0),
        "failed_share": round(c.get("failed", 0) / pairs, 4),
        "empty": c.get("empty", 0),
        "backend": f"{c.get('backend')}:{c.get('model')}",
        "styles": MetadataValue.json(c.get("styles", {})),
        "tokens_out": c.get("tokens_out", 0),
        "requests_sent": c.get("requested", 0),
        "requests_from_cache": c.get("cached_requests", 0),
    }
    reasons = c.get("reasons") or {}
    if reasons:
        lines = ["| reason | documents |", "|---|---:|", *(f"| {r} | {n:,} |" for r, n in reasons.items())]
        meta["failure_reasons"] = MetadataValue.md("\n".join(lines))
    sample = _first_document(manifest.path / "docs" / "00000.jsonl")
    if sample:
        meta["sample"] = MetadataValue.md(f"**{sample['id']}** ({sample['style']}, template v{sample['template_version']})"
                                          f"\n\n```\n{sample['text'][:1200]}\n```")
    return meta


def _first_document(path: Path) -> dict | None:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        line = f.readline()
    return json.loads(line) if line.strip() else None
