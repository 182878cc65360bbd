"""tokenizer (BPE trained on raw samples, or a given file) and tokenized_<source>."""

from __future__ import annotations

import shutil
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dataprep.tokenize import iter_curated_docs, load_tokenizer, sample_texts, tokenize_documents, train_bpe

from .engine import BuildContext
from .sources import resolve_files
from .store import Manifest


def build_tokenizer(ctx: BuildContext) -> dict[str, Any]:
    spec = ctx.plan.context["tokenizer"]
    target = ctx.out_dir / "tokenizer.json"
    if spec.path is not None:
        shutil.copyfile(ctx.plan.context["tokenizer_file"], target)
        tok = load_tokenizer(target)
        return {"vocab_size": tok.get_vocab_size(), "trained": False}
    sources = []
    for name, src in ctx.plan.context["sources"].items():
        up = ctx.upstream[name]
        files = resolve_files(src, ctx.foundry.data_path(), up.dir, ctx.plan.label)
        sources.append(
            {"files": files, "kind": src.kind, "text_key": src.text_key, "id_key": src.id_key,
             "limit": src.limit, "data_version": up.manifest.data_version}
        )
    # Sample in data-version order so the tokenizer does not depend on source names.
    sources.sort(key=lambda s: s["data_version"])
    texts = sample_texts(sources, spec.sample_docs_per_source, spec.seed)
    ctx.log.info(f"{ctx.plan.label}: training BPE (vocab {spec.vocab_size}) on {len(texts):,} raw documents")
    tok = train_bpe(texts, spec.vocab_size, spec.min_frequency)
    tok.save(str(target))
    return {"vocab_size": tok.get_vocab_size(), "trained": True, "sample_documents": len(texts),
            "sample_chars": sum(len(t) for t in texts)}


def describe_tokenizer(manifest: Manifest) -> dict[str, Any]:
    return {k: v for k, v in manifest.counts.items() if k in ("vocab_size", "trained", "sample_documents")}


def tokenized_spec(heldout_share: float) -> dict[str, Any]:
    """The hashed spec of tokenized_<corpus>: empty unless a share is held out, so recipes
    without one keep their identity."""
    return {"heldout_share": heldout_share} if heldout_share > 0 else {}


def build_tokenized(ctx: BuildContext) -> dict[str, Any]:
    tok = load_tokenizer(ctx.upstream["tokenizer"].dir / "tokenizer.json")
    docs = iter_curated_docs(ctx.upstream["curated"].dir / "docs")
    meter = ctx.progress("tokenizing", total=ctx.upstream["curated"].manifest.counts.get("kept"))
    share = float(ctx.plan.spec.get("heldout_share", 0.0))
    counts = tokenize_documents(docs, tok, ctx.out_dir, progress=meter, heldout_share=share)
    stats = {"documents": [counts["documents"]], "tokens": [counts["tokens"]]}
    if share > 0:  # only then: an output without a held-out split stays byte for byte as before
        stats |= {"heldout_documents": [counts["heldout_documents"]], "heldout_tokens": [counts["heldout_tokens"]]}
    pq.write_table(pa.table(stats), ctx.out_dir / "stats.parquet")
    held = f" (+ {counts['heldout_tokens']:,} held out in {counts['heldout_documents']:,})" if share > 0 else ""
    ctx.log.info(f"{ctx.plan.label}: {counts['tokens']:,} tokens in {counts['documents']:,} documents{held}")
    return counts


def describe_tokenized(manifest: Manifest) -> dict[str, Any]:
    c = manifest.counts
    meta = {"documents": c.get("documents", 0), "tokens": c.get("tokens", 0),
            "tokens_per_document": round(c.get("tokens", 0) / max(c.get("documents", 1), 1), 1)}
    if "heldout_documents" in c:
        meta |= {"heldout_documents": c["heldout_documents"], "heldout_tokens": c["heldout_tokens"]}
    return meta
