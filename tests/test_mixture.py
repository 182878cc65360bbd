"""Mixture index: deterministic, proportional to weights, capped in epochs, honest about shortfall."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from dataprep.mixture import SourceShare, build_mixture


def lengths(n: int, lo: int, hi: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(lo, hi + 1, size=n).astype(np.int64)


def per_source_tokens(index: np.ndarray, names: list[str], doc_lengths: dict[str, np.ndarray]) -> dict[str, int]:
    return {n: int(doc_lengths[n][index[index[:, 0] == sid, 1]].sum()) for sid, n in enumerate(names)}


DOCS = {"web": lengths(400, 20, 200, 1), "code": lengths(300, 50, 500, 2), "books": lengths(50, 1000, 3000, 3)}


def test_deterministic_for_a_seed():
    args = (DOCS, {"web": 0.5, "code": 0.3, "books": 0.2}, 60_000, {"web": 4.0, "code": 4.0, "books": 4.0})
    i1, s1 = build_mixture(*args, seed=7)
    i2, s2 = build_mixture(*args, seed=7)
    np.testing.assert_array_equal(i1, i2)
    assert s1 == s2
    i3, s3 = build_mixture(*args, seed=8)
    assert not np.array_equal(i1, i3)
    assert len(i3) > 0
    # a different seed reshuffles, it does not change how much of each source is used beyond one document
    for a, b in zip(s1, s3):
        assert a.target_tokens == b.target_tokens
        assert abs(a.tokens - b.tokens) < int(DOCS[a.name].max())


def test_shares_proportional_to_weights_within_one_document():
    weights = {"web": 5.0, "code": 3.0, "books": 2.0}
    total = 40_000
    caps = {n: 10.0 for n in weights}
    index, shares = build_mixture(DOCS, weights, total, caps, seed=0)
    names = list(weights)
    assert [s.name for s in shares] == names
    assert [s.target_tokens for s in shares] == [20_000, 12_000, 8_000]
    actual = per_source_tokens(index, names, DOCS)
    for s in shares:
        longest = int(DOCS[s.name].max())
        assert s.tokens == actual[s.name]  # reported tokens are what the index holds
        assert s.target_tokens <= s.tokens < s.target_tokens + longest
        assert abs(s.tokens - total * weights[s.name] / 10.0) < longest
        assert s.shortfall_tokens == 0
        assert s.documents == int((index[:, 0] == names.index(s.name)).sum())
        assert s.available_tokens == int(DOCS[s.name].sum())
        assert s.epochs == pytest.approx(s.tokens / s.available_tokens)


def test_weights_need_not_sum_to_one():
    a, sa = build_mixture(DOCS, {"web": 0.8, "code": 0.2}, 10_000, {"web": 2, "code": 2}, seed=3)
    b, sb = build_mixture(DOCS, {"web": 8, "code": 2}, 10_000, {"web": 2, "code": 2}, seed=3)
    np.testing.assert_array_equal(a, b)
    assert [s.target_tokens for s in sa] == [s.target_tokens for s in sb] == [8_000, 2_000]


def test_multiple_full_epochs_repeat_every_document():
    docs = {"small": np.array([10, 20, 30, 40], dtype=np.int64)}  # 100 tokens
    index, [share] = build_mixture(docs, {"small": 1.0}, 300, {"small": 5.0}, seed=0)
    assert share == SourceShare(name="small", weight=1.0, available_tokens=100, target_tokens=300, tokens=300,
                                documents=12, epochs=3.0, shortfall_tokens=0)
    assert Counter(index[:, 1].tolist()) == {0: 3, 1: 3, 2: 3, 3: 3}


def test_epoch_cap_and_exact_shortfall():
    docs = {"big": lengths(500, 100, 300, 4), "tiny": np.array([7, 13, 25, 5, 50], dtype=np.int64)}  # tiny: 100
    weights = {"big": 0.5, "tiny": 0.5}
    index, (big, tiny) = build_mixture(docs, weights, 20_000, {"big": 4.0, "tiny": 3.0}, seed=11)
    assert tiny == SourceShare(name="tiny", weight=0.5, available_tokens=100, target_tokens=10_000, tokens=300,
                               documents=15, epochs=3.0, shortfall_tokens=9_700)
    # every tiny document exactly 3 times: the cap, nothing more
    tiny_docs = index[index[:, 0] == 1, 1]
    assert Counter(tiny_docs.tolist()) == {0: 3, 1: 3, 2: 3, 3: 3, 4: 3}
    # the shortfall is not filled from the other source
    assert big.target_tokens == 10_000
    assert 10_000 <= big.tokens < 10_000 + 300
    assert big.shortfall_tokens == 0
    assert per_source_tokens(index, ["big", "tiny"], docs) == {"big": big.tokens, "tiny": 300}


def test_cap_below_one_epoch_integral_lengths():
    docs = {"s": np.full(20, 10, dtype=np.int64)}  # 200 tokens
    index, [s] = build_mixture(docs, {"s": 1}, 1_000, {"s": 0.5}, seed=5)
    assert (s.tokens, s.documents, s.epochs, s.shortfall_tokens) == (100, 10, 0.5, 900)
    assert len(set(index[:, 1].tolist())) == 10  # a subset without repeats


@pytest.mark.parametrize("seed", range(5))
def test_fractional_epoch_cap_never_exceeded(seed):
    docs = {"s": np.array([30, 30, 30, 10], dtype=np.int64)}  # 100 tokens
    _, [s] = build_mixture(docs, {"s": 1.0}, 1_000, {"s": 1.5}, seed=seed)
    assert s.tokens <= 150
    assert s.epochs <= 1.5


def test_zero_weight_source_excluded():
    weights = {"web": 1.0, "code": 0.0, "books": 1.0}
    docs = {"web": DOCS["web"], "books": DOCS["books"]}  # no lengths needed for a zero-weight source
    index, shares = build_mixture(docs, weights, 10_000, {"web": 4.0, "books": 4.0}, seed=0)
    assert [s.name for s in shares] == ["web", "books"]
    assert set(index[:, 0].tolist()) == {0, 1}
    assert [s.target_tokens for s in shares] == [5_000, 5_000]
    # same result as leaving the source out entirely
    index2, shares2 = build_mixture(docs, {"web": 1.0, "books": 1.0}, 10_000, {"web": 4.0, "books": 4.0}, seed=0)
    np.testing.assert_array_equal(index, index2)
    assert shares == shares2


def test_index_rows_reference_valid_documents():
    weights = {"web": 0.6, "code": 0.3, "books": 0.1}
    caps = {"web": 1.0, "code": 2.0, "books": 1.0}
    index, shares = build_mixture(DOCS, weights, 200_000, caps, seed=42)
    names = list(weights)
    assert index.dtype == np.int64
    assert index.ndim == 2 and index.shape[1] == 2
    assert len(index) == sum(s.documents for s in shares)
    sids = index[:, 0]
    assert sids.min() >= 0 and sids.max() < len(names)
    for sid, name in enumerate(names):
        docs = index[sids == sid, 1]
        assert docs.min() >= 0 and docs.max() < len(DOCS[name])
        cap = caps[name]
        assert Counter(docs.tolist()).most_common(1)[0][1] <= int(np.ceil(cap))
    # the index is shuffled across sources, not concatenated
    first_block = sids[: shares[0].documents]
    assert len(set(first_block.tolist())) > 1


def test_empty_source_and_zero_budget_share():
    docs = {"a": np.array([], dtype=np.int64), "b": np.array([5, 5], dtype=np.int64)}
    index, (a, b) = build_mixture(docs, {"a": 1.0, "b": 1.0}, 10, {"a": 4.0, "b": 4.0}, seed=0)
    assert (a.tokens, a.documents, a.epochs, a.shortfall_tokens) == (0, 0, 0.0, 5)
    assert (b.tokens, b.documents, b.shortfall_tokens) == (5, 1, 0)
    assert index.tolist() in ([[1, 0]], [[1, 1]])
