"""Muon's symmetric product (kernels/sym_matmul.py) against plain `x @ x.T`, and its use in the
Newton–Schulz iteration and the Muon optimizer, on the CPU under the Triton interpreter.

Harness, poisoning and tolerances: tests/kernel_harness.py. A small `block` makes the tiny shapes
cover several output tiles (with partial ones at the edges), so both the computed upper-triangle
tiles and their mirrors are checked; the poison catches a mirror that was not written.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:  # not importorskip: that would import triton now
    pytest.skip("triton is not installed", allow_module_level=True)

from tests.kernel_harness import (  # noqa: E402, F401 (fresh_seed, interpreter: autouse fixtures)
    DTYPES,
    IDS,
    assert_matches,
    fresh_seed,
    interpreter,
    kernel_module,
    poisoned_outputs,
    run_both,
)

TINY = dict(vocab_size=64, d_model=48, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=80, max_seq_len=16)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize(
    "shape,block",
    [((5, 123), None), ((3, 7, 96), None), ((37, 50), 16), ((2, 33, 20), 16), ((1, 1), None)],
    ids=["5x123", "3x7x96", "37x50-3x3tiles", "2x33x20-batched-tiles", "1x1"],
)
def test_sym_matmul(shape, block, dtype):
    mod = kernel_module("sym_matmul")
    x = torch.randn(shape, dtype=dtype)
    outs, grads = run_both(lambda x: mod.sym_matmul(x, block=block), mod.sym_matmul_reference, [x])
    (out, ref), = outs
    assert_matches(out, ref, dtype)
    assert torch.equal(out, out.transpose(-1, -2)), "the mirrored triangle must equal the computed one exactly"
    for g, g_ref in grads:
        assert_matches(g, g_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_sym_matmul_epilogue(dtype):
    """alpha * A A^T + beta * A: Newton–Schulz's polynomial in one call, gradients through A and add."""
    mod = kernel_module("sym_matmul")
    a = torch.randn(37, 37, dtype=dtype)
    a = (a + a.T) / 2  # symmetric, as the Gram matrix is
    add = torch.randn(37, 37, dtype=dtype)

    def kernel(a, add):
        return mod.sym_matmul(a, -4.775, 2.0315, add, block=16)

    def reference(a, add):
        return mod.sym_matmul_reference(a, -4.775, 2.0315, add)

    outs, grads = run_both(kernel, reference, [a, add])
    for out, ref in outs + grads:
        assert_matches(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_sym_matmul_autotuned_launch(dtype):
    """The GPU's launch path (autotuner, grid from the chosen BLOCK), here with one small config,
    on a transposed view (Newton–Schulz passes x.T for tall matrices) and with the epilogue."""
    import triton

    mod = kernel_module("sym_matmul")
    kernel = mod.autotuned([triton.Config({"BLOCK": 16, "BLOCK_K": 16}, num_warps=4)])
    x = torch.randn(50, 37, dtype=dtype).T  # [37, 50], last stride 37
    add = torch.randn(37, 37, dtype=dtype)
    with poisoned_outputs():
        out = mod._launch(x, 0.5, -2.0, add, None, kernel=kernel)
    assert_matches(out, mod.sym_matmul_reference(x, 0.5, -2.0, add), dtype)
    assert all(cfg.kwargs["BLOCK"] >= 16 and cfg.kwargs["BLOCK_K"] >= 16 for cfg in mod.GPU_CONFIGS)  # tl.dot minimum


def test_sym_matmul_bad_inputs():
    mod = kernel_module("sym_matmul")
    with pytest.raises(ValueError, match=r"\[M, K\] or \[B, M, K\]"):
        mod.sym_matmul(torch.randn(4))
    with pytest.raises(ValueError, match="add must be"):
        mod.sym_matmul(torch.randn(4, 6), 1.0, 1.0, torch.randn(6, 6))
    with pytest.raises(ValueError, match="power of two"):
        mod.sym_matmul(torch.randn(4, 6), block=24)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)], ids=["wide", "tall"])
def test_newton_schulz_with_the_kernel_matches_plain(shape):
    from training.muon import newton_schulz

    mod = kernel_module("sym_matmul")
    g = torch.randn(shape)
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return mod.sym_matmul(*args, block=16, **kwargs)

    plain = newton_schulz(g, steps=5)
    fused = newton_schulz(g, steps=5, sym_matmul=counted)
    assert len(calls) == 10  # two symmetric products per step
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)
    s = torch.linalg.svdvals(fused)
    assert 0.5 < s.min() and s.max() < 1.3  # still orthogonalised


def test_muon_for_a_triton_model_uses_the_kernel(monkeypatch):
    """build_muon takes sym_matmul from a kernels="triton" model; the step equals the plain one."""
    from training.model import ModelConfig, Transformer
    from training.muon import build_muon

    mod = kernel_module("sym_matmul")
    ref = Transformer(ModelConfig(**TINY))
    tri = Transformer(ModelConfig(**TINY, kernels="triton"))
    tri.load_state_dict(ref.state_dict())
    calls = []
    real = mod.sym_matmul
    monkeypatch.setattr(tri.kernel_ops, "sym_matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = {"name": "muon", "lr": 0.02}
    opt_ref, opt_tri = build_muon(ref, cfg), build_muon(tri, cfg)
    assert opt_ref.sym_matmul is None and opt_tri.sym_matmul is not None
    idx = torch.randint(0, 64, (2, 8))
    for model in (ref, tri):
        model(idx, idx)[1].backward()
    opt_ref.step()
    opt_tri.step()
    n_muon = len(opt_tri.param_groups[0]["params"])
    assert opt_tri.param_groups[0]["use_muon"] and len(calls) == 2 * 5 * n_muon
    for (name, p), (_, q) in zip(ref.named_parameters(), tri.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert "sym_matmul" not in str(opt_tri.state_dict()["param_groups"])  # checkpoints unchanged
