"""Triton kernels for RMSNorm, SwiGLU and RoPE against their PyTorch references, and the model's
kernels switch, on the CPU under the Triton interpreter.

The interpreter fixture, poisoned outputs, fresh seeds and the tolerances (float32 rtol = atol =
1e-5; bfloat16 four ulps relative to the tensor's scale) are in tests/kernel_harness.py. The fused
linear + cross-entropy is tested in test_kernels_linear_ce.py, Muon's symmetric product in
test_kernels_muon.py.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings

import pytest
import torch

if importlib.util.find_spec("triton") is None:  # not importorskip: that would import triton now
    pytest.skip("triton is not installed", allow_module_level=True)

from tests.kernel_harness import (  # noqa: E402, F401 (fresh_seed, interpreter: autouse fixtures)
    DTYPES,
    IDS,
    REPO,
    assert_matches,
    fresh_seed,
    interpreter,
    kernel_module,
    poisoned_outputs,
    run_both,
)

# --------------------------------------------------------------------------- the harness itself


def test_poison_catches_an_unwritten_element():
    """A launcher that skips one element must fail assert_matches (the harness can fail)."""
    def skips_last(x):
        out = torch.empty_like(x)
        out.view(-1)[:-1] = x.view(-1)[:-1]
        return out

    x = torch.randn(5, 123)
    with poisoned_outputs():
        out = skips_last(x)
    with pytest.raises(AssertionError, match="unwritten"):
        assert_matches(out, x, torch.float32)
    with pytest.raises(AssertionError):  # and the bf16 tolerance is not loose enough to hide a bad value
        bad = x.bfloat16().clone()
        bad[0, 0] += 0.1 * bad.abs().max()
        assert_matches(bad, x.bfloat16(), torch.bfloat16)


# --------------------------------------------------------------------------- references


def test_references_are_the_model_ops():
    from training.model import RMSNorm, apply_rope, rope_cache

    x = torch.randn(3, 7, 96, dtype=torch.bfloat16)
    norm = RMSNorm(96, 1e-5)
    with torch.no_grad():
        norm.weight.normal_()
        assert torch.equal(kernel_module("rmsnorm").rms_norm_reference(x, norm.weight, 1e-5), norm(x))
    a, b = torch.randn(2, 5, 33), torch.randn(2, 5, 33)
    assert torch.equal(kernel_module("swiglu").swiglu_reference(a, b), torch.nn.functional.silu(a) * b)
    cos, sin = rope_cache(7, 12, 10000.0)
    q = torch.randn(2, 3, 7, 12)
    assert torch.equal(kernel_module("rope").rope_reference_one(q, cos, sin), apply_rope(q, cos, sin))


# --------------------------------------------------------------------------- RMSNorm


# x dtype, weight dtype: the model's bf16 activations meet float32 weights (output promoted to
# float32), or a model cast wholly to bf16.
@pytest.mark.parametrize(
    "dtype,weight_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)],
    ids=["fp32", "bf16-fp32w", "bf16-bf16w"],
)
@pytest.mark.parametrize("shape", [(5, 123), (3, 7, 96), (1, 1), (9, 64)], ids=str)
def test_rmsnorm(shape, dtype, weight_dtype):
    mod = kernel_module("rmsnorm")
    n = shape[-1]
    x = torch.randn(shape, dtype=dtype) * 3
    w = torch.randn(n, dtype=weight_dtype)
    outs, grads = run_both(lambda x, w: mod.rms_norm(x, w, 1e-5), lambda x, w: mod.rms_norm_reference(x, w, 1e-5), [x, w])
    for out, ref in outs + grads:
        assert_matches(out, ref, dtype)


# --------------------------------------------------------------------------- SwiGLU


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("shape", [(5, 123), (3, 7, 96), (1,)], ids=str)  # 3x7x96 spans two blocks
def test_swiglu(shape, dtype):
    mod = kernel_module("swiglu")
    a, b = torch.randn(shape, dtype=dtype) * 3, torch.randn(shape, dtype=dtype)
    outs, grads = run_both(mod.swiglu, mod.swiglu_reference, [a, b])
    for out, ref in outs + grads:
        assert_matches(out, ref, dtype)


# --------------------------------------------------------------------------- RoPE


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("B,H,K,T,D", [(2, 3, 1, 7, 16), (1, 4, 2, 5, 96), (3, 2, 2, 3, 6)])
def test_rope(B, H, K, T, D, dtype):
    from training.model import rope_cache

    mod = kernel_module("rope")
    cos, sin = rope_cache(T + 4, D, 10000.0)
    cos, sin = cos[:T], sin[:T]  # a slice of a longer cache, as the model passes it
    # q as the model makes it: a transposed view of [B, T, H, D]; k contiguous.
    q = torch.randn(B, T, H, D, dtype=dtype).transpose(1, 2)
    k = torch.randn(B, K, T, D, dtype=dtype)

    def kernel(q, k):
        return mod.rope(q.transpose(1, 2).contiguous().transpose(1, 2), k, cos, sin)

    outs, grads = run_both(kernel, lambda q, k: mod.rope_reference(q, k, cos, sin), [q, k])
    for out, ref in outs + grads:
        assert_matches(out, ref, dtype)


# --------------------------------------------------------------------------- the model switch

TINY = dict(vocab_size=64, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=80, max_seq_len=16)


@pytest.mark.parametrize("z_loss", [0.0, 1e-2], ids=["ce", "ce+z"])
def test_model_triton_matches_reference(z_loss):
    """Same loss and gradients with every op on its kernel: norms, RoPE, SwiGLU, fused head + loss."""
    from training.model import ModelConfig, Transformer

    ref = Transformer(ModelConfig(**TINY, z_loss=z_loss))
    tri = Transformer(ModelConfig(**TINY, z_loss=z_loss, kernels="triton"))
    assert tri.uses_triton_kernels and not ref.uses_triton_kernels
    tri.load_state_dict(ref.state_dict())
    with torch.no_grad():  # non-trivial norm weights so the weight gradient path is exercised
        for (name, p), (_, q) in zip(ref.named_parameters(), tri.named_parameters()):
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
                q.copy_(p)
    idx = torch.randint(0, 64, (2, 9))
    targets = torch.randint(0, 64, (2, 9))
    targets[0, :3] = -100  # ignored positions count in neither loss nor gradient
    logits_ref, loss_ref = ref(idx, targets)
    logits_tri, loss_tri = tri(idx, targets)
    assert logits_ref is not None and logits_tri is None  # the fused head never made the logits
    loss_ref.backward()
    loss_tri.backward()
    torch.testing.assert_close(loss_tri, loss_ref, rtol=1e-5, atol=1e-5)
    for (name, p), (_, q) in zip(ref.named_parameters(), tri.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    with torch.no_grad():  # without targets the kernels' model still returns the logits
        torch.testing.assert_close(tri(idx)[0], ref(idx)[0], rtol=1e-5, atol=1e-5)


def test_model_triton_falls_back_with_one_warning(monkeypatch):
    from training.model import ModelConfig, Transformer

    monkeypatch.delenv("TRITON_INTERPRET")
    if torch.cuda.is_available():
        pytest.skip("a GPU driver is present: no fallback")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = Transformer(ModelConfig(**TINY, kernels="triton"))
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "no GPU driver" in msgs[0] and "reference" in msgs[0]
    assert not model.uses_triton_kernels
    _, loss = model(torch.randint(0, 64, (1, 5)), torch.randint(0, 64, (1, 5)))
    assert torch.isfinite(loss)


def test_config_kernels_field():
    from training.model import ModelConfig

    cfg = ModelConfig(**TINY)
    assert cfg.kernels == "reference" and "kernels" not in cfg.to_dict()  # old configs unchanged
    tri = ModelConfig(**TINY, kernels="triton")
    assert tri.to_dict()["kernels"] == "triton"
    assert ModelConfig.from_dict(tri.to_dict()) == tri
    with pytest.raises(ValueError, match="kernels must be one of"):
        ModelConfig(**TINY, kernels="cuda")


def test_reference_model_never_imports_triton():
    code = (
        "import sys, torch\n"
        "import training.model as m\n"
        "m.Transformer(m.ModelConfig(vocab_size=8, d_model=16, n_heads=2, n_kv_heads=1))\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert 'kernels.rmsnorm' not in sys.modules\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, timeout=120)


def test_benchmark_smoke_runs_every_kernel():
    """benchmarks/kernels.py --smoke: the GPU benchmark's whole path, on the CPU interpreter."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/kernels.py", "--smoke"], cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "failed" not in proc.stdout, proc.stdout
    for op in ("rmsnorm", "swiglu", "rope", "linear+CE", "X·Xᵀ", "newton-schulz"):
        impls = {word for line in proc.stdout.splitlines() if line.startswith(op) for word in line.split()}
        assert {"eager", "triton"} <= impls, f"{op}: {impls}"
