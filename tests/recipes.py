"""Tiny recipes for tests: a few hundred real documents, a tiny model, a few steps."""

from __future__ import annotations

import copy

_TINY = {
    "sources": {
        "fineweb": {
            "kind": "jsonl",
            "path": "web/fineweb_sample/fineweb_legal_dedup.jsonl.gz",
            "limit": 100,
            "curation": {"gopher_repetition": {}, "gopher_quality": {}, "c4_quality": {}, "fineweb_quality": {}},
        },
        "commoncrawl": {
            "kind": "jsonl",
            "path": "web/commoncrawl_raw",
            "limit": 40,  # per file
            "curation": {"gopher_repetition": {}, "gopher_quality": {"min_doc_words": 50}, "c4_quality": {},
                         "fineweb_quality": {}},
        },
    },
    "tokenizer": {"vocab_size": 400, "sample_docs_per_source": 60},
    "mixture": {"weights": {"fineweb": 0.7, "commoncrawl": 0.3}, "total_tokens": 30000},
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "ffn_hidden": 64, "seq_len": 64},
    "training": {"steps": 6, "batch_size": 4, "warmup_steps": 2, "log_every": 3},
    "evals": {"tasks": ["hellaswag", "arc_easy"], "max_items": 6, "heldout_max_tokens": 1500},
}


def tiny_recipe(name: str) -> dict:
    recipe = copy.deepcopy(_TINY)
    recipe["name"] = name
    return recipe
