"""Shared-prefix (tree-mask) log-likelihood scoring equals the naive one-row-per-request path.

Real items of HellaSwag, ARC-Easy (cloze and letters), WinoGrande (partial scoring) and LAMBADA
from the task loaders, a tiny random model with large weights (so scores depend strongly on
context and position), and a window of 64 tokens so some contexts are cut and some items'
trees overflow one row.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from evaluation.tasks import TASK_SPECS, cloze_prompt, load_records
from tests.test_evaluation import DATA_ROOT, MAX_SEQ_LEN, make_tokenizer

pytestmark = pytest.mark.skipif(not (DATA_ROOT / "eval").is_dir(), reason=f"eval data not found under {DATA_ROOT}")

TASKS = ["hellaswag", "arc_easy", "arc_easy:mc", "winogrande", "lambada"]
N_ITEMS = 12


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("batching") / "tokenizer.json")


@pytest.fixture(scope="module")
def docs():
    out = []
    for task in TASKS:
        out += [cloze_prompt(r, task) for r in load_records(TASK_SPECS[task], DATA_ROOT)[:N_ITEMS]]
    return out


def _model(tok, **extra):
    from training.model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      ffn_hidden=64, max_seq_len=MAX_SEQ_LEN, **extra)
    model = Transformer(cfg)
    with torch.no_grad():  # large weights: strongly context- and position-dependent predictions
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.4)
    return model.eval()


def _lm(model, tok, shared_prefix: bool, batch_size: int = 8):
    from evaluation.lighteval_model import FoundryLightevalModel, FoundryModelConfig

    cfg = FoundryModelConfig(model_name="t", cache_dir="unused", batch_size=batch_size, shared_prefix=shared_prefix)
    return FoundryLightevalModel(model, tok, cfg)


VARIANTS = {
    "dense": {},
    # the EOS put before every context starts its own document: positions restart after it
    "intra_doc_nope": {"intra_doc_mask": True, "nope_every": 2},
    "moe": {"moe_experts": 4, "moe_top_k": 2, "moe_shared_expert": True},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_shared_prefix_equals_naive_on_real_items(tok, docs, variant):
    extra = dict(VARIANTS[variant])
    if extra.get("intra_doc_mask"):
        extra["eos_token_id"] = tok.token_to_id("<|endoftext|>")
    model = _model(tok, **extra)
    tree = _lm(model, tok, shared_prefix=True).score_docs(docs)
    naive = _lm(model, tok, shared_prefix=False).score_docs(docs)
    assert len(tree) == len(naive) == len(docs)
    for doc, a, b in zip(docs, tree, naive, strict=True):
        assert len(a.logprobs) == len(doc.choices)
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert abs(x - y) <= 1e-5 + 1e-6 * abs(y), (doc.task_name, doc.query[:60], x, y)
        argmax = lambda lps: max(range(len(lps)), key=lps.__getitem__)  # noqa: E731
        assert argmax(a.logprobs) == argmax(b.logprobs)
        assert a.argmax_logits_eq_gold == b.argmax_logits_eq_gold
        assert a.output_tokens == b.output_tokens and a.truncated_tokens_count == b.truncated_tokens_count
    # the comparison covers cut contexts and a spread of scores, not only easy cases
    assert any(r.truncated_tokens_count > 0 for r in naive)
    assert max(max(r.logprobs) - min(r.logprobs) for r in naive if len(r.logprobs) > 1) > 5.0


def test_batch_size_does_not_change_tree_scores(tok, docs):
    model = _model(tok)
    one = _lm(model, tok, True, batch_size=1).score_docs(docs[:20])
    many = _lm(model, tok, True, batch_size=16).score_docs(docs[:20])
    for a, b in zip(one, many, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5, rel=1e-6)


def _distinct_prefixes(seqs: list[list[int]]) -> int:
    return len({tuple(s[:k]) for s in seqs for k in range(1, len(s))})


def test_context_is_packed_once(tok, docs):
    """A cloze item's tree holds its context once plus each choice's own tokens; WinoGrande's
    two contexts share their common prefix; rows never exceed the window."""
    from evaluation.shared_prefix import pack_groups

    lm = _lm(_model(tok), tok, True)
    by_task = {}
    for d in docs:
        by_task.setdefault(d.task_name, []).append(d)
    arc = by_task["arc_easy"][0]
    pairs = [lm.encode_pair(lm.context_for(arc), c) for c in arc.choices]
    seqs = [ctx + cont for ctx, cont in pairs]
    rows = pack_groups([[(i, s, len(pairs[i][1])) for i, s in enumerate(seqs)]], max_nodes=10_000)
    assert len(rows) == 1
    # one node per distinct input prefix: the context once, then each choice's own tokens
    # (choices that begin alike share those tokens too)
    assert len(rows[0]) == _distinct_prefixes(seqs)
    assert len(rows[0]) <= len(pairs[0][0]) + sum(len(cont) - 1 for _, cont in pairs)
    assert len(rows[0]) < sum(len(s) - 1 for s in seqs) - 2 * len(pairs[0][0])

    wino = by_task["winogrande"][0]
    contexts = wino.specific["contexts"]
    import dataclasses
    wpairs = [lm.encode_pair(lm.context_for(dataclasses.replace(wino, query=q)), wino.choices[0]) for q in contexts]
    wseqs = [c + k for c, k in wpairs]
    common = next(i for i, (x, y) in enumerate(zip(*wseqs)) if x != y)
    assert common > 3
    (wrow,) = pack_groups([[(i, s, len(wpairs[i][1])) for i, s in enumerate(wseqs)]], max_nodes=10_000)
    assert len(wrow) == sum(len(s) - 1 for s in wseqs) - common == _distinct_prefixes(wseqs)

    rows = pack_groups([[(i, s, len(pairs[i][1])) for i, s in enumerate(seqs)]], max_nodes=max(map(len, seqs)))
    assert len(rows) >= 2 and all(len(r) <= max(map(len, seqs)) for r in rows)  # overflow starts a new row
    with pytest.raises(ValueError, match="exceed the row limit"):
        pack_groups([[(0, seqs[0], 1)]], max_nodes=3)


def test_tree_layout_restarts_documents_after_eos():
    """Positions are tree depths; with an EOS id, the node after an EOS starts a document at
    position 0 and sees nothing before it; padding sees only itself."""
    import numpy as np

    from evaluation.shared_prefix import TreeRow, tree_layout

    row = TreeRow()
    row.add(0, [9, 1, 2, 3], [4])  # 9 = EOS
    row.add(1, [9, 1, 5], [6])  # shares 9, 1
    pos, mask = tree_layout(row, width=7, eos_id=None)
    assert pos.tolist() == [0, 1, 2, 3, 2, 0, 0]
    assert mask[4].tolist() == [True, True, False, False, True, False, False]  # 5 sees 9, 1, itself
    pos, mask = tree_layout(row, width=7, eos_id=9)
    assert pos.tolist() == [0, 0, 1, 2, 1, 0, 0]
    assert mask[1].tolist() == [False, True, False, False, False, False, False]
    assert mask[3].tolist() == [False, True, True, True, False, False, False]
    assert np.array_equal(mask[5:, 5:], np.eye(2, dtype=bool)) and not mask[5:, :5].any()


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_progress_counts_every_scored_choice(tok, docs, shared_prefix):
    from dataprep.progress import Progress

    records = []
    lm = _lm(_model(tok), tok, shared_prefix=shared_prefix, batch_size=4)
    lm.progress = Progress("scoring eval choices", report=records.append, unit="choices", every=0.0)
    lm.score_docs(docs)
    choices = sum(len(d.choices) for d in docs)
    done = lm.progress.finish()
    assert lm.progress.total == choices and done["done"] == choices and done["eta_s"] == 0.0
    progress = [r for r in records if r["event"] == "progress"]
    assert len(progress) >= 2 and progress[0]["done"] < choices  # reported batch by batch, with a rate
    assert all(r["rate"] > 0 and r["eta_s"] is not None for r in progress)
