"""Held-out bits-per-byte per curated source: a hash-chosen share of each source's documents is
tokenized apart (`heldout/`), never reaches the mixture, and is scored by the eval report as
`heldout:<source>` exactly as evaluation.heldout scores a text file.

Real documents from the FineWeb sample; the tiny tokenizer and strongly context-dependent model
of tests/test_evaluation.py.
"""

from __future__ import annotations

import copy
import gzip
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from dataprep.tokenize import HELDOUT_DIR, heldout_rank, tokenize_documents
from tests.recipes import tiny_recipe
from tests.support.environ import restore_environ
from tests.test_evaluation import make_model, make_tokenizer

DATA_ROOT = Path(os.environ.get("FOUNDRY_DATA_ROOT", "/work/shared/data"))
FINEWEB = DATA_ROOT / "web" / "fineweb_sample" / "fineweb_legal_dedup.jsonl.gz"

pytestmark = pytest.mark.skipif(not FINEWEB.is_file(), reason=f"sample data not found under {DATA_ROOT}")


def real_docs(n: int, skip: int = 0, max_chars: int = 600) -> list[dict]:
    """n FineWeb sample documents (text cut short to keep the tests fast), after `skip` others."""
    docs = []
    with gzip.open(FINEWEB, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i < skip:
                continue
            rec = json.loads(line)
            docs.append({"id": rec["id"], "text": rec["text"][:max_chars]})
            if len(docs) == n:
                break
    return docs


def doc_ids(folder: Path) -> list[str]:
    return pq.read_table(folder / "documents.parquet").column("doc_id").to_pylist()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("heldout_sources")
    tok = make_tokenizer(d / "tokenizer.json")
    return {"dir": d, "tok": tok, "model": make_model(tok.get_vocab_size(), seed=1)}


# --------------------------------------------------------------------------- the split


def test_split_is_deterministic_disjoint_and_hash_chosen(tiny, tmp_path):
    docs = real_docs(200)
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        out.mkdir()
        counts = tokenize_documents(docs, tiny["tok"], out, batch_size=64, heldout_share=0.2)
    for name in ("tokens.npy", "offsets.npy", "documents.parquet"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert (a / HELDOUT_DIR / name).read_bytes() == (b / HELDOUT_DIR / name).read_bytes()

    train, held = doc_ids(a), doc_ids(a / HELDOUT_DIR)
    assert not set(train) & set(held)
    assert sorted(train + held) == sorted(d["id"] for d in docs)
    assert set(held) == {d["id"] for d in docs if heldout_rank(d["id"]) < 0.2}
    assert 20 <= len(held) <= 60  # ~40 expected of 200
    assert counts["heldout_documents"] == len(held) and counts["documents"] == len(train)
    # held-out documents are ordered by rank (a token cap then takes a uniform sample)
    ranks = [heldout_rank(i) for i in held]
    assert ranks == sorted(ranks)
    # each held-out document's tokens are its text's, then EOS, as for training documents
    by_id = {d["id"]: d["text"] for d in docs}
    tokens, offsets = np.load(a / HELDOUT_DIR / "tokens.npy"), np.load(a / HELDOUT_DIR / "offsets.npy")
    eos = tiny["tok"].token_to_id("<|endoftext|>")
    for k in (0, len(held) - 1):
        expected = tiny["tok"].encode(by_id[held[k]], add_special_tokens=False).ids + [eos]
        assert tokens[offsets[k]:offsets[k + 1]].tolist() == expected
    assert int(offsets[-1]) == counts["heldout_tokens"]


def test_split_is_stable_when_documents_are_added(tiny, tmp_path):
    docs = real_docs(120)
    more = real_docs(60, skip=120)
    before, after = tmp_path / "before", tmp_path / "after"
    before.mkdir()
    after.mkdir()
    tokenize_documents(docs, tiny["tok"], before, heldout_share=0.1)
    tokenize_documents(more[:30] + docs + more[30:], tiny["tok"], after, heldout_share=0.1)
    old = {d["id"] for d in docs}
    assert set(doc_ids(before / HELDOUT_DIR)) == set(doc_ids(after / HELDOUT_DIR)) & old
    assert set(doc_ids(before)) == set(doc_ids(after)) & old
    assert set(doc_ids(after / HELDOUT_DIR)) - old  # some of the new ones are held out too


def test_no_share_writes_no_split_and_rephrased_documents_follow_their_original(tiny, tmp_path):
    docs = real_docs(80)
    plain = tmp_path / "plain"
    plain.mkdir()
    counts = tokenize_documents(docs, tiny["tok"], plain)
    assert not (plain / HELDOUT_DIR).exists() and "heldout_documents" not in counts
    assert doc_ids(plain) == [d["id"] for d in docs]

    # a rephrased corpus: ids "<original>/<style>", split by the original's id
    rephrased = [{"id": f"{d['id']}/qa", "source_id": d["id"], "text": "Q: what? A: " + d["text"][:80]} for d in docs]
    out = tmp_path / "rephrased"
    out.mkdir()
    tokenize_documents(rephrased, tiny["tok"], out, heldout_share=0.3)
    expected = {f"{d['id']}/qa" for d in docs if heldout_rank(d["id"]) < 0.3}
    assert expected and set(doc_ids(out / HELDOUT_DIR)) == expected

    with pytest.raises(ValueError, match="without an id"):
        tokenize_documents([{"text": "no id here"}], tiny["tok"], tmp_path, heldout_share=0.5)


# --------------------------------------------------------------------------- scoring


def test_bits_per_byte_equals_heldout_loss_on_each_documents_text(tiny, tmp_path):
    from evaluation.heldout import heldout_loss, heldout_loss_documents, load_token_documents

    tok, model = tiny["tok"], tiny["model"]
    docs = [d for d in real_docs(40, max_chars=900) if "\r" not in d["text"]]  # text files read \r\n as \n
    docs.append({"id": "unicode", "text": "Café — naïve ünïcode, 北京. " * 6})
    tokenize_documents(docs, tok, tmp_path, heldout_share=0.5)
    held = load_token_documents(tmp_path / HELDOUT_DIR)
    assert len(held) >= 5
    texts = {d["id"]: d["text"] for d in docs}
    order = doc_ids(tmp_path / HELDOUT_DIR)

    def direct(text: str, max_tokens: int) -> dict:
        path = tmp_path / "doc.txt"
        path.write_text(text, encoding="utf-8")
        return heldout_loss(model, tok, path, seq_len=16, max_tokens=max_tokens)

    # uncapped: the sum of heldout_loss over each document's text
    got = heldout_loss_documents(model, tok, held, seq_len=16, max_tokens=10**9, batch_size=3)
    parts = [direct(texts[i], 10**9) for i in order]
    nll = sum(p["loss"] * p["tokens"] for p in parts)
    n_tokens, n_bytes = sum(p["tokens"] for p in parts), sum(p["bytes"] for p in parts)
    assert got["documents"] == len(held) and got["tokens"] == n_tokens
    assert got["bytes"] == n_bytes == sum(len(texts[i].encode("utf-8")) for i in order)
    assert got["loss"] == pytest.approx(nll / n_tokens, rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)

    # capped inside the third document: two whole documents and that one's first targets
    cap = parts[0]["tokens"] + parts[1]["tokens"] + 7
    got = heldout_loss_documents(model, tok, held, seq_len=16, max_tokens=cap)
    parts = parts[:2] + [direct(texts[order[2]], 7)]
    nll = sum(p["loss"] * p["tokens"] for p in parts)
    assert (got["documents"], got["tokens"], got["bytes"]) == (3, cap, sum(p["bytes"] for p in parts))
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / got["bytes"], rel=1e-5)

    with pytest.raises(ValueError, match="no held-out tokens"):
        heldout_loss_documents(model, tok, [], seq_len=16, max_tokens=100)
    with pytest.raises(FileNotFoundError, match="offsets.npy"):
        (tmp_path / "broken").mkdir()
        np.save(tmp_path / "broken" / "tokens.npy", np.zeros(3, dtype=np.uint16))
        load_token_documents(tmp_path / "broken")


def test_evaluate_checkpoint_reports_each_source_and_lists_an_empty_split_as_failed(tiny, tmp_path):
    from evaluation.heldout import heldout_loss_documents, load_token_documents
    from evaluation.run import evaluate_checkpoint
    from training.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "ckpt", tiny["model"])
    tiny["tok"].save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "web").mkdir()
    tokenize_documents(real_docs(60), tiny["tok"], tmp_path / "web", heldout_share=0.2)
    (tmp_path / "small").mkdir()
    tokenize_documents(real_docs(2), tiny["tok"], tmp_path / "small", heldout_share=0.001)  # nothing held out

    res = evaluate_checkpoint(tmp_path / "ckpt", tmp_path / "tokenizer.json", [], None, DATA_ROOT, tmp_path / "work",
                              heldout=None, heldout_max_tokens=300,
                              heldout_sources={"web": tmp_path / "web" / HELDOUT_DIR,
                                               "small": tmp_path / "small" / HELDOUT_DIR})
    direct = heldout_loss_documents(tiny["model"], tiny["tok"], load_token_documents(tmp_path / "web" / HELDOUT_DIR),
                                    tiny["model"].config.max_seq_len, 300)
    assert [(r["task"], r["form"], r["metric"], r["n_items"]) for r in res["rows"]] == [
        ("heldout:web", "heldout", "loss", direct["documents"]),
        ("heldout:web", "heldout", "bits_per_byte", direct["documents"])]
    assert res["rows"][1]["value"] == pytest.approx(direct["bits_per_byte"], rel=1e-6)
    assert list(res["failed"]) == ["heldout:small"] and "no held-out documents" in res["failed"]["heldout:small"]


# --------------------------------------------------------------------------- recipe and identity


def test_recipe_share_validation_and_identity():
    from assets.factory import recipe_plans
    from assets.recipe import RecipeError, parse_recipe

    def plans(evals_extra: dict) -> dict:
        r = tiny_recipe("h")
        r["evals"] |= evals_extra
        return {p.name: p for p in recipe_plans(parse_recipe(r))}

    base, zero = plans({}), plans({"heldout_share": 0})
    assert {n: p.code_version for n, p in base.items()} == {n: p.code_version for n, p in zero.items()}
    on = plans({"heldout_share": {"fineweb": 0.01}})
    assert on["tokenized_fineweb"].code_version != base["tokenized_fineweb"].code_version
    assert on["tokenized_commoncrawl"].code_version == base["tokenized_commoncrawl"].code_version
    assert on["eval_report"].inputs["heldout_fineweb"].path == ["h", "tokenized_fineweb"]
    assert "heldout_commoncrawl" not in on["eval_report"].inputs
    assert set(base["eval_report"].inputs) == {"checkpoint", "tokenizer"}

    for bad, message in (({"heldout_share": 0.7}, "evals.heldout_share"),
                         ({"heldout_share": {"finewbe": 0.01}}, "unknown source.*finewbe")):
        with pytest.raises(RecipeError, match=message):
            plans(bad)


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow  # a real sync of a tiny recipe: ~30 s on 2 loaded cores
def test_tiny_recipe_reports_heldout_rows_per_source_and_never_trains_on_them(tmp_path):
    """Real curation (filters off), tokenization, mixture, training and eval report on one
    Dagster instance; the stats table answers the README's query."""
    from dagster import DagsterInstance

    from assets.definitions import build_definitions, load_all
    from assets.stats import query
    from assets.sync import sync
    from evaluation.heldout import heldout_loss_documents, load_token_documents
    from training.checkpoint import load_checkpoint

    recipe = tiny_recipe("held")
    off = {step: None for step in ("gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality", "minhash")}
    recipe["sources"]["fineweb"] |= {"limit": 60, "curation": copy.deepcopy(off)}
    recipe["sources"]["commoncrawl"] |= {"limit": 15, "curation": copy.deepcopy(off)}
    recipe["training"] = {"steps": 2, "batch_size": 2, "warmup_steps": 1, "log_every": 1}
    recipe["evals"] = {"tasks": [], "heldout": None, "heldout_max_tokens": 800,
                       "heldout_share": {"fineweb": 0.2, "commoncrawl": 0.25}}
    recipe["contamination"] = None
    path = tmp_path / "held.yaml"
    path.write_text(yaml.safe_dump(recipe))

    saved = {k: os.environ.get(k) for k in ("FOUNDRY_STORE", "FOUNDRY_WORKERS")}
    os.environ["FOUNDRY_STORE"] = str(tmp_path / "store")
    os.environ["FOUNDRY_WORKERS"] = "1"
    (tmp_path / "dagster_home").mkdir()
    instance = DagsterInstance.local_temp(str(tmp_path / "dagster_home"))
    try:
        t0 = time.perf_counter()
        loaded = load_all([path])
        report = sync(build_definitions(loaded), loaded, instance)
        assert report.error is None, report.error
        print(f"tiny held-out sync: {time.perf_counter() - t0:.1f} s")
        store = Path(os.environ["FOUNDRY_STORE"])
        _, rows = query(store, "select task, metric, value, n_items from evals where form = 'heldout' order by 1, 2")
        # the README's comparison across sources and recipes
        pivot_columns, pivot = query(store, "pivot (select recipe, task, value from evals where form = 'heldout' "
                                            "and metric = 'bits_per_byte') on task using first(value) order by recipe")
        _, token_rows = query(store, "select source, documents, heldout_documents from tokens")
    finally:
        instance.dispose()
        restore_environ(saved)

    got = {(task, metric): (value, n) for task, metric, value, n in rows}
    assert set(got) == {(f"heldout:{s}", m) for s in ("commoncrawl", "fineweb") for m in ("bits_per_byte", "loss")}
    assert pivot_columns == ["recipe", "heldout:commoncrawl", "heldout:fineweb"]
    assert pivot == [("held", got[("heldout:commoncrawl", "bits_per_byte")][0], got[("heldout:fineweb", "bits_per_byte")][0])]

    # the mixture's documents and each source's held-out documents never meet
    mixture = next((store / "mixture").iterdir())
    index = np.load(mixture / "index.npy")
    sources = json.loads((mixture / "sources.json").read_text())
    assert {s["name"] for s in sources} == {"fineweb", "commoncrawl"}
    ckpt = next((store / "checkpoint").iterdir())
    tokenizer_json = next((store / "tokenizer").iterdir()) / "tokenizer.json"
    from tokenizers import Tokenizer

    tok, model = Tokenizer.from_file(str(tokenizer_json)), load_checkpoint(ckpt, device="cpu")
    for s in sources:
        tokenized = (mixture / s["tokenized"]).resolve()
        mixed = {doc_ids(tokenized)[i] for i in index[index[:, 0] == s["id"], 1]}
        held = doc_ids(tokenized / HELDOUT_DIR)
        assert mixed and held and not mixed & set(held)
        assert (s["name"], len(doc_ids(tokenized)), len(held)) in token_rows
        # the reported figures are heldout.py's on that folder, under the recipe's token cap
        direct = heldout_loss_documents(model, tok, load_token_documents(tokenized / HELDOUT_DIR),
                                        model.config.max_seq_len, 800)
        value, n_items = got[(f"heldout:{s['name']}", "bits_per_byte")]
        assert value == pytest.approx(direct["bits_per_byte"], rel=1e-6)
        assert n_items == direct["documents"] <= len(held)
        assert got[(f"heldout:{s['name']}", "loss")][0] == pytest.approx(direct["loss"], rel=1e-6)
