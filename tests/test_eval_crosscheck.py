"""Cross-check: one checkpoint, exported with training/export.py, scored through lighteval's own
transformers backend (``TransformersModel`` on the local folder, offline, CPU) and through the
project's model class (``FoundryLightevalModel`` on ``training.model.Transformer``, shared-prefix
batching) gives the same per-item log-likelihoods, predictions and accuracies.

Conventions the two sides must share: contexts and continuations are tokenized separately
(lighteval's ``pairwise_tokenization=True``) and the context starts with ``<|endoftext|>``. Foundry
puts that EOS in front itself (``prepend_eos``); the HF side gets it as a BOS from the tokenizer's
post-processor, which the export sets (checked here: without it ``add_special_tokens=True`` would
add nothing and the two sides would score different sequences). Windows are long enough that nothing is
truncated, since the two backends cut overlong inputs differently.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", str(Path(__file__).resolve().parents[1] / ".cache" / "hf"))

import pytest
import torch

from tests.test_evaluation import DATA_ROOT, make_tokenizer, no_network

pytestmark = pytest.mark.skipif(not (DATA_ROOT / "eval").is_dir(), reason=f"eval data not found under {DATA_ROOT}")

TASKS = ["hellaswag", "arc_easy"]
N_ITEMS = 8
EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from training.checkpoint import save_checkpoint
    from training.export import export_hf
    from training.model import ModelConfig, Transformer

    d = tmp_path_factory.mktemp("crosscheck")
    tok = make_tokenizer(d / "tokenizer.json")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    ffn_hidden=64, max_seq_len=512))
    with torch.no_grad():  # large weights: scores far apart, so a convention slip changes predictions
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.4)
    save_checkpoint(d / "ckpt", model)
    hf = export_hf(d / "ckpt", d / "hf", d / "tokenizer.json")
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(hf))
    assert hf_tok("the cat").input_ids[0] == tok.token_to_id(EOS)  # the export's BOS rule
    return {"dir": d, "tok": tok, "ckpt": d / "ckpt", "hf": hf}


def _run(lighteval_model, work: Path, name: str):
    from evaluation.run import run_lighteval

    with no_network() as attempts:
        rows, details, failed = run_lighteval(None, None, TASKS, N_ITEMS, DATA_ROOT, work, name,
                                              lighteval_model=lighteval_model)
    assert attempts == [] and failed == {}
    return rows, details


def test_transformers_backend_agrees_with_foundry_model(exported):
    from evaluation.lighteval_model import FoundryLightevalModel, FoundryModelConfig
    from training.checkpoint import load_checkpoint

    grad_mode = torch.is_grad_enabled()
    try:  # lighteval's transformers module switches autograd off at import time
        from lighteval.models.transformers.transformers_model import TransformersModel, TransformersModelConfig
    finally:
        torch.set_grad_enabled(grad_mode)

    d = exported["dir"]
    ours = FoundryLightevalModel(load_checkpoint(exported["ckpt"]), exported["tok"],
                                 FoundryModelConfig(model_name="foundry-xc", cache_dir=str(d / "cache_ours")))
    with no_network() as attempts:
        theirs = TransformersModel(TransformersModelConfig(
            model_name=str(exported["hf"]), device="cpu", dtype="float32", batch_size=8,
            pairwise_tokenization=True, cache_dir=str(d / "cache_hf")))
    torch.set_grad_enabled(grad_mode)
    assert attempts == []
    assert theirs.add_special_tokens and theirs.tokenizer.encode("a")[0] == exported["tok"].token_to_id(EOS)

    rows_ours, items_ours = _run(ours, d / "work_ours", "ours")
    rows_hf, items_hf = _run(theirs, d / "work_hf", "hf")

    key = lambda r: (r["task"], r["item"])  # noqa: E731
    assert sorted(map(key, items_ours)) == sorted(map(key, items_hf))
    assert len(items_ours) == len(TASKS) * N_ITEMS
    hf_by_item = {key(r): r for r in items_hf}
    spreads = []
    for a in items_ours:
        b = hf_by_item[key(a)]
        assert a["logprobs"] == pytest.approx(b["logprobs"], rel=1e-5, abs=1e-4), key(a)
        for field in ("pred", "pred_norm", "gold", "correct", "correct_norm"):
            assert a[field] == b[field], (key(a), field)
        spreads.append(max(a["logprobs"]) - min(a["logprobs"]))
    assert min(spreads) > 1e-3 and max(spreads) > 5.0  # predictions are decided by real margins
    ours_v = {(r["task"], r["metric"]): r["value"] for r in rows_ours}
    hf_v = {(r["task"], r["metric"]): r["value"] for r in rows_hf}
    for task in TASKS:
        for metric in ("acc", "acc_norm"):
            assert ours_v[(task, metric)] == hf_v[(task, metric)], (task, metric)
        # acc_norm_token: lighteval's transformers backend hands the metric its continuations
        # padded (with -1) to the longest choice of the item, so every choice is divided by the
        # same count and its acc_norm_token is just acc. Ours divides by each choice's own token
        # count, recomputed here from the shared per-item log-likelihoods.
        assert hf_v[(task, "acc_norm_token")] == hf_v[(task, "acc")]
        records = {r["item"]: r for r in items_ours if r["task"] == task}
        correct = 0
        for item, r in records.items():
            doc = _record(task, item)
            n_tokens = [len(exported["tok"].encode(c, add_special_tokens=False).ids) for c in doc["choices"]]
            norm = [lp / n for lp, n in zip(r["logprobs"], n_tokens, strict=True)]
            correct += max(range(len(norm)), key=norm.__getitem__) == r["gold"]
        assert ours_v[(task, "acc_norm_token")] == pytest.approx(correct / len(records))


def _record(task: str, item: int) -> dict:
    return _records(task)[item]


@functools.cache
def _records(task: str) -> list[dict]:
    from evaluation.tasks import TASK_SPECS, load_records

    return load_records(TASK_SPECS[task], DATA_ROOT)
