"""Mixture of Experts: the layer, its dispatch and auxiliary losses, config, optimizer split, data
sources per token, and the trainer's expert-load log."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from tests.test_training import TINY, make_mixture, make_source
from training import train as train_mod
from training.checkpoint import load_checkpoint, save_checkpoint
from training.data import MixtureTokenStream
from training.model import ModelConfig, SwiGLU, Transformer
from training.moe import ExpertLoad, MoE, dispatch, load_balancing_loss, router_z_loss
from training.muon import split_params
from training.optim import build_optimizer, param_groups

MOE = dict(moe_experts=4, moe_top_k=2, moe_ffn_hidden=16)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def moe_layer(n_experts=4, top_k=2, shared=False, norm_topk=True, d=8, hidden=12) -> MoE:
    cfg = ModelConfig(**{**TINY, "d_model": d, "n_heads": 2, "n_kv_heads": 1})
    layer = MoE(d, n_experts, top_k, lambda: SwiGLU(cfg, None, hidden), SwiGLU(cfg, None, hidden) if shared else None,
                norm_topk)
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 1.0)  # decisive routing
    return layer


def _decisive_routers(model: Transformer) -> None:
    with torch.no_grad():
        for _, moe in model.moe_layers:
            moe.router.weight.normal_(0.0, 1.0)


# --------------------------------------------------------------------------- the layer


def test_forward_backward_shapes():
    model = Transformer(ModelConfig(**TINY, **MOE, moe_shared_expert=True))
    idx = torch.randint(0, 64, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 64) and loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    moe = model.layers[0].mlp
    assert isinstance(moe, MoE) and len(moe.experts) == 4
    assert moe.router.weight.shape == (4, 32) and moe.router.weight.grad is not None
    assert moe.shared_expert.down_proj.weight.shape == (32, 16) and moe.shared_expert_gate.weight.grad is not None
    assert sum(e.gate_proj.weight.grad is not None for e in moe.experts) >= 2
    s = moe.stats
    assert s.counts.shape == (4,) and s.counts.sum() == 3 * 16 * 2  # k slots per token
    assert s.top_idx.shape == (48, 2) and s.prob_mean.shape == (4,)
    assert set(model.moe_losses) == {"lb", "z", "weighted"}


def test_one_expert_top1_is_its_swiglu():
    layer = moe_layer(n_experts=1, top_k=1)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(layer(x), layer.experts[0](x), rtol=0, atol=1e-6)


def test_identical_experts_all_chosen_is_one_swiglu():
    # top_k = E with renormalised weights: the weights sum to 1, so identical experts give one expert's output.
    layer = moe_layer(n_experts=3, top_k=3)
    for e in layer.experts[1:]:
        e.load_state_dict(layer.experts[0].state_dict())
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(layer(x), layer.experts[0](x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("top_k,shared,norm_topk", [(2, False, True), (1, True, False), (3, True, True)])
def test_dispatch_matches_per_token_reference(top_k, shared, norm_topk):
    layer = moe_layer(n_experts=5, top_k=top_k, shared=shared, norm_topk=norm_topk)
    x = torch.randn(3, 7, 8, requires_grad=True)
    probe = torch.randn(3, 7, 8)

    def reference(x):
        h = x.reshape(-1, 8)
        logits = h @ layer.router.weight.T
        probs = logits.float().softmax(-1)
        w, idx = probs.topk(top_k, dim=-1)
        if norm_topk:
            w = w / w.sum(-1, keepdim=True)
        rows = []
        for n in range(h.shape[0]):  # one token at a time
            y = sum(w[n, j] * layer.experts[int(idx[n, j])](h[n : n + 1])[0] for j in range(top_k))
            if shared:
                y = y + torch.sigmoid(layer.shared_expert_gate(h[n])) * layer.shared_expert(h[n : n + 1])[0]
            rows.append(y)
        return torch.stack(rows).view_as(x)

    params = [x, *layer.parameters()]
    got = layer(x)
    g_got = torch.autograd.grad((got * probe).sum(), params, allow_unused=True)
    want = reference(x)
    g_want = torch.autograd.grad((want * probe).sum(), params, allow_unused=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b, p in zip(g_got, g_want, params, strict=True):
        a = torch.zeros_like(p) if a is None else a  # an expert no token chose has no gradient
        b = torch.zeros_like(p) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_dispatch_skips_unused_experts():
    experts = torch.nn.ModuleList(torch.nn.Linear(4, 4, bias=False) for _ in range(3))
    h = torch.randn(5, 4)
    idx = torch.zeros(5, 1, dtype=torch.long)  # every token to expert 0
    y = dispatch(h, idx, torch.ones(5, 1), experts)
    torch.testing.assert_close(y, experts[0](h))


# --------------------------------------------------------------------------- auxiliary losses


def test_lb_loss_by_hand():
    p = torch.tensor([0.5, 0.3, 0.2])
    counts = torch.tensor([2.0, 1.0, 1.0])  # 4 slots: f = [1/2, 1/4, 1/4]
    assert load_balancing_loss(p, counts).item() == pytest.approx(3 * (0.5 * 0.5 + 0.25 * 0.3 + 0.25 * 0.2))
    uniform = torch.full((4,), 0.25)
    assert load_balancing_loss(uniform, torch.tensor([3.0, 3.0, 3.0, 3.0])).item() == pytest.approx(1.0)


def _capture_moe_inputs(model: Transformer) -> list:
    seen = []
    for _, moe in model.moe_layers:
        moe.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    return seen


def test_model_aux_losses_by_hand():
    cfg = ModelConfig(**TINY, **MOE, moe_lb_coef=0.3, moe_z_coef=0.05)
    model = Transformer(cfg)
    _decisive_routers(model)
    seen = _capture_moe_inputs(model)
    idx = torch.randint(0, 64, (2, 16))
    _, loss = model(idx, idx)
    lbs, zs = [], []
    for (_, moe), h in zip(model.moe_layers, seen, strict=True):
        logits = h @ moe.router.weight.T  # [N, E]
        probs = logits.softmax(-1)
        chosen = probs.topk(2, dim=-1).indices  # [N, 2]
        f = torch.stack([(chosen == e).float().sum() for e in range(4)]) / chosen.numel()
        lbs.append(4 * (f * probs.mean(0)).sum())
        zs.append((torch.logsumexp(logits, -1) ** 2).mean())
    lb, z = sum(lbs) / len(lbs), sum(zs) / len(zs)
    torch.testing.assert_close(model.moe_losses["lb"], lb.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.moe_losses["z"], z.detach(), rtol=1e-5, atol=1e-6)
    logits, _ = model(idx)
    ce = F.cross_entropy(logits.reshape(-1, 64), idx.reshape(-1))
    torch.testing.assert_close(loss, ce + 0.3 * lb + 0.05 * z, rtol=1e-5, atol=1e-6)


def test_router_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # logsumexp: log 2, log 4
    assert router_z_loss(logits).item() == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2)


def _skewed_halves():
    # Two micro-batches from different parts of the vocabulary, so they route differently.
    g = torch.Generator().manual_seed(3)
    return torch.randint(1, 20, (2, 16), generator=g), torch.randint(40, 64, (2, 16), generator=g)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_global_batch_over_micro_batches_equals_micro_batch_on_concatenation():
    base = dict(**TINY, **MOE, moe_lb_coef=1.0, moe_z_coef=0.01)
    whole = Transformer(ModelConfig(**base))
    _decisive_routers(whole)
    split = Transformer(ModelConfig(**base, moe_lb_scope="global_batch"))
    split.load_state_dict(whole.state_dict())
    x1, x2 = _skewed_halves()

    # micro-batch scope over the concatenated batch: one forward
    _, loss = whole(torch.cat([x1, x2]), torch.cat([x1, x2]))
    loss.backward()
    lb_whole = whole.moe_losses["lb"]

    # global scope over two micro-batches, as the trainer runs it: count first, then accumulate
    counts = split.route_counts([x1, x2])
    total, lbs = 0.0, []
    for x in (x1, x2):
        _, part = split(x, x, moe_counts=counts)
        (part / 2).backward()
        total += part.item() / 2
        lbs.append(split.moe_losses["lb"])
    assert total == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close((lbs[0] + lbs[1]) / 2, lb_whole, rtol=1e-6, atol=1e-7)
    got, want = _grads(split), _grads(whole)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7, msg=name)

    # ... whereas balancing each micro-batch on its own is a different loss
    local = []
    for x in (x1, x2):
        whole(x, x)
        local.append(whole.moe_losses["lb"])
    assert abs(float((local[0] + local[1]) / 2 - lb_whole)) > 1e-3


def test_moe_counts_needs_global_scope():
    model = Transformer(ModelConfig(**TINY, **MOE))
    idx = torch.randint(0, 64, (1, 8))
    with pytest.raises(ValueError, match="global_batch"):
        model(idx, idx, moe_counts=torch.ones(2, 4))


# --------------------------------------------------------------------------- config, params, optimizer


def test_dense_config_unchanged():
    cfg = ModelConfig(**TINY)
    assert cfg.to_dict() == {**TINY, "rope_theta": 10000.0, "norm_eps": 1e-5, "tie_embeddings": True}
    model = Transformer(cfg)
    assert model.moe_layers == [] and model.num_params(active=True) == model.num_params()
    assert not any("router" in n or "experts" in n for n, _ in model.named_parameters())
    _, loss = model(torch.randint(0, 64, (1, 8)), torch.randint(0, 64, (1, 8)))
    assert model.moe_losses is None


def test_moe_config_round_trip_and_validation():
    cfg = ModelConfig(**TINY, **MOE, moe_every=2, moe_lb_scope="global_batch", moe_shared_expert=True)
    d = cfg.to_dict()
    assert {k: v for k, v in d.items() if k.startswith("moe_")} == {
        "moe_experts": 4, "moe_ffn_hidden": 16, "moe_every": 2, "moe_lb_scope": "global_batch",
        "moe_shared_expert": True}  # top_k 2 is the default: left out
    assert ModelConfig.from_dict(d) == cfg
    for overrides, message in [
        ({"moe_top_k": 3}, r"\['moe_top_k'\] only apply with moe_experts > 0"),
        ({**MOE, "moe_top_k": 5}, r"moe_top_k must be an integer in \[1, moe_experts=4\]"),
        ({**MOE, "moe_every": 3}, r"moe_every must be an integer in \[1, n_layers=2\]"),
        ({**MOE, "moe_lb_scope": "batch"}, "moe_lb_scope must be one of"),
        ({**MOE, "moe_lb_coef": -1}, "moe_lb_coef must be a number >= 0"),
        ({**MOE, "moe_ffn_hidden": 0}, "moe_ffn_hidden must be a positive integer or null"),
        ({"moe_experts": True}, "moe_experts must be an integer >= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            ModelConfig(**{**TINY, **overrides})


def test_moe_every_and_param_counts():
    cfg = ModelConfig(**{**TINY, "n_layers": 4}, **MOE, moe_every=2, moe_shared_expert=True)
    model = Transformer(cfg)
    assert [i for i, _ in model.moe_layers] == [1, 3]
    assert isinstance(model.layers[0].mlp, SwiGLU) and model.layers[0].mlp.down_proj.weight.shape == (32, 64)
    C, E, F_e = 32, 4, 16
    expert = 3 * C * F_e
    moe_extra = E * C + C + (E + 1) * expert - 3 * C * 64  # router + gate + experts + shared - dense MLP
    dense = Transformer(ModelConfig(**{**TINY, "n_layers": 4}))
    assert model.num_params() == dense.num_params() + 2 * moe_extra
    assert model.num_params(active=True) == model.num_params() - 2 * (E - 2) * expert
    # FLOPs count active parameters only
    assert model.flops_per_token(16) - dense.flops_per_token(16) == 6 * 2 * (moe_extra - (E - 2) * expert)


def test_optimizer_groups_put_router_and_gate_in_adamw():
    model = Transformer(ModelConfig(**TINY, **MOE, moe_shared_expert=True))
    split = {k: {n for n, _ in v} for k, v in split_params(model).items()}
    for i in range(2):
        assert f"layers.{i}.mlp.router.weight" in split["adamw_decay"]
        assert f"layers.{i}.mlp.shared_expert_gate.weight" in split["adamw_decay"]
        for e in range(4):
            assert f"layers.{i}.mlp.experts.{e}.down_proj.weight" in split["muon"]
        assert f"layers.{i}.mlp.shared_expert.up_proj.weight" in split["muon"]
    assert not any("router" in n for n in split["muon"])
    opt = build_optimizer(model, {"name": "muon", "lr": 0.02})
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()
    decay = {id(p) for p in param_groups(model, 0.1)[0]["params"]}
    assert id(model.layers[0].mlp.router.weight) in decay  # AdamW: a 2-D weight, decayed


def test_residual_init_covers_experts():
    model = Transformer(ModelConfig(**{**TINY, "n_layers": 8}, moe_experts=2, moe_ffn_hidden=256))
    assert abs(model.layers[0].mlp.experts[1].down_proj.weight.std().item() - 0.02 / 4) < 0.001


def test_checkpoint_round_trip(tmp_path):
    model = Transformer(ModelConfig(**TINY, **MOE, moe_shared_expert=True)).eval()
    save_checkpoint(tmp_path / "ck", model)
    loaded = load_checkpoint(tmp_path / "ck")
    idx = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0])


# --------------------------------------------------------------------------- data and expert load


def _two_source_mixture(tmp_path):
    rng = np.random.default_rng(0)
    web = [[(5 * j + k) % 30 + 1 for k in range(int(rng.integers(20, 50)))] + [0] for j in range(20)]
    code = [[(3 * j + k) % 30 + 33 for k in range(int(rng.integers(20, 50)))] + [0] for j in range(20)]
    a, b = make_source(tmp_path / "tok_web", web), make_source(tmp_path / "tok_code", code)
    rows = [(sid, int(d)) for d, sid in zip(rng.permutation(40) % 20, [0, 7] * 20, strict=True)]
    return make_mixture(tmp_path / "mix", {0: a, 7: b}, rows)  # names src0 and src7


def test_stream_sources_per_token(tmp_path):
    mix = _two_source_mixture(tmp_path)
    plain = MixtureTokenStream(mix, batch_size=3, seq_len=16)
    tagged = MixtureTokenStream(mix, batch_size=3, seq_len=16)
    assert tagged.source_names == {0: "src0", 7: "src7"}
    for _ in range(3):
        x, y = plain.next_batch()
        x2, y2, src = tagged.next_batch_with_sources()
        assert torch.equal(x, x2) and torch.equal(y, y2) and src.shape == x.shape and src.dtype == torch.long
        # the two sources use disjoint token ranges (EOS = 0 aside), so each token tells its source
        body = x != 0
        assert torch.equal(src[body], torch.where(x[body] >= 33, 7, 0))
    assert plain.windows_consumed == tagged.windows_consumed


def test_expert_load_counter():
    load = ExpertLoad([1, 3], n_experts=3, sources={0: "a", 7: "b"})
    src = torch.tensor([0, 7, 7])
    load.add([torch.tensor([[0, 1], [1, 2], [1, 0]]), torch.tensor([[2, 0], [2, 0], [2, 1]])], src)
    assert load.max_load() == pytest.approx(1.5)  # layer 1: experts 2, 3, 1 tokens; mean 2
    rows = load.flush(step=5)
    assert len(rows) == 2 * 3 * 2
    cell = {(r["layer"], r["expert"], r["source"]): r["tokens"] for r in rows}
    assert cell[(1, 1, "b")] == 2 and cell[(1, 0, "a")] == 1 and cell[(1, 2, "a")] == 0
    assert cell[(3, 2, "b")] == 2 and cell[(3, 0, "b")] == 1 and cell[(3, 1, "b")] == 1
    assert all(r["step"] == 5 for r in rows) and sum(r["tokens"] for r in rows) == 2 * 3 * 2
    assert load.max_load() == 0.0 and sum(r["tokens"] for r in load.flush(step=6)) == 0


def _write_moe_run(tmp_path, steps, model=None, training=None):
    mix = _two_source_mixture(tmp_path)
    run = {
        "model": {**TINY, **MOE, **(model or {})},
        "optimizer": {"name": "adamw", "lr": 1e-2},
        "training": {"steps": steps, "batch_size": 4, "seq_len": 16, "warmup_steps": 1, "log_every": 4,
                     "threads": 1, **(training or {})},
        "data": {"mixture_dir": str(mix)},
        "out_dir": str(tmp_path / "out"),
    }
    path = tmp_path / "RUN.json"
    path.write_text(json.dumps(run))
    return path, mix


def test_training_writes_expert_load_per_source(tmp_path, capsys):
    cfg, mix = _write_moe_run(tmp_path, steps=6, model={"moe_lb_scope": "global_batch"},
                              training={"grad_accum_steps": 2})
    summary = train_mod.main(["--config", str(cfg)])
    out = tmp_path / "out"
    assert summary["active_params"] < summary["params"]

    m = pq.read_table(out / "metrics.parquet").to_pydict()
    assert m["tokens"] == [s * 4 * 16 * 2 for s in range(1, 7)]
    assert all(v is not None and v > 0 for v in m["moe_lb_loss"])
    assert all(v is not None and v > 0 for v in m["moe_z_loss"])
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    logged = [e for e in events if e["event"] == "metrics"]
    assert [e["step"] for e in logged] == [1, 4, 6] and all(e["moe_max_load"] >= 1.0 for e in logged)

    load = pq.read_table(out / "expert_load.parquet")
    assert load.column_names == ["step", "layer", "expert", "source", "tokens"]
    rows = load.to_pylist()
    assert sorted({r["step"] for r in rows}) == [1, 4, 6]  # the logged steps close each window
    assert {r["source"] for r in rows} == {"src0", "src7"} and {r["layer"] for r in rows} == {0, 1}

    # Replay the stream: per window, layer and source, tokens = top_k x that source's input tokens.
    stream = MixtureTokenStream(mix, batch_size=4, seq_len=16)
    per_step = []
    for _ in range(6):
        srcs = torch.cat([stream.next_batch_with_sources()[2] for _ in range(2)])  # 2 micro-batches
        per_step.append({"src0": int((srcs == 0).sum()), "src7": int((srcs == 7).sum())})
    for window, (lo, hi) in {1: (1, 1), 4: (2, 4), 6: (5, 6)}.items():
        for layer in (0, 1):
            for name in ("src0", "src7"):
                got = sum(r["tokens"] for r in rows if (r["step"], r["layer"], r["source"]) == (window, layer, name))
                assert got == 2 * sum(per_step[s - 1][name] for s in range(lo, hi + 1))
            total = sum(r["tokens"] for r in rows if (r["step"], r["layer"]) == (window, layer))
            assert total == (hi - lo + 1) * 2 * 4 * 16 * 2  # steps x micro-batches x B x T x top_k


def _first_step(tmp_path, batch_size, accum, scope):
    cfg, _ = _write_moe_run(tmp_path, steps=1, model={"moe_lb_scope": scope, "moe_lb_coef": 1.0},
                            training={"batch_size": batch_size, "grad_accum_steps": accum, "log_every": 1})
    train_mod.main(["--config", str(cfg)])
    return pq.read_table(tmp_path / "out" / "metrics.parquet").to_pylist()[0]


def test_accumulated_global_step_equals_one_big_batch(tmp_path):
    big = _first_step(tmp_path / "big", 8, 1, "micro_batch")
    accum = _first_step(tmp_path / "accum", 4, 2, "global_batch")
    local = _first_step(tmp_path / "local", 4, 2, "micro_batch")
    assert big["tokens"] == accum["tokens"] == local["tokens"] == 8 * 16
    for key in ("loss", "moe_lb_loss", "moe_z_loss", "grad_norm"):
        assert accum[key] == pytest.approx(big[key], rel=1e-5), key
    assert local["moe_lb_loss"] != pytest.approx(big["moe_lb_loss"], rel=1e-5)


def test_dense_run_writes_no_expert_load(tmp_path):
    cfg, _ = _write_moe_run(tmp_path, steps=2)
    run = json.loads(cfg.read_text())
    run["model"] = dict(TINY)
    cfg.write_text(json.dumps(run))
    summary = train_mod.main(["--config", str(cfg)])
    assert not (tmp_path / "out" / "expert_load.parquet").exists() and "active_params" not in summary
    m = pq.read_table(tmp_path / "out" / "metrics.parquet").to_pydict()
    assert m["moe_lb_loss"] == [None, None] and m["moe_z_loss"] == [None, None]
