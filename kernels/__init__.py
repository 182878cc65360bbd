"""Triton kernels for the training hot path, each beside its PyTorch reference.

One file per op (Liger-Kernel's layout): the `@triton.jit` kernels, the launcher, a
`torch.autograd.Function`, and a plain PyTorch reference with the exact semantics of the matching
code in `training/model.py`.

Implemented (forward and backward):
    rmsnorm.py  `rms_norm(x, weight, eps)`    RMSNorm, with the weight gradient
    swiglu.py   `swiglu(a, b)`                the gated activation silu(a) * b
    rope.py     `rope(q, k, cos, sin)`        rotate-half RoPE on q and k
    fused_linear_cross_entropy.py  `linear_cross_entropy(x, weight, target, ...)`  output head +
                cross-entropy (+ z-loss) in row chunks, never materialising the [tokens, vocab] logits
    sym_matmul.py  `sym_matmul(x, alpha, beta, add)`  alpha * x @ x.T + beta * add computing one
                triangle of tiles: Muon's Newton-Schulz products (`training.muon`)

`training.model.ModelConfig(kernels="triton")` routes the model through these ops (the output head
and loss through the fused linear + cross-entropy, and a Muon optimizer built for that model through
`sym_matmul`); the default, "reference", runs plain PyTorch. Importing this package does not import Triton (nor Dagster);
`triton_unavailable_reason()` says why the kernels cannot run here, and `load_ops()` imports them.
Kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter, which needs
TRITON_INTERPRET=1 in the environment before the first kernel module is imported (slow: for tests).
"""

from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace

IMPLEMENTED = ("rms_norm", "swiglu", "rope", "linear_cross_entropy", "sym_matmul")


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def triton_unavailable_reason() -> str | None:
    """None if the Triton kernels can run in this process, else a one-line reason."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if _interpret_requested():
        return None
    import torch

    if not torch.cuda.is_available():
        return "no GPU driver is available (set TRITON_INTERPRET=1 to run the kernels in the slow CPU interpreter)"
    return None


def load_ops() -> SimpleNamespace:
    """Import the kernel modules (and Triton) and return the ops by name."""
    from kernels.fused_linear_cross_entropy import linear_cross_entropy
    from kernels.rmsnorm import rms_norm
    from kernels.rope import rope
    from kernels.swiglu import swiglu
    from kernels.sym_matmul import sym_matmul

    return SimpleNamespace(
        rms_norm=rms_norm, swiglu=swiglu, rope=rope, linear_cross_entropy=linear_cross_entropy, sym_matmul=sym_matmul
    )
