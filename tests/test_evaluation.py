"""Tests for evaluation/: cloze tasks through a real lighteval Pipeline, held-out loss, offline guard.

Uses a tiny byte-level BPE (vocab 300) trained on a few KB of WikiText-2 and a tiny random
Transformer whose weights are scaled up so that log-probs depend strongly on context (a
default-init model is nearly uniform, which would hide off-by-one errors in scoring).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", str(Path(__file__).resolve().parents[1] / ".cache" / "hf"))

import pytest
import torch
import torch.nn.functional as F

from evaluation.tasks import TASK_SPECS, get_spec, load_records, prepare_task_dataset

DATA_ROOT = Path(os.environ.get("FOUNDRY_DATA_ROOT", "/work/shared/data"))
WIKITEXT_VALID = DATA_ROOT / "text" / "wikitext2" / "valid.txt"
N_ITEMS = 12
MAX_SEQ_LEN = 64

pytestmark = pytest.mark.skipif(not (DATA_ROOT / "eval").is_dir(), reason=f"eval data not found under {DATA_ROOT}")


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def no_network():
    """Block internet sockets (AF_INET/AF_INET6 connects and DNS lookups); yield the list of attempts."""
    attempts: list = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"network blocked in tests: connect {address}")
        return real_connect(self, address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"network blocked in tests: connect_ex {address}")
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        attempts.append(host)
        raise socket.gaierror(f"network blocked in tests: getaddrinfo {host}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", connect)
        mp.setattr(socket.socket, "connect_ex", connect_ex)
        mp.setattr(socket, "getaddrinfo", getaddrinfo)
        yield attempts


def make_tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = WIKITEXT_VALID.read_text(encoding="utf-8")[:8000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([text], trainer)
    tok.save(str(path))
    return Tokenizer.from_file(str(path))


def make_model(vocab_size: int, seed: int):
    from training.model import ModelConfig, Transformer

    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                      max_seq_len=MAX_SEQ_LEN)
    model = Transformer(cfg)
    with torch.no_grad():  # large weights: strongly context-dependent predictions
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.4)
    return model.eval()


def direct_choice_logprob(model, tok, context: str, continuation: str) -> float:
    """Unbatched reference for log P(continuation | context): EOS-prefixed context, trailing
    context spaces moved to the continuation, left truncation to the model window."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    eos = tok.token_to_id("<|endoftext|>")
    ctx = [eos] + tok.encode(context, add_special_tokens=False).ids
    cont = tok.encode(continuation, add_special_tokens=False).ids
    seq = (ctx + cont)[-(model.config.max_seq_len + 1):]
    with torch.no_grad():
        logits, _ = model(torch.tensor([seq[:-1]]))
    lp = F.log_softmax(logits[0].double(), dim=-1)
    n_cont = min(len(cont), len(seq) - 1)
    return sum(float(lp[i - 1, seq[i]]) for i in range(len(seq) - n_cont, len(seq)))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from training.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("eval_assets")
    tok = make_tokenizer(d / "tokenizer.json")
    model = make_model(tok.get_vocab_size(), seed=0)
    save_checkpoint(d / "ckpt", model)
    return {"dir": d, "tok": tok, "model": model, "ckpt": d / "ckpt", "tok_path": d / "tokenizer.json"}


@pytest.fixture(scope="module")
def result(assets):
    from evaluation.run import evaluate_checkpoint

    with no_network() as attempts:
        res = evaluate_checkpoint(
            assets["ckpt"], assets["tok_path"], ["hellaswag", "arc_easy"], N_ITEMS, DATA_ROOT,
            assets["dir"] / "work", heldout="wikitext2", heldout_max_tokens=1500, seed=0,
        )
    return {"res": res, "attempts": list(attempts)}


# --------------------------------------------------------------------------- lighteval run


def test_real_run_metrics(result):
    res = result["res"]
    assert result["attempts"] == [], f"evaluation tried to reach the network: {result['attempts']}"
    rows = {(r["task"], r["metric"]): r for r in res["rows"]}
    for task in ("hellaswag", "arc_easy"):
        for metric in ("acc", "acc_norm"):
            r = rows[(task, metric)]
            assert 0.0 <= r["value"] <= 1.0
            assert r["n_items"] == N_ITEMS
        task_items = [d for d in res["details"] if d["task"] == task]
        assert len(task_items) == N_ITEMS
        assert len({d["item"] for d in task_items}) == N_ITEMS
        # lighteval's aggregated metrics agree with its own per-item scores
        assert rows[(task, "acc")]["value"] == pytest.approx(sum(d["correct"] for d in task_items) / N_ITEMS)
        assert rows[(task, "acc_norm")]["value"] == pytest.approx(
            sum(d["correct_norm"] for d in task_items) / N_ITEMS
        )
        for d in task_items:
            assert d["correct"] == (d["pred"] == d["gold"])
    assert rows[("wikitext2", "loss")]["n_items"] == 1500
    assert rows[("wikitext2", "loss")]["value"] > 0
    assert rows[("wikitext2", "bits_per_byte")]["value"] > 0


def test_per_item_logprobs_match_direct_computation(result, assets):
    """Recompute choice log-likelihoods from the *source files* (via the reported item index)
    with an unbatched reference: checks item mapping, prompt, tokenisation, truncation,
    batching/padding and the order lighteval hands results back in."""
    model, tok = assets["model"], assets["tok"]
    details = result["res"]["details"]
    spreads = []
    for task in ("hellaswag", "arc_easy"):
        records = load_records(get_spec(task), DATA_ROOT)
        for d in [x for x in details if x["task"] == task][:4]:
            rec = records[d["item"]]
            assert d["gold"] == rec["gold"]
            ref = [direct_choice_logprob(model, tok, rec["query"], c) for c in rec["choices"]]
            assert d["logprobs"] == pytest.approx(ref, abs=2e-3, rel=1e-4)
            assert d["pred"] == max(range(len(ref)), key=ref.__getitem__)
            norm = [lp / len(c) for lp, c in zip(ref, rec["choices"])]
            assert d["pred_norm"] == max(range(len(norm)), key=norm.__getitem__)
            spreads.append(max(ref) - min(ref))
    assert max(spreads) > 5.0  # the model is far from uniform, so the comparison means something


def _make_fixed_model(assets, work_dir: Path, name: str, pick):
    """A lighteval model that scores choice `pick(doc)` at 0 and every other choice at -10."""
    from lighteval.models.model_output import ModelResponse
    from lighteval.tasks.requests import SamplingMethod
    from lighteval.utils.cache_management import cached

    from evaluation.lighteval_model import FoundryLightevalModel, FoundryModelConfig

    class Fixed(FoundryLightevalModel):
        @cached(SamplingMethod.LOGPROBS)
        def loglikelihood(self, docs):
            return [
                ModelResponse(logprobs=[0.0 if i == pick(doc) else -10.0 for i in range(len(doc.choices))],
                              argmax_logits_eq_gold=[i == pick(doc) for i in range(len(doc.choices))],
                              output_tokens=[[1]] * len(doc.choices))  # one token each (token norm)
                for doc in docs
            ]

    cfg = FoundryModelConfig(model_name=name, cache_dir=str(work_dir / "lighteval_cache"))
    return Fixed(assets["model"], assets["tok"], cfg)


@pytest.mark.parametrize("kind,expected", [("oracle", 1.0), ("anti_oracle", 0.0)])
def test_oracle_models_through_pipeline(assets, tmp_path, kind, expected):
    """A model that always prefers the gold choice scores 1.0, one that always prefers a wrong
    choice scores 0.0: the metrics really look at gold and at our log-probs."""
    from evaluation.run import run_lighteval

    if kind == "oracle":
        pick = lambda doc: doc.gold_index  # noqa: E731
    else:
        pick = lambda doc: (doc.gold_index + 1) % len(doc.choices)  # noqa: E731
    lm = _make_fixed_model(assets, tmp_path, kind, pick)
    with no_network() as attempts:
        rows, details, failed = run_lighteval(None, None, ["hellaswag", "arc_easy"], N_ITEMS, DATA_ROOT, tmp_path,
                                              kind, lighteval_model=lm)
    assert attempts == [] and failed == {}
    assert {(r["task"], r["metric"]) for r in rows} == {
        (t, m) for t in ("hellaswag", "arc_easy") for m in ("acc", "acc_norm", "acc_norm_token")
    }
    for r in rows:
        assert r["value"] == expected and r["n_items"] == N_ITEMS


def test_overwritten_checkpoint_in_same_work_dir_is_rescored(assets, result):
    """lighteval caches predictions by model name + config; a new checkpoint written to the
    same path, evaluated in the same work_dir, must not get the old scores back."""
    import shutil

    from evaluation.run import evaluate_checkpoint
    from training.checkpoint import save_checkpoint

    ckpt = assets["dir"] / "ckpt_rewritten"
    shutil.copytree(assets["ckpt"], ckpt)
    work = assets["dir"] / "work"  # the work_dir already used by the `result` fixture
    first = evaluate_checkpoint(ckpt, assets["tok_path"], ["arc_easy"], N_ITEMS, DATA_ROOT, work, heldout=None)
    save_checkpoint(ckpt, make_model(assets["tok"].get_vocab_size(), seed=1))
    second = evaluate_checkpoint(ckpt, assets["tok_path"], ["arc_easy"], N_ITEMS, DATA_ROOT, work, heldout=None)

    orig = {d["item"]: d["logprobs"] for d in result["res"]["details"] if d["task"] == "arc_easy"}
    a = {d["item"]: d["logprobs"] for d in first["details"]}
    b = {d["item"]: d["logprobs"] for d in second["details"]}
    assert a.keys() == b.keys() == orig.keys()
    assert all(a[k] == pytest.approx(orig[k], abs=1e-4) for k in a)  # same weights, same scores
    assert any(a[k] != pytest.approx(b[k], abs=1e-3) for k in a)  # new weights, new scores


# --------------------------------------------------------------------------- offline registry


def test_offline_registry_loads_only_custom_tasks_without_network(tmp_path):
    from lighteval.tasks.registry import Registry

    from evaluation.offline_registry import custom_tasks_only, make_tasks_module
    from evaluation.tasks import build_task_configs

    original = Registry.__dict__["load_all_task_configs"]
    configs = build_task_configs(["hellaswag", "arc_easy"], DATA_ROOT, tmp_path, 3)
    with no_network() as attempts:
        with custom_tasks_only():
            registry = Registry(tasks="hellaswag|0,arc_easy|0", custom_tasks=make_tasks_module(configs))
            tasks = registry.load_tasks()
    assert attempts == []
    assert set(registry._task_registry) == {"hellaswag", "arc_easy"}
    assert set(tasks) == {"hellaswag|0", "arc_easy|0"}
    assert tasks["hellaswag|0"].dataset_path == str(configs[0].hf_repo)
    assert Registry.__dict__["load_all_task_configs"] is original  # restored on exit
    assert "lighteval.tasks.tasks.tiny_benchmarks" not in sys.modules


def test_network_guard_catches_lighteval_import_time_download():
    """The module the workaround keeps out (tiny_benchmarks) really does reach for the
    network at import time, and the socket guard used above sees it."""
    import importlib
    import importlib.util

    spec = importlib.util.find_spec("lighteval.tasks.tasks.tiny_benchmarks")
    if spec is None or (Path(spec.origin).parent / "tinyBenchmarks.pkl").exists():
        pytest.skip("tiny_benchmarks absent or its download already cached")
    with no_network() as attempts:
        with pytest.raises(Exception):
            importlib.import_module("lighteval.tasks.tasks.tiny_benchmarks")
    assert attempts, "expected tiny_benchmarks to try the network"
    sys.modules.pop("lighteval.tasks.tasks.tiny_benchmarks", None)


# --------------------------------------------------------------------------- held-out loss


def test_heldout_loss_matches_direct_computation(assets, tmp_path):
    from evaluation.heldout import heldout_loss

    model, tok = assets["model"], assets["tok"]
    text = WIKITEXT_VALID.read_text(encoding="utf-8")[:3000] + "\n Café — naïve ünïcode, 北京.\n"
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    seq_len, max_tokens = 16, 150  # 9 full windows + a partial one

    got = heldout_loss(model, tok, path, seq_len=seq_len, max_tokens=max_tokens, batch_size=4)

    ids = [tok.token_to_id("<|endoftext|>")] + tok.encode(text, add_special_tokens=False).ids
    nll = 0.0
    for start in range(0, max_tokens, seq_len):
        end = min(start + seq_len, max_tokens)
        with torch.no_grad():
            logits, _ = model(torch.tensor([ids[start:end]]))
        lp = F.log_softmax(logits[0].double(), dim=-1)
        nll -= sum(float(lp[j, ids[start + j + 1]]) for j in range(end - start))
    n_bytes = len(tok.decode(ids[1 : max_tokens + 1]).encode("utf-8"))
    assert got["tokens"] == max_tokens
    assert got["bytes"] == n_bytes
    assert got["loss"] == pytest.approx(nll / max_tokens, rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)

    # all tokens scored: the byte count is exactly the file's UTF-8 size (non-ASCII included)
    whole = heldout_loss(model, tok, path, seq_len=seq_len, max_tokens=10**9)
    assert whole["tokens"] == len(ids) - 1
    assert whole["bytes"] == len(text.encode("utf-8"))

    with pytest.raises(ValueError, match="max_seq_len"):
        heldout_loss(model, tok, path, seq_len=MAX_SEQ_LEN + 1, max_tokens=10)


# --------------------------------------------------------------------------- tasks / errors


def test_unknown_task_raises_before_loading_anything(tmp_path):
    from evaluation.run import evaluate_checkpoint

    with pytest.raises(ValueError, match="unknown eval task") as e:
        evaluate_checkpoint(tmp_path / "no_ckpt", tmp_path / "no_tok.json", ["hellaswag", "hellaswog"], 10,
                            DATA_ROOT, tmp_path / "work")
    assert "hellaswog" in str(e.value) and "hellaswag" in str(e.value) and "arc_easy" in str(e.value)
    with pytest.raises(ValueError, match="unknown heldout"):
        evaluate_checkpoint(tmp_path / "no_ckpt", tmp_path / "no_tok.json", [], 10, DATA_ROOT, tmp_path / "work",
                            heldout="ptb")


@pytest.mark.parametrize("name", sorted(TASK_SPECS))
def test_task_datasets_prepare_deterministically(name, tmp_path):
    spec = TASK_SPECS[name]
    a = prepare_task_dataset(spec, DATA_ROOT, tmp_path / "a", max_items=5, seed=0)
    b = prepare_task_dataset(spec, DATA_ROOT, tmp_path / "b", max_items=5, seed=0)
    c = prepare_task_dataset(spec, DATA_ROOT, tmp_path / "c", max_items=5, seed=1)
    assert a.name == b.name and (a / "test.jsonl").read_bytes() == (b / "test.jsonl").read_bytes()
    assert sorted(p.name for p in a.iterdir()) == ["test.jsonl"]
    rows = [json.loads(line) for line in (a / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 5
    for r in rows:
        extra = {"contexts"} if spec.scoring == "partial" else set()
        assert set(r) == {"query", "choices", "gold", "source_index"} | extra
        min_choices = 1 if spec.scoring == "last_word" else 2
        assert r["query"].strip() and len(r["choices"]) >= min_choices and 0 <= r["gold"] < len(r["choices"])
        assert all(ch.startswith(" ") and ch.strip() for ch in r["choices"])
    other = [json.loads(line)["source_index"] for line in (c / "test.jsonl").read_text().splitlines()]
    assert other != [r["source_index"] for r in rows]


def test_full_task_sizes():
    assert len(load_records(TASK_SPECS["hellaswag"], DATA_ROOT)) == 10042
    assert len(load_records(TASK_SPECS["arc_easy"], DATA_ROOT)) == 2376
    assert len(load_records(TASK_SPECS["mmlu_redux"], DATA_ROOT)) == 5330  # error_type ok, any spelling
    q = load_records(TASK_SPECS["arc_easy"], DATA_ROOT)[0]["query"]
    assert q.startswith("Question: ") and q.endswith("\nAnswer:")
