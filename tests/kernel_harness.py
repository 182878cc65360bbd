"""What the kernel test modules (tests/test_kernels*.py) share: the interpreter fixture, poisoned
outputs, fresh seeds and the documented tolerances. A test module uses it with

    from tests.kernel_harness import fresh_seed, interpreter  # noqa: F401 (autouse fixtures)

and reaches a kernel module through `kernel_module("rmsnorm")` (after the fixture has run).

TRITON_INTERPRET=1 must be in the environment before `triton` itself is first imported (Triton's
own `@jit` library functions, e.g. `tl.sigmoid`, are built at import time, and a second import of
triton in one process crashes in its C extension). It is set by a module-scoped fixture, not at
import time, so it is not set while other test modules run (pytest collects every module before
running any), and restored afterwards; triton and the kernel modules are imported lazily inside
that fixture. If something in the same pytest process imported triton earlier without the flag
(importing torch._dynamo does, and lighteval imports that), the fixture runs the requesting module
in a fresh pytest process with the flag instead, fails with its output if it fails, and otherwise
skips the in-process cases with a reason naming the subprocess result.
Caveat: triton stays imported in interpreter mode for the rest of the process; harmless on the CPU,
but a later test that compiles Triton kernels on a GPU in the same process would need its own process.

Every case draws fresh random inputs (a seed derived from the case's name, stable across runs)
and poisons the kernels' output buffers (each `torch.empty` / `torch.empty_like` during the call
returns a NaN-filled tensor), so an element a kernel fails to write shows up as NaN.

Tolerances: float32 is compared at rtol = atol = 1e-5. bfloat16 is compared with the reference run
in bfloat16 at rtol = 2**-6 and atol = 2**-6 * max|reference| (four bf16 ulps, relative to the
tensor's scale): the kernels reproduce the reference's roundings, so what remains are one-ulp flips
where float32 intermediates computed in a different order land on the other side of a bf16
rounding boundary (then amplified by the RMSNorm weight), a different summation order, and (fused
linear + cross-entropy) one bf16 rounding per chunk of the weight gradient.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
KERNEL_MODULES = (
    "kernels._common", "kernels.rmsnorm", "kernels.swiglu", "kernels.rope",
    "kernels.fused_linear_cross_entropy", "kernels.sym_matmul",
)
DTYPES = [torch.float32, torch.bfloat16]
IDS = ["fp32", "bf16"]


def _interpret_flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "on", "yes")


@pytest.fixture(scope="module", autouse=True)
def interpreter(request):
    """Set TRITON_INTERPRET=1 for the module only and import triton and the kernels under it."""
    old = os.environ.get("TRITON_INTERPRET")
    if "triton" in sys.modules and not _interpret_flag(old):
        # Something earlier in this process (e.g. torch._dynamo, which lighteval imports) already
        # imported triton uninterpreted, and it cannot be re-imported: run the module in a fresh
        # process instead and report its result here.
        path = str(request.path)
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path],
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


def kernel_module(name: str):
    """kernels.<name>, imported (by the interpreter fixture) in interpreter mode."""
    mod = sys.modules.get(f"kernels.{name}")
    assert mod is not None and sys.modules["kernels._common"].INTERPRETED, "the interpreter fixture has not run"
    return mod


@pytest.fixture(autouse=True)
def fresh_seed(request):
    # crc32, not hash(): str hashes are salted per process, and a failure should reproduce.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


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
    """The documented tolerances (module docstring), after checking no poison survived."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, f"{out.shape}/{out.dtype} vs {ref.shape}/{ref.dtype}"
    assert not torch.isnan(out).any(), "kernel left elements unwritten (NaN poison survived)"
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:
        scale = ref.float().abs().max().item()
        torch.testing.assert_close(out.float(), ref.float(), rtol=2**-6, atol=2**-6 * max(scale, 1e-3))


def run_both(kernel_fn, ref_fn, inputs: list[torch.Tensor]):
    """Forward and backward through kernel and reference; returns (outs, grads) pairs.

    Every input gets a gradient; the upstream gradient is random (a scalar output gets a random
    scalar, so the backward's scaling by it is exercised).
    """
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
