"""SwiGLU's gated activation silu(a) * b: Triton forward and backward beside the PyTorch reference.

Semantics are exactly those of the MLP in `training.model.SwiGLU` (`F.silu(gate) * up`), including
its roundings in low precision: silu(a) is rounded to the input dtype before the multiply, and in
the backward the gradient reaching silu(a) is rounded to the input dtype before the silu
derivative is applied. The backward recomputes silu(a) from the saved inputs instead of saving it.

Both kernels treat the tensors as flat, so any shape works as long as a and b match.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import can_run

BLOCK_SIZE = 1024


def swiglu_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch gated activation, identical to the model's `F.silu(gate) * up`."""
    return torch.nn.functional.silu(a) * b


@triton.jit
def _swiglu_fwd_kernel(A, B, C, n_elements, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    silu = (a * tl.sigmoid(a)).to(A.dtype.element_ty).to(tl.float32)
    tl.store(C + offs, (silu * b).to(C.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DC, A, B, DA, DB, n_elements, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    dc = tl.load(DC + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    silu = (a * sig).to(A.dtype.element_ty).to(tl.float32)
    db = dc * silu
    dsilu = (dc * b).to(A.dtype.element_ty).to(tl.float32)
    # d silu(a) / da = sigmoid(a) * (1 + a * (1 - sigmoid(a)))
    da = dsilu * sig * (1.0 + a * (1.0 - sig))
    tl.store(DA + offs, da.to(DA.dtype.element_ty), mask=mask)
    tl.store(DB + offs, db.to(DB.dtype.element_ty), mask=mask)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(f"swiglu needs a and b of one shape and dtype, got {a.shape}/{a.dtype} and {b.shape}/{b.dtype}")
        a, b = a.contiguous(), b.contiguous()
        c = torch.empty_like(a)
        n = a.numel()
        if n > 0:
            _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK_SIZE),)](a, b, c, n, BLOCK=BLOCK_SIZE)
        ctx.save_for_backward(a, b)
        return c

    @staticmethod
    def backward(ctx, dc: torch.Tensor):
        a, b = ctx.saved_tensors
        dc = dc.contiguous()
        da, db = torch.empty_like(a), torch.empty_like(b)
        n = a.numel()
        if n > 0:
            _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK_SIZE),)](dc, a, b, da, db, n, BLOCK=BLOCK_SIZE)
        return da, db


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b through the Triton kernels (reference where they cannot run or dtypes differ)."""
    if not can_run(a, b) or a.shape != b.shape or a.dtype != b.dtype:
        return swiglu_reference(a, b)
    return SwiGLUFunction.apply(a, b)
