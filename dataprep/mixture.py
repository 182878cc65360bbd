"""Mixtures: weights per source and a token budget -> a deterministic shuffled document index.

For each source the share is budget * w / sum(w). A source with fewer tokens than its share
is repeated (whole epochs, then a seeded subset) up to its epoch cap; what is still missing
is reported as shortfall and never silently filled from other sources.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SourceShare:
    name: str
    weight: float
    available_tokens: int
    target_tokens: int
    tokens: int
    documents: int
    epochs: float
    shortfall_tokens: int


def _take(doc_lengths: np.ndarray, target: int, cap: float, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Document ids (with repeats) whose lengths sum to ~target, at most `cap` epochs."""
    available = int(doc_lengths.sum())
    if available == 0 or target <= 0:
        return np.empty(0, dtype=np.int64), 0
    allowed = min(target, math.floor(cap * available))
    full_epochs = allowed // available
    parts = [np.arange(len(doc_lengths), dtype=np.int64)] * int(full_epochs)
    remainder = allowed - full_epochs * available
    taken = full_epochs * available
    if remainder > 0:
        order = rng.permutation(len(doc_lengths))
        cum = np.cumsum(doc_lengths[order])
        if allowed < target:
            # capped: the largest prefix that stays within the cap (the shortfall is reported)
            n = int(np.searchsorted(cum, remainder, side="right"))
        else:
            # uncapped: the smallest prefix that covers the share (overshoot < one document)
            n = min(int(np.searchsorted(cum, remainder, side="left")) + 1, len(order))
        if n > 0:
            parts.append(order[:n].astype(np.int64))
            taken += int(cum[n - 1])
    ids = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    return ids, int(taken)


def build_mixture(
    doc_lengths: dict[str, np.ndarray],
    weights: dict[str, float],
    total_tokens: int,
    epoch_caps: dict[str, float],
    seed: int,
) -> tuple[np.ndarray, list[SourceShare]]:
    """Returns the shuffled index (rows of source_id, doc_id) and one share per source.

    Source ids follow the order of `weights` (sources with weight 0 are left out).
    """
    names = [n for n, w in weights.items() if w > 0]
    total_weight = sum(weights[n] for n in names)
    rng = np.random.default_rng(seed)
    rows: list[np.ndarray] = []
    shares: list[SourceShare] = []
    for sid, name in enumerate(names):
        lengths = doc_lengths[name]
        target = int(round(total_tokens * weights[name] / total_weight))
        ids, taken = _take(lengths, target, epoch_caps[name], rng)
        available = int(lengths.sum())
        rows.append(np.stack([np.full(len(ids), sid, dtype=np.int64), ids], axis=1))
        shares.append(
            SourceShare(
                name=name,
                weight=weights[name],
                available_tokens=available,
                target_tokens=target,
                tokens=taken,
                documents=len(ids),
                epochs=taken / available if available else 0.0,
                shortfall_tokens=max(0, target - taken),
            )
        )
    index = np.concatenate(rows) if rows else np.empty((0, 2), dtype=np.int64)
    index = index[rng.permutation(len(index))]
    return index, shares
