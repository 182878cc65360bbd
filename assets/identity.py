"""Identity of asset outputs: canonical JSON, code versions and store keys.

    code_version = H(logic version of the implementing module + canonical spec section)
    store key    = H(code_version + data versions of the inputs)

Equal keys mean equal outputs, so an existing key is a cache hit. Nothing here knows about
paths, worker counts or devices: those cannot change a hash.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

HASH_CHARS = 16

# One string per implementing module. Bump it when the module's logic changes its output,
# so every output it produced before is rebuilt (and old ones stay in the store).
LOGIC_VERSIONS: dict[str, str] = {
    "raw": "raw-1",
    "filtered": "filtered-2",  # one file through the filters; 2: nested metadata (url), no Trafilatura dedup
    "curated": "curated-2",  # 2: gathers per-file partitions, MinHash dedup, url/cluster columns
    "ocr_queue": "ocr_queue-1",
    "rephrased": "rephrased-1",
    "contamination": "contamination-1",
    "tokenizer": "tokenizer-2",  # 2: WARC samples extracted without Trafilatura's cross-page dedup
    "tokenized": "tokenized-1",
    "mixture": "mixture-1",
    "checkpoint": "checkpoint-1",
    "eval_report": "eval-3",  # 2: form column, per-item details.parquet; 3: step and tokens columns, held-out per source
    "eval_step": "eval_step-1",  # one kept checkpoint step through the eval_report's evaluation
    "ablation_report": "ablation_report-2",  # 2: best vs every other entity; mixtures as inputs
    "data_stats": "stats-4",  # 2: eval_items; 3: curation url/cluster columns; 4: rephrase, contamination, ocr_queue, expert_load
}


def _plain(obj: Any) -> Any:
    """Turn pydantic models, tuples and non-string dict keys into JSON-stable values."""
    if isinstance(obj, BaseModel):
        return _plain(obj.model_dump(mode="json"))
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and obj.is_integer():
        # 1 and 1.0 in YAML mean the same threshold: hash them the same.
        return int(obj)
    return obj


def canonical_json(obj: Any) -> str:
    return json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def short_hash(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(canonical_json(part).encode())
        h.update(b"\x00")
    return h.hexdigest()[:HASH_CHARS]


def code_version(kind: str, spec: Any) -> str:
    """The asset's Dagster code version: its logic version plus its own spec section."""
    return short_hash(LOGIC_VERSIONS[kind], spec)


def store_key(code_version_: str, input_versions: Mapping[str, str]) -> str:
    """Key of an output directory. Inputs are given by role (e.g. 'curated', 'tokenizer')."""
    return short_hash(code_version_, dict(sorted(input_versions.items())))
