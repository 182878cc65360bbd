"""Triton kernels against their PyTorch references, on the CPU under the Triton interpreter.

TRITON_INTERPRET=1 must be in the environment before `triton` itself is first imported (Triton's
own `@jit` library functions, e.g. `tl.sigmoid`, are built at import time, and a second import of
triton in one process crashes in its C extension). It is set by a module-scoped fixture, not at
import time, so it is not set while other test modules run (pytest collects every module before
running any), and restored afterwards; triton and the kernel modules are imported lazily inside
that fixture. If something in the same pytest process imported triton earlier without the flag
(importing torch._dynamo does, and lighteval imports that), the fixture runs this module in a fresh
pytest process with the flag instead, fails with its output if it fails, and otherwise skips the
in-process cases with a reason naming the subprocess result.
Caveat: triton stays imported in interpreter mode for the rest of the process; harmless on the CPU,
but a later test that compiles Triton kernels on a GPU in the same process would need its own process.

Every case draws fresh random inputs and poisons the kernels' output buffers (each `torch.empty`
/ `torch.empty_like` during the call returns a NaN-filled tensor), so an element a kernel fails
to write shows up as NaN.

Tolerances: float32 is compared at rtol = atol = 1e-5. bfloat16 is compared with the reference run
in bfloat16 at rtol = 2**-6 and atol = 2**-6 * max|reference| (four bf16 ulps, relative to the
tensor's scale): the kernels reproduce the reference's roundings, so what remains are one-ulp flips
where float32 intermediates computed in a different order land on the other side of a bf16
rounding boundary (then amplified by the RMSNorm weight), and a different summation order.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
KERNEL_MODULES = ("kernels._common", "kernels.rmsnorm", "kernels.swiglu", "kernels.rope")

if importlib.util.find_spec("triton") is None:  # not importorskip: that would import triton now
    pytest.skip("triton is not installed", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def interpreter():
    """Set TRITON_INTERPRET=1 for this module only and import triton and the kernels under it."""
    old = os.environ.get("TRITON_INTERPRET")
    if "triton" in sys.modules and not _interpret_flag(old):
        # Something earlier in this process (e.g. torch._dynamo, which lighteval imports) already
        # imported triton uninterpreted, and it cannot be re-imported: run this module in a fresh
        # process instead and report its result here.
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
            cwd=REPO, env={**os.environ, "TRITON_INTERPRET": "1"},
            capture_output=True, text=True, timeout=600,
        )
        if proc.returncode != 0:
            pytest.fail(f"kernel tests failed in a subprocess (TRITON_INTERPRET=1):\n{proc.stdout[-6000:]}{proc.stderr[-2000:]}")
        pytest.skip(f"triton was imported before TRITON_INTERPRET=1 could be set; ran in a subprocess "
                    f"instead: {proc.stdout.strip().splitlines()[-1]}")
    os.environ["TRITON_INTERPRET"] = "1"
    mods = {name.split(".")[-1]: importlib.import_module(name) for name in KERNEL_MODULES}
    assert mods["_common"].INTERPRETED
    yield mods
    if old is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old


def _interpret_flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "on", "yes")


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(hash(request.node.name) % 2**31)  # fresh, reproducible inputs per case


@contextlib.contextmanager
def poisoned_outputs():
    """Every torch.empty / torch.empty_like made inside comes back filled with NaN (or -1)."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(math.nan) if t.is_floating_point() else t.fill_(-1)

    mp = pytest.MonkeyPatch()
    mp.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    mp.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    try:
        yield
    finally:
        mp.undo()


def assert_matches(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not torch.isnan(out).any(), "kernel left elements unwritten (NaN poison survived)"
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:
        scale = ref.float().abs().max().item()
        torch.testing.assert_close(out.float(), ref.float(), rtol=2**-6, atol=2**-6 * max(scale, 1e-3))


def run_both(kernel_fn, ref_fn, inputs: list[torch.Tensor]):
    """Forward and backward through kernel and reference; returns (outs, grads) pairs."""
    k_in = [t.detach().clone().requires_grad_() for t in inputs]
    r_in = [t.detach().clone().requires_grad_() for t in inputs]
    with poisoned_outputs():
        k_out = kernel_fn(*k_in)
    r_out = ref_fn(*r_in)
    k_out = k_out if isinstance(k_out, tuple) else (k_out,)
    r_out = r_out if isinstance(r_out, tuple) else (r_out,)
    grads_out = [torch.randn_like(o) for o in r_out]
    with poisoned_outputs():
        k_grads = torch.autograd.grad(k_out, k_in, grads_out)
    r_grads = torch.autograd.grad(r_out, r_in, grads_out)
    return list(zip(k_out, r_out)), list(zip(k_grads, r_grads))


DTYPES = [torch.float32, torch.bfloat16]
IDS = ["fp32", "bf16"]

# --------------------------------------------------------------------------- references


def test_references_are_the_model_ops(interpreter):
    from training.model import RMSNorm, apply_rope, rope_cache

    x = torch.randn(3, 7, 96, dtype=torch.bfloat16)
    norm = RMSNorm(96, 1e-5)
    with torch.no_grad():
        norm.weight.normal_()
        assert torch.equal(interpreter["rmsnorm"].rms_norm_reference(x, norm.weight, 1e-5), norm(x))
    a, b = torch.randn(2, 5, 33), torch.randn(2, 5, 33)
    assert torch.equal(interpreter["swiglu"].swiglu_reference(a, b), torch.nn.functional.silu(a) * b)
    cos, sin = rope_cache(7, 12, 10000.0)
    q = torch.randn(2, 3, 7, 12)
    assert torch.equal(interpreter["rope"].rope_reference_one(q, cos, sin), apply_rope(q, cos, sin))


# --------------------------------------------------------------------------- RMSNorm


# x dtype, weight dtype: the model's bf16 activations meet float32 weights (output promoted to
# float32), or a model cast wholly to bf16.
@pytest.mark.parametrize(
    "dtype,weight_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)],
    ids=["fp32", "bf16-fp32w", "bf16-bf16w"],
)
@pytest.mark.parametrize("shape", [(5, 123), (3, 7, 96), (1, 1), (9, 64)], ids=str)
def test_rmsnorm(interpreter, shape, dtype, weight_dtype):
    mod = interpreter["rmsnorm"]
    n = shape[-1]
    x = torch.randn(shape, dtype=dtype) * 3
    w = torch.randn(n, dtype=weight_dtype)
    outs, grads = run_both(lambda x, w: mod.rms_norm(x, w, 1e-5), lambda x, w: mod.rms_norm_reference(x, w, 1e-5), [x, w])
    for out, ref in outs + grads:
        assert_matches(out, ref, dtype)


# --------------------------------------------------------------------------- SwiGLU


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("shape", [(5, 123), (3, 7, 96), (1,)], ids=str)  # 3x7x96 spans two blocks
def test_swiglu(interpreter, shape, dtype):
    mod = interpreter["swiglu"]
    a, b = torch.randn(shape, dtype=dtype) * 3, torch.randn(shape, dtype=dtype)
    outs, grads = run_both(mod.swiglu, mod.swiglu_reference, [a, b])
    for out, ref in outs + grads:
        assert_matches(out, ref, dtype)


# --------------------------------------------------------------------------- RoPE


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("B,H,K,T,D", [(2, 3, 1, 7, 16), (1, 4, 2, 5, 96), (3, 2, 2, 3, 6)])
def test_rope(interpreter, B, H, K, T, D, dtype):
    from training.model import rope_cache

    mod = interpreter["rope"]
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


def test_model_triton_matches_reference(interpreter):
    from training.model import ModelConfig, Transformer

    torch.manual_seed(1)
    ref = Transformer(ModelConfig(**TINY))
    tri = Transformer(ModelConfig(**TINY, kernels="triton"))
    assert tri.uses_triton_kernels and not ref.uses_triton_kernels
    tri.load_state_dict(ref.state_dict())
    with torch.no_grad():  # non-trivial norm weights so the weight gradient path is exercised
        for (name, p), (_, q) in zip(ref.named_parameters(), tri.named_parameters()):
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
                q.copy_(p)
    idx = torch.randint(0, 64, (2, 9))
    targets = torch.randint(0, 64, (2, 9))
    _, loss_ref = ref(idx, targets)
    _, loss_tri = tri(idx, targets)
    loss_ref.backward()
    loss_tri.backward()
    torch.testing.assert_close(loss_tri, loss_ref, rtol=1e-5, atol=1e-5)
    for (name, p), (_, q) in zip(ref.named_parameters(), tri.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_model_triton_falls_back_with_one_warning(interpreter, monkeypatch):
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


def test_config_kernels_field(interpreter):
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
