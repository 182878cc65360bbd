"""Muon, QK-clip, z-loss, intra-document masking, NoPE, and their recipe wiring."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from assets.recipe import RecipeError, parse_recipe
from tests.test_training import TINY, write_run
from training import train as train_mod
from training.checkpoint import load_checkpoint
from training.model import ModelConfig, Transformer, document_ids, document_positions
from training.muon import Muon, newton_schulz, split_params
from training.optim import build_optimizer
from training.qk_clip import apply_qk_clip, clip_scales


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------- config


def test_new_model_fields_left_out_at_defaults():
    cfg = ModelConfig(**TINY)
    assert cfg.to_dict() == {**TINY, "rope_theta": 10000.0, "norm_eps": 1e-5, "tie_embeddings": True}
    on = ModelConfig(**TINY, nope_every=2, intra_doc_mask=True, eos_token_id=0, z_loss=1e-4)
    d = on.to_dict()
    assert (d["nope_every"], d["intra_doc_mask"], d["eos_token_id"], d["z_loss"]) == (2, True, 0, 1e-4)
    assert ModelConfig.from_dict(d) == on


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"nope_every": -1}, "nope_every must be an integer >= 0"),
        ({"intra_doc_mask": True}, "intra_doc_mask needs eos_token_id"),
        ({"eos_token_id": 64}, r"eos_token_id must be a token id in \[0, vocab_size=64\)"),
        ({"z_loss": -0.1}, "z_loss must be a number >= 0"),
    ],
)
def test_new_model_fields_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**TINY, **overrides})


# --------------------------------------------------------------------------- Muon


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (32, 256), (48, 96)])
def test_newton_schulz_near_orthogonal(shape):
    g = torch.randn(*shape)
    o = newton_schulz(g, steps=5)
    assert o.shape == g.shape and o.dtype == g.dtype
    s = torch.linalg.svdvals(o)
    # The quintic iteration does not converge to 1 exactly; it lands in a band around it.
    assert s.min() > 0.6 and s.max() < 1.25, (s.min(), s.max())
    # Same singular vectors as the input: o ~ U V^T of g's SVD (up to the band).
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    cos = (o * (u @ vh)).sum() / (o.norm() * (u @ vh).norm())
    assert cos > 0.97


def test_newton_schulz_is_scale_invariant_and_rejects_non_matrices():
    g = torch.randn(16, 40)
    torch.testing.assert_close(newton_schulz(g), newton_schulz(1000 * g), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="2-D"):
        newton_schulz(torch.randn(3, 4, 5))


@pytest.mark.parametrize("tie", [True, False])
def test_muon_param_grouping(tie):
    model = Transformer(ModelConfig(**{**TINY, "tie_embeddings": tie}))
    split = split_params(model)
    muon_names = {n for n, _ in split["muon"]}
    per_layer = {"attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "attn.o_proj.weight",
                 "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"}
    assert muon_names == {f"layers.{i}.{n}" for i in range(TINY["n_layers"]) for n in per_layer}
    no_decay = {n for n, _ in split["adamw_no_decay"]}
    assert "embed.weight" in no_decay and "norm.weight" in no_decay
    assert all(p.ndim == 1 for n, p in split["adamw_no_decay"] if n != "embed.weight")
    assert {n for n, _ in split["adamw_decay"]} == (set() if tie else {"lm_head.weight"})

    opt = build_optimizer(model, {"name": "muon", "lr": 0.02, "adamw_lr": 3e-3, "weight_decay": 0.1})
    assert isinstance(opt, Muon)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["muon"]["use_muon"] and by_name["muon"]["lr"] == 0.02 and by_name["muon"]["weight_decay"] == 0.1
    assert by_name["adamw_no_decay"]["lr"] == 3e-3 and by_name["adamw_no_decay"]["weight_decay"] == 0.0
    assert ("adamw_decay" in by_name) is (not tie)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()


def test_muon_step_is_orthogonalised_gradient():
    w = torch.nn.Parameter(torch.randn(8, 24))
    before = w.detach().clone()
    opt = Muon([{"params": [w], "use_muon": True}], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.0)
    w.grad = torch.randn(8, 24)
    opt.step()
    # First step: the momentum buffer is (1 - mu) g, so the Nesterov direction is a multiple of g,
    # and Newton–Schulz (scale-invariant) gives NS(g).
    expected = before - 0.1 * 0.2 * math.sqrt(24) * newton_schulz(w.grad)
    torch.testing.assert_close(w.detach(), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="2-D matrices only"):
        Muon([{"params": [torch.nn.Parameter(torch.ones(3))], "use_muon": True}], lr=0.1)


def test_muon_config_errors():
    model = Transformer(ModelConfig(**TINY))
    with pytest.raises(ValueError, match="unknown field"):
        build_optimizer(model, {"name": "muon", "lr": 0.02, "momentun": 0.9})
    with pytest.raises(ValueError, match="ns_steps must be an integer >= 1"):
        build_optimizer(model, {"name": "muon", "lr": 0.02, "ns_steps": 0})
    with pytest.raises(ValueError, match="momentum must be >= 0 and < 1"):
        build_optimizer(model, {"name": "muon", "lr": 0.02, "momentum": 1.0})
    with pytest.raises(ValueError, match="qk_clip_tau must be a positive number"):
        build_optimizer(model, {"name": "adamw", "lr": 1e-3, "qk_clip_tau": -1})
    # qk_clip_tau is accepted by every optimizer (the trainer applies it)
    build_optimizer(model, {"name": "adamw", "lr": 1e-3, "qk_clip_tau": 50.0})


def test_tiny_model_learns_with_muon():
    model = Transformer(ModelConfig(**TINY))
    opt = build_optimizer(model, {"name": "muon", "lr": 0.02, "weight_decay": 0.0})
    x = torch.randint(1, 64, (8, 16))
    losses = []
    for _ in range(30):
        _, loss = model(x, torch.roll(x, -1, dims=1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses


# --------------------------------------------------------------------------- QK-clip


def test_clip_scales_gqa():
    # 4 query heads, 2 kv heads (groups {0, 1} and {2, 3}); heads 0 and 1 over tau = 10.
    m = torch.tensor([40.0, 20.0, 5.0, 9.0])
    q, k = clip_scales(m, tau=10.0, n_kv_heads=2)
    gamma = torch.tensor([0.25, 0.5, 1.0, 1.0])
    torch.testing.assert_close(q * k.repeat_interleave(2), gamma)  # each head's logits scale by gamma_h
    torch.testing.assert_close(k, torch.tensor([0.5, 1.0]))  # sqrt of the group's smallest gamma
    torch.testing.assert_close(q[0], torch.tensor(0.5))  # the worst head: sqrt(gamma) on each side


@pytest.mark.parametrize("n_kv_heads", [2, 4])
def test_qk_clip_caps_max_logit(n_kv_heads):
    model = Transformer(ModelConfig(**{**TINY, "n_kv_heads": n_kv_heads}))
    attn = model.layers[0].attn
    D = attn.head_dim
    with torch.no_grad():  # blow up query head 0 and its key head only
        attn.q_proj.weight[:D] *= 40
        attn.k_proj.weight[:D] *= 40
    model.track_max_logit = True
    x = torch.randint(0, 64, (4, 16))
    model(x)
    before = attn.max_logit.clone()
    assert before[0] > 5 * before[1:].max()
    tau = float(before[0]) / 4
    assert float(before[1:].max()) < tau
    q_before, k_before = attn.q_proj.weight.detach().clone(), attn.k_proj.weight.detach().clone()

    assert apply_qk_clip(model, tau) == 1
    model(x)
    after = attn.max_logit
    assert after[0] <= tau * (1 + 1e-4)
    assert after[0] == pytest.approx(tau, rel=1e-4)
    torch.testing.assert_close(after[1:], before[1:], rtol=1e-4, atol=1e-5)  # other heads' logits unchanged
    G = 4 // n_kv_heads
    # query heads outside head 0's group, and their key heads, are untouched bit for bit
    assert torch.equal(attn.q_proj.weight[G * D :], q_before[G * D :])
    assert torch.equal(attn.k_proj.weight[D:], k_before[D:])
    # layer 1 had nothing over tau: unchanged
    assert model.layers[1].attn.max_logit.max() < tau


def test_qk_clip_after_an_optimizer_step():
    model = Transformer(ModelConfig(**TINY))
    attn = model.layers[0].attn
    with torch.no_grad():
        attn.q_proj.weight *= 30
        attn.k_proj.weight *= 30
    model.track_max_logit = True
    opt = build_optimizer(model, {"name": "muon", "lr": 1e-4})
    x = torch.randint(0, 64, (4, 16))
    _, loss = model(x, x)
    tau = float(attn.max_logit.max()) / 3
    loss.backward()
    opt.step()
    apply_qk_clip(model, tau)
    model(x)
    assert attn.max_logit.max() <= tau * 1.02  # a tiny step moved the weights slightly


def test_max_logit_tracking_is_off_by_default_and_matches_attention():
    model = Transformer(ModelConfig(**TINY))
    model(torch.randint(0, 64, (2, 16)))
    assert model.max_attn_logits() is None
    with pytest.raises(RuntimeError, match="track_max_logit"):
        apply_qk_clip(model, 10.0)

    # The tracked value is the max of the causal q.k / sqrt(D) logits SDPA uses.
    model.track_max_logit = True
    captured = {}
    attn = model.layers[0].attn
    original = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        captured["q"], captured["k"] = q, k
        return original(q, k, v, **kw)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        model(torch.randint(0, 64, (2, 16)))
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    q, k = captured["q"], captured["k"]  # last layer's
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~torch.ones(16, 16, dtype=torch.bool).tril(), -math.inf)
    torch.testing.assert_close(model.layers[-1].attn.max_logit, scores.amax(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    assert len(model.max_attn_logits()) == TINY["n_layers"] and attn.max_logit.shape == (4,)


# --------------------------------------------------------------------------- z-loss


def test_z_loss_adds_exactly_coef_times_mean_lse_squared():
    base = Transformer(ModelConfig(**TINY))
    with_z = Transformer(ModelConfig(**TINY, z_loss=1e-2))
    with_z.load_state_dict(base.state_dict())
    x = torch.randint(0, 64, (3, 16))
    targets = x.clone()
    targets[:, :5] = -100  # ignored tokens are not scored by the z-loss either
    logits, plain = base(x, targets)
    _, total = with_z(x, targets)
    lse = torch.logsumexp(logits.float(), dim=-1)[:, 5:]
    torch.testing.assert_close(total - plain, 1e-2 * (lse**2).mean(), rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- intra-document masking


def test_document_ids_and_positions():
    x = torch.tensor([[5, 6, 0, 7, 8, 9, 0, 0, 3]])
    assert document_ids(x, 0).tolist() == [[0, 0, 0, 1, 1, 1, 1, 2, 3]]
    assert document_positions(document_ids(x, 0)).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 0]]


def test_intra_doc_mask_isolates_documents():
    """Design: a document's tokens see only their own document, and positions restart at 0 after
    each EOS, so document 2's logits in a packed sequence equal those of document 2 run alone
    (from position 0, plain causal attention)."""
    cfg = dict(TINY, eos_token_id=0)
    masked = Transformer(ModelConfig(**cfg, intra_doc_mask=True)).eval()
    plain = Transformer(ModelConfig(**cfg)).eval()
    plain.load_state_dict(masked.state_dict())
    doc1 = torch.randint(1, 64, (7,)).tolist() + [0]
    doc2 = torch.randint(1, 64, (8,)).tolist()
    other_doc1 = torch.randint(1, 64, (3,)).tolist() + [0]
    packed = torch.tensor([doc1 + doc2])
    with torch.no_grad():
        alone = plain(torch.tensor([doc2]))[0]
        got = masked(packed)[0][:, len(doc1) :]
        torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)
        # a different (shorter) document 1 in front changes nothing either
        got2 = masked(torch.tensor([other_doc1 + doc2]))[0][:, len(other_doc1) :]
        torch.testing.assert_close(got2, alone, rtol=1e-5, atol=1e-5)
        # document 1 itself is unaffected by what follows, and without the mask doc 2 does see doc 1
        torch.testing.assert_close(masked(packed)[0][:, : len(doc1)], plain(torch.tensor([doc1]))[0], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(plain(packed)[0][:, len(doc1) :], alone, atol=1e-3)


def test_intra_doc_mask_off_is_the_causal_path():
    a = Transformer(ModelConfig(**TINY))
    b = Transformer(ModelConfig(**TINY, eos_token_id=0, intra_doc_mask=True))
    b.load_state_dict(a.state_dict())
    x = torch.randint(1, 64, (2, 16))  # no EOS: one document, same as causal
    with torch.no_grad():
        torch.testing.assert_close(a(x)[0], b(x)[0], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- NoPE


def test_nope_layers_skip_rope():
    model = Transformer(ModelConfig(**{**TINY, "n_layers": 4}, nope_every=2))
    assert [layer.attn.use_rope for layer in model.layers] == [True, False, True, False]
    assert all(layer.attn.use_rope for layer in Transformer(ModelConfig(**TINY)).layers)

    # A model whose every layer is NoPE does not read the rotary tables at all.
    nope = Transformer(ModelConfig(**TINY, nope_every=1)).eval()
    rope = Transformer(ModelConfig(**TINY)).eval()
    rope.load_state_dict(nope.state_dict())
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        ref_nope, ref_rope = nope(x)[0], rope(x)[0]
        for m in (nope, rope):
            m.rope_cos.normal_()
            m.rope_sin.normal_()
        torch.testing.assert_close(nope(x)[0], ref_nope, rtol=0, atol=0)
        assert not torch.allclose(rope(x)[0], ref_rope)


# --------------------------------------------------------------------------- recipe


def _recipe(**sections) -> dict:
    return {
        "name": "unit",
        "sources": {"web": {"kind": "jsonl", "path": "x.jsonl"}},
        "mixture": {"weights": {"web": 1.0}, "total_tokens": 1000},
        **sections,
    }


def test_recipe_new_fields_validate():
    r = parse_recipe(_recipe(model={"nope_every": 4, "intra_doc_mask": True, "z_loss": 1e-4},
                             optimizer={"name": "muon", "lr": 0.02, "qk_clip_tau": 100}))
    assert (r.model.nope_every, r.model.intra_doc_mask, r.model.z_loss) == (4, True, 1e-4)
    o = r.optimizer
    assert (o.momentum, o.nesterov, o.ns_steps, o.adamw_lr, o.qk_clip_tau) == (0.95, True, 5, 0.02, 100)

    for sections, message in [
        ({"model": {"nope_every": -1}}, "model.nope_every: Input should be greater than or equal to 0"),
        ({"model": {"z_loss": -1}}, "model.z_loss: Input should be greater than or equal to 0"),
        ({"optimizer": {"name": "adamw", "momentum": 0.9}}, "optimizer: momentum: only for name: muon"),
        ({"optimizer": {"name": "muon", "ns_steps": 0}}, "optimizer.ns_steps: Input should be greater than 0"),
        ({"optimizer": {"qk_clip_tau": 0}}, "optimizer.qk_clip_tau: Input should be greater than 0"),
        ({"optimizer": {"name": "sgd"}}, "optimizer.name: Input should be 'adamw' or 'muon'"),
    ]:
        with pytest.raises(RecipeError) as info:
            parse_recipe(_recipe(**sections), origin="r.yaml")
        assert message in str(info.value), str(info.value)


def test_recipe_identity_unchanged_without_new_features():
    from assets.training import training_spec

    r = parse_recipe(_recipe(model={"d_model": 64}, optimizer={"name": "adamw", "lr": 1e-3}))
    spec = training_spec(r)
    assert set(spec["model"]) == {"d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "seq_len",
                                  "rope_theta", "tie_embeddings"}
    assert set(spec["optimizer"]) == {"name", "lr", "weight_decay", "betas", "eps"}
    # a feature switched on changes the identity; writing out a muon default does not
    on = training_spec(parse_recipe(_recipe(model={"d_model": 64, "z_loss": 1e-4})))
    assert on["model"]["z_loss"] == 1e-4
    a = training_spec(parse_recipe(_recipe(optimizer={"name": "muon", "lr": 0.02})))
    b = training_spec(parse_recipe(_recipe(optimizer={"name": "muon", "lr": 0.02, "momentum": 0.95, "adamw_lr": 0.02})))
    assert a == b


def _fake_ctx(recipe, tmp_path):
    return SimpleNamespace(
        plan=SimpleNamespace(context={"recipe": recipe}),
        foundry=SimpleNamespace(train_threads=1),
        upstream={"mixture": SimpleNamespace(dir=tmp_path / "mix")},
        out_dir=tmp_path / "out",
    )


def test_run_config_passes_new_settings(tmp_path):
    from assets.training import run_config
    from training.config import parse_run_config

    plain = run_config(_fake_ctx(parse_recipe(_recipe()), tmp_path), 100, eos_token_id=0)
    assert not {"nope_every", "intra_doc_mask", "z_loss", "eos_token_id"} & set(plain["model"])
    assert "qk_clip_tau" not in plain["optimizer"] and "momentum" not in plain["optimizer"]

    r = parse_recipe(_recipe(model={"nope_every": 2, "intra_doc_mask": True, "z_loss": 1e-4},
                             optimizer={"name": "muon", "lr": 0.02, "qk_clip_tau": 30}))
    rc = run_config(_fake_ctx(r, tmp_path), 100, eos_token_id=7)
    assert {k: rc["model"][k] for k in ("nope_every", "intra_doc_mask", "z_loss", "eos_token_id")} == {
        "nope_every": 2, "intra_doc_mask": True, "z_loss": 1e-4, "eos_token_id": 7}
    assert rc["optimizer"]["name"] == "muon" and rc["optimizer"]["qk_clip_tau"] == 30
    run = parse_run_config(rc)  # the trainer accepts it
    build_optimizer(Transformer(run.model), run.optimizer)
    with pytest.raises(ValueError, match="EOS token id"):
        run_config(_fake_ctx(r, tmp_path), 100)


# --------------------------------------------------------------------------- end to end


def test_train_main_muon_qk_clip_intra_doc(tmp_path, capsys):
    cfg_path = write_run(tmp_path, steps=20)
    run = json.loads(cfg_path.read_text())
    run["model"].update(intra_doc_mask=True, eos_token_id=0, nope_every=2, z_loss=1e-4)
    run["optimizer"] = {"name": "muon", "lr": 0.02, "adamw_lr": 1e-2, "weight_decay": 0.1, "qk_clip_tau": 0.1}
    cfg_path.write_text(json.dumps(run))

    summary = train_mod.main(["--config", str(cfg_path)])
    out = tmp_path / "out"
    m = pq.read_table(out / "metrics.parquet").to_pydict()
    assert sum(m["loss"][-3:]) / 3 < sum(m["loss"][:3]) / 3 - 0.5
    assert all(v is not None and v > 0 for v in m["max_attn_logit"])
    # Unclipped, this run's max logit grows to ~0.34 by step 20; with tau = 0.1 each step's
    # forward sees at most tau plus one update's growth.
    logits = m["max_attn_logit"]
    assert max(logits) > 0.1  # the clip was triggered
    assert max(logits[-5:]) < 0.13
    assert m["lr"][1] == pytest.approx(0.02)  # the Muon group's lr is the one logged
    meta = json.loads((out / "config.json").read_text())
    assert meta["model"]["intra_doc_mask"] is True and meta["model"]["eos_token_id"] == 0
    assert meta["optimizer"]["qk_clip_tau"] == 0.1
    assert load_checkpoint(out).num_params() == summary["params"]
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    first = next(e for e in events if e["event"] == "metrics")
    assert len(first["max_attn_logit_per_layer"]) == TINY["n_layers"]


def test_adamw_run_logs_no_max_logit(tmp_path):
    train_mod.main(["--config", str(write_run(tmp_path, steps=2))])
    m = pq.read_table(tmp_path / "out" / "metrics.parquet").to_pydict()
    assert m["max_attn_logit"] == [None, None]
