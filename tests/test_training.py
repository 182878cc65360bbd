"""Tests for the training package: model, checkpoint, data stream, optimizer, entry point."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from training import train as train_mod
from training.checkpoint import load_checkpoint, save_checkpoint
from training.data import MixtureTokenStream
from training.model import ModelConfig, Transformer
from training.optim import build_optimizer, lr_at

REPO = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=16)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------- model


def test_forward_shapes_and_finite_loss():
    model = Transformer(ModelConfig(**TINY))
    idx = torch.randint(0, 64, (3, 16))
    logits, loss = model(idx)
    assert logits.shape == (3, 16, 64)
    assert loss is None
    _, loss = model(idx, idx)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # At init the prediction is near uniform.
    assert abs(loss.item() - math.log(64)) < 1.5


def test_loss_ignores_minus_100():
    model = Transformer(ModelConfig(**TINY))
    idx = torch.randint(0, 64, (2, 8))
    targets = idx.clone()
    targets[:, 4:] = -100
    _, loss_masked = model(idx, targets)
    logits, _ = model(idx)
    expected = torch.nn.functional.cross_entropy(logits[:, :4].reshape(-1, 64), idx[:, :4].reshape(-1))
    torch.testing.assert_close(loss_masked, expected)


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_gqa_variants(n_kv_heads):
    cfg = ModelConfig(**{**TINY, "n_kv_heads": n_kv_heads})
    model = Transformer(cfg)
    assert model.layers[0].attn.k_proj.weight.shape == (n_kv_heads * cfg.head_dim, cfg.d_model)
    logits, loss = model(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16)))
    assert logits.shape == (2, 16, 64) and torch.isfinite(loss)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"d_model": 30, "n_heads": 4}, "d_model (30) must be divisible by n_heads (4)"),
        ({"n_heads": 4, "n_kv_heads": 3}, "n_heads (4) must be divisible by n_kv_heads (3)"),
        ({"d_model": 12, "n_heads": 4, "n_kv_heads": 1}, "head_dim = d_model // n_heads = 3 must be even"),
        ({"n_layers": 0}, "n_layers must be a positive integer"),
        ({"vocab_size": -1}, "vocab_size must be a positive integer"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(**{**TINY, **overrides})


def test_config_dict_round_trip_and_unknown_keys():
    cfg = ModelConfig(**TINY)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown ModelConfig field.*'n_embd'"):
        ModelConfig.from_dict({**TINY, "n_embd": 3})
    with pytest.raises(ValueError, match="vocab_size is required"):
        ModelConfig.from_dict({"d_model": 32})


def test_tied_weights_shared_and_num_params():
    cfg = ModelConfig(**TINY)
    tied = Transformer(cfg)
    assert tied.lm_head.weight is tied.embed.weight
    C, V, F, L, D = cfg.d_model, cfg.vocab_size, cfg.ffn_hidden, cfg.n_layers, cfg.head_dim
    kv = cfg.n_kv_heads * D
    per_layer = C * C + 2 * C * kv + C * C + 3 * C * F + 2 * C  # q,k,v,o + swiglu + 2 norms
    expected = V * C + L * per_layer + C
    assert tied.num_params() == expected
    assert tied.num_params(exclude_embeddings=True) == expected - V * C

    untied = Transformer(ModelConfig(**{**TINY, "tie_embeddings": False}))
    assert untied.lm_head.weight is not untied.embed.weight
    assert untied.num_params() == expected + V * C
    assert untied.num_params(exclude_embeddings=True) == expected - V * C
    assert tied.flops_per_token(16) > 6 * tied.num_params(exclude_embeddings=True)


def test_residual_init_is_scaled():
    model = Transformer(ModelConfig(**{**TINY, "d_model": 128, "n_layers": 8, "ffn_hidden": 256}))
    std_o = model.layers[0].attn.o_proj.weight.std().item()
    std_q = model.layers[0].attn.q_proj.weight.std().item()
    assert abs(std_q - 0.02) < 0.002
    assert abs(std_o - 0.02 / 4) < 0.001


def test_causality():
    model = Transformer(ModelConfig(**TINY)).eval()
    idx = torch.randint(0, 64, (1, 16))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 64
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_too_long_sequence_rejected():
    model = Transformer(ModelConfig(**TINY))
    with pytest.raises(ValueError, match="exceeds ModelConfig.max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


# --------------------------------------------------------------------------- checkpoint


@pytest.mark.parametrize("tie", [True, False])
def test_checkpoint_round_trip(tmp_path, tie):
    model = Transformer(ModelConfig(**{**TINY, "tie_embeddings": tie})).eval()
    save_checkpoint(tmp_path / "ckpt", model, extra={"steps": 3})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["steps"] == 3 and meta["model"]["tie_embeddings"] is tie

    loaded = load_checkpoint(tmp_path / "ckpt")
    assert not loaded.training
    if tie:
        assert loaded.lm_head.weight is loaded.embed.weight
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], loaded(idx)[0], rtol=0, atol=0)


def test_checkpoint_missing_file(tmp_path):
    save_checkpoint(tmp_path, Transformer(ModelConfig(**TINY)))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_checkpoint(tmp_path)


# --------------------------------------------------------------------------- data


def make_source(path: Path, docs: list[list[int]]) -> Path:
    path.mkdir(parents=True)
    tokens = np.array([t for d in docs for t in d], dtype=np.uint16)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    np.save(path / "tokens.npy", tokens)
    np.save(path / "offsets.npy", offsets)
    return path


def make_mixture(path: Path, sources: dict[int, Path], rows: list[tuple[int, int]]) -> Path:
    path.mkdir(parents=True)
    np.save(path / "index.npy", np.array(rows, dtype=np.int64).reshape(-1, 2))
    entries = [{"id": sid, "name": f"src{sid}", "tokenized": str(p)} for sid, p in sources.items()]
    (path / "sources.json").write_text(json.dumps(entries))
    return path


@pytest.fixture
def tiny_mixture(tmp_path):
    # EOS = 0. Source 0 docs: [1,2,0], [3,4,5,0]; source 1 docs: [10,0], [11,12,13,14,0], [] (empty).
    a = make_source(tmp_path / "tok_a", [[1, 2, 0], [3, 4, 5, 0]])
    b = make_source(tmp_path / "tok_b", [[10, 0], [11, 12, 13, 14, 0], []])
    rows = [(1, 1), (0, 0), (1, 2), (1, 0), (0, 1), (0, 0)]
    return make_mixture(tmp_path / "mix", {0: a, 1: b}, rows)


# The packed stream for tiny_mixture, in index order (the empty doc contributes nothing).
STREAM = [11, 12, 13, 14, 0] + [1, 2, 0] + [] + [10, 0] + [3, 4, 5, 0] + [1, 2, 0]


def test_stream_exact_windows(tiny_mixture):
    s = MixtureTokenStream(tiny_mixture, batch_size=2, seq_len=4)
    assert s.total_tokens == len(STREAM) == 17
    assert s.windows_per_epoch == 3  # 17 // 5, last 2 tokens dropped
    x, y = s.next_batch()
    assert x.dtype == torch.long and x.shape == (2, 4) and y.shape == (2, 4)
    assert x.tolist() == [STREAM[0:4], STREAM[5:9]]
    assert y.tolist() == [STREAM[1:5], STREAM[6:10]]
    assert s.epochs_completed == 0


def test_stream_wraps_and_counts_epochs(tiny_mixture, caplog):
    s = MixtureTokenStream(tiny_mixture, batch_size=2, seq_len=4)
    windows = [STREAM[i * 5 : i * 5 + 5] for i in range(3)]
    seen = []
    with caplog.at_level("WARNING", logger="training.data"):
        for _ in range(4):  # 8 windows = 2 epochs + 2
            x, y = s.next_batch()
            seen += [xi + [yi[-1]] for xi, yi in zip(x.tolist(), y.tolist())]
    assert seen == (windows * 3)[:8]
    assert s.epochs_completed == 2
    assert sum("wrapping around" in r.message for r in caplog.records) == 1

    # Deterministic: a fresh stream gives the same batches.
    again = MixtureTokenStream(tiny_mixture, batch_size=2, seq_len=4)
    assert again.next_batch()[0].tolist() == [windows[0][:4], windows[1][:4]]


def test_stream_state_dict_resume(tiny_mixture):
    s = MixtureTokenStream(tiny_mixture, batch_size=1, seq_len=4)
    s.next_batch()
    resumed = MixtureTokenStream(tiny_mixture, batch_size=1, seq_len=4)
    resumed.load_state_dict(s.state_dict())
    assert resumed.next_batch()[0].tolist() == s.next_batch()[0].tolist()


def test_stream_bad_doc_id(tmp_path):
    a = make_source(tmp_path / "tok_a", [[1, 2, 0], [3, 0]])
    mix = make_mixture(tmp_path / "mix", {0: a}, [(0, 0), (0, 2)])
    with pytest.raises(ValueError, match=r"index\.npy.*doc_id\(s\) \[2\] out of range"):
        MixtureTokenStream(mix, batch_size=1, seq_len=2)


def test_stream_unknown_source_and_missing_files(tmp_path):
    a = make_source(tmp_path / "tok_a", [[1, 2, 0]])
    mix = make_mixture(tmp_path / "mix", {0: a}, [(0, 0), (7, 0)])
    with pytest.raises(ValueError, match=r"source_id\(s\) \[7\] not in .*sources\.json"):
        MixtureTokenStream(mix, batch_size=1, seq_len=2)

    (a / "offsets.npy").unlink()
    with pytest.raises(ValueError, match="missing file: .*offsets.npy"):
        MixtureTokenStream(mix, batch_size=1, seq_len=2)
    (mix / "index.npy").unlink()
    (mix / "sources.json").unlink()
    with pytest.raises(ValueError, match="missing file: .*sources.json"):
        MixtureTokenStream(mix, batch_size=1, seq_len=2)


def test_stream_too_small_and_vocab_check(tiny_mixture):
    with pytest.raises(ValueError, match="fewer than one window"):
        MixtureTokenStream(tiny_mixture, batch_size=1, seq_len=17)
    s = MixtureTokenStream(tiny_mixture, batch_size=1, seq_len=4, vocab_size=12)
    with pytest.raises(ValueError, match="token id 14 >= model vocab_size 12"):
        s.next_batch()


# --------------------------------------------------------------------------- optimizer


def test_lr_schedule_values():
    peak = 1e-3
    # warmup: linear, reaching peak at step warmup-1
    assert lr_at(0, 100, peak, 10) == pytest.approx(peak / 10)
    assert lr_at(4, 100, peak, 10) == pytest.approx(peak / 2)
    assert lr_at(9, 100, peak, 10) == pytest.approx(peak)
    # cosine: peak right after warmup, halfway point, min at the last step and beyond
    assert lr_at(10, 100, peak, 10) == pytest.approx(peak)
    assert lr_at(10 + 89 // 2, 100, peak, 10) == pytest.approx(peak * (0.1 + 0.9 * 0.5), rel=0.02)
    assert lr_at(99, 100, peak, 10) == pytest.approx(0.1 * peak)
    assert lr_at(150, 100, peak, 10) == pytest.approx(0.1 * peak)
    # constant
    assert lr_at(99, 100, peak, 10, schedule="constant") == pytest.approx(peak)
    # wsd: stable until the last 20%, then linear to min
    assert lr_at(79, 100, peak, 10, schedule="wsd") == pytest.approx(peak)
    assert lr_at(89, 100, peak, 10, schedule="wsd") == pytest.approx(peak * (1 - 0.9 * 0.5))
    assert lr_at(99, 100, peak, 10, schedule="wsd", min_lr_ratio=0.0) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="unknown lr schedule 'linear'.*cosine"):
        lr_at(0, 10, peak, 0, schedule="linear")


def test_build_optimizer_groups_and_errors():
    model = Transformer(ModelConfig(**TINY))
    opt = build_optimizer(model, {"name": "adamw", "lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8})
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"])
    assert any(p is model.embed.weight for p in no_decay["params"])
    assert not any(p is model.embed.weight for p in decay["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == model.num_params()
    with pytest.raises(ValueError, match=r"unknown optimizer name 'shampoo'; supported: \['adamw', 'muon'\]"):
        build_optimizer(model, {"name": "shampoo", "lr": 1e-3})
    with pytest.raises(ValueError, match="unknown field"):
        build_optimizer(model, {"name": "adamw", "lr": 1e-3, "momentum": 0.9})


# --------------------------------------------------------------------------- end to end


def write_run(tmp_path: Path, steps: int = 20, **training) -> Path:
    # threads=1: for a model this small two OpenMP threads only add sync overhead, and they stall
    # badly when another process shares the two cores.
    # Documents repeat a fixed pattern, so the model can learn the next token quickly.
    rng = np.random.default_rng(0)
    docs = [[(5 * j + k) % 63 + 1 for k in range(int(rng.integers(20, 60)))] + [0] for j in range(40)]
    src = make_source(tmp_path / "tok", docs)
    mix = make_mixture(tmp_path / "mix", {0: src}, [(0, i) for i in rng.permutation(40)])
    run = {
        "model": {**TINY},
        "optimizer": {"name": "adamw", "lr": 1e-2, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8},
        "training": {
            "steps": steps, "batch_size": 8, "seq_len": 16, "warmup_steps": 2, "schedule": "cosine",
            "grad_clip": 1.0, "seed": 0, "log_every": 5, "threads": 1, **training,
        },
        "data": {"mixture_dir": str(mix)},
        "out_dir": str(tmp_path / "out"),
    }
    path = tmp_path / "RUN.json"
    path.write_text(json.dumps(run))
    return path


def test_train_main_end_to_end(tmp_path, capsys):
    cfg = write_run(tmp_path)
    summary = train_mod.main(["--config", str(cfg)])
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "metrics.parquet", "model.safetensors", "summary.json",
    ]

    table = pq.read_table(out / "metrics.parquet")
    assert table.column_names == [
        "step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "max_attn_logit", "moe_lb_loss", "moe_z_loss",
        "skipped",
    ]
    assert table.num_rows == 20
    m = table.to_pydict()
    assert m["step"] == list(range(1, 21))
    assert m["tokens"] == [s * 8 * 16 for s in range(1, 21)]
    assert sum(m["loss"][-3:]) / 3 < sum(m["loss"][:3]) / 3 - 0.5  # it learned something
    assert m["lr"][1] == pytest.approx(1e-2)

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    assert summary["steps"] == 20 and summary["tokens"] == 20 * 8 * 16
    assert summary["final_loss"] == pytest.approx(m["loss"][-1])
    meta = json.loads((out / "config.json").read_text())
    assert meta["tokens"] == 20 * 8 * 16 and meta["seed"] == 0 and meta["steps"] == 20

    model = load_checkpoint(out)
    assert model.num_params() == summary["params"]

    # stdout is JSON lines only; the human progress lines are on stderr.
    captured = capsys.readouterr()
    events = [json.loads(line) for line in captured.out.splitlines()]
    assert [e["step"] for e in events if e["event"] == "metrics"] == [1, 5, 10, 15, 20]
    assert events[-1]["event"] == "summary"
    assert "step 20/20 | loss" in captured.err
    assert re.search(r"step 10/20 \| .* \| ETA (\d+m\d\ds|\d+s)", captured.err)  # time left, from the mean step
    assert "step 20/20" in captured.err and "| ETA 0s" in captured.err.split("step 20/20")[1].splitlines()[0]


def test_eta_format():
    assert train_mod._eta(10.0, 5, 5) == "10s"
    assert train_mod._eta(60.0, 10, 25) == "2m30s"
    assert train_mod._eta(3600.0, 1, 2) == "2h00m"  # format_duration: dataprep.progress
    assert train_mod._eta(1.0, 0, 5) == "?"


def test_train_is_deterministic(tmp_path):
    a = train_mod.main(["--config", str(write_run(tmp_path / "a", steps=3))])
    b = train_mod.main(["--config", str(write_run(tmp_path / "b", steps=3))])
    assert a["final_loss"] == b["final_loss"]


def test_train_bad_config(tmp_path):
    cfg = write_run(tmp_path, stepz=3)
    with pytest.raises(ValueError, match=r"RUN\.json: training: unknown field\(s\) \['stepz'\]"):
        train_mod.main(["--config", str(cfg)])
    cfg = write_run(tmp_path / "b", seq_len=32)
    with pytest.raises(ValueError, match=r"training\.seq_len \(32\) exceeds model\.max_seq_len \(16\)"):
        train_mod.main(["--config", str(cfg)])


def test_train_nan_loss_raises(tmp_path, monkeypatch):
    cfg = write_run(tmp_path, steps=5)
    original = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", lambda *a, **k: original(*a, **k) * float("nan"))
    with pytest.raises(train_mod.TrainingDiverged, match="loss became nan at step 1"):
        train_mod.main(["--config", str(cfg)])
    assert not (tmp_path / "out" / "summary.json").exists()


def _subprocess_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_PIPES")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def test_train_subprocess(tmp_path):
    cfg = write_run(tmp_path, steps=4)
    proc = subprocess.run(
        [sys.executable, "-m", "training.train", "--config", str(cfg)],
        cwd=REPO, env=_subprocess_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "summary.json").is_file()
    assert json.loads(proc.stdout.splitlines()[-1])["event"] == "summary"


def test_train_subprocess_failure_exit_code(tmp_path):
    cfg = write_run(tmp_path, steps=4)
    run = json.loads(cfg.read_text())
    run["data"]["mixture_dir"] = str(tmp_path / "nope")
    cfg.write_text(json.dumps(run))
    proc = subprocess.run(
        [sys.executable, "-m", "training.train", "--config", str(cfg)],
        cwd=REPO, env=_subprocess_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "missing file:" in proc.stderr and "sources.json" in proc.stderr


def test_train_reports_through_dagster_pipes(tmp_path):
    """With Pipes env vars set (as Dagster's subprocess client does), messages go to the Pipes channel."""
    from dagster_pipes import encode_param

    cfg = write_run(tmp_path, steps=5)
    context = {
        "asset_keys": ["trained_model"], "code_version_by_asset_key": None, "provenance_by_asset_key": None,
        "partition_key": None, "partition_key_range": None, "partition_time_window": None,
        "run_id": "test-run", "job_name": None, "retry_number": 0, "extras": {},
    }
    (tmp_path / "context.json").write_text(json.dumps(context))
    messages = tmp_path / "messages.jsonl"
    env = _subprocess_env(
        DAGSTER_PIPES_CONTEXT=encode_param({"path": str(tmp_path / "context.json")}),
        DAGSTER_PIPES_MESSAGES=encode_param({"path": str(messages)}),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "training.train", "--config", str(cfg)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    msgs = [json.loads(line) for line in messages.read_text().splitlines()]
    methods = [m["method"] for m in msgs]
    assert methods[0] == "opened" and methods[-1] == "closed"
    assert msgs[-1]["params"] in (None, {})  # closed cleanly, no exception
    custom = [m["params"]["payload"] for m in msgs if m["method"] == "report_custom_message"]
    assert [c["step"] for c in custom if c["event"] == "metrics"] == [1, 5]
    assert custom[-1]["event"] == "summary"
    assert any(m["method"] == "log" and "step 5/5" in m["params"]["message"] for m in msgs)
