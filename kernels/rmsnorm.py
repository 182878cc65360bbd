"""RMSNorm: Triton forward and backward (input and weight gradients) beside the PyTorch reference.

Semantics are exactly those of `training.model.RMSNorm`:

    n = x.float() * rsqrt(mean(x.float() ** 2, -1) + eps)     # float32
    y = n.to(x.dtype) * weight                                 # dtype = promote(x.dtype, weight.dtype)

The kernels reproduce the reference's intermediate roundings (n rounded to x's dtype before the
weight multiply; the gradient reaching n rounded to x's dtype) so bf16 results differ from the
reference only by summation order.

Forward: one program per row, saving the float32 reciprocal RMS (`rstd`, one value per row).
Backward: a fixed number of programs stride over the rows; each writes dx for its rows and one
float32 partial sum of the weight gradient, and the partials are summed on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import can_run, num_programs_hint, num_warps_for, row_block


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain PyTorch RMSNorm, identical to `training.model.RMSNorm.forward`."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return xf.type_as(x) * weight


@triton.jit
def _rms_norm_fwd_kernel(
    X, W, Y, RSTD,
    stride_x, stride_y,
    n_cols, eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    mean_sq = tl.sum(x * x, axis=0) / n_cols
    rstd = 1.0 / tl.sqrt(mean_sq + eps)
    n = (x * rstd).to(X.dtype.element_ty).to(tl.float32)  # the reference's type_as(x)
    tl.store(Y + row * stride_y + cols, (n * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL,
    stride_dy, stride_x, stride_dx,
    n_rows, n_cols,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for row in range(pid, n_rows, n_progs):
        row64 = tl.cast(row, tl.int64)
        x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row64)
        n = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
        dw_acc += dy * n
        # Gradient reaching the float32 normalised value, rounded as the reference's casts do.
        dn = (dy * w).to(X.dtype.element_ty).to(tl.float32)
        # d/dx of x * rstd(x): rstd * dn - x * rstd^3 * mean(dn * x)
        dot = tl.sum(dn * x, axis=0) / n_cols
        dx = rstd * dn - x * (rstd * rstd * rstd) * dot
        tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw_acc, mask=mask)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        shape = x.shape
        n_cols = shape[-1]
        if weight.shape != (n_cols,):
            raise ValueError(f"weight shape {tuple(weight.shape)} does not match the last dim {n_cols}")
        x2 = _as_rows(x)
        n_rows = x2.shape[0]
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block = row_block(n_cols)
        if n_rows > 0:
            _rms_norm_fwd_kernel[(n_rows,)](
                x2, weight, y, rstd, x2.stride(0), y.stride(0), n_cols, eps,
                BLOCK=block, num_warps=num_warps_for(block),
            )
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(*shape[:-1], n_cols)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = _as_rows(dy)
        dx = torch.empty_like(x2)
        n_progs = max(1, min(n_rows, num_programs_hint(x2.device)))
        dw_partial = torch.empty((n_progs, n_cols), dtype=torch.float32, device=x2.device)
        block = row_block(n_cols)
        if n_rows > 0:
            _rms_norm_bwd_kernel[(n_progs,)](
                dy2, x2, weight, rstd, dx, dw_partial,
                dy2.stride(0), x2.stride(0), dx.stride(0), n_rows, n_cols,
                BLOCK=block, num_warps=num_warps_for(block),
            )
            dw = dw_partial.sum(0)
        else:
            dw = torch.zeros(n_cols, dtype=torch.float32, device=x2.device)
        return dx.view(ctx.shape), dw.to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim through the Triton kernels (reference where they cannot run)."""
    if not can_run(x, weight):
        return rms_norm_reference(x, weight, eps)
    return RMSNormFunction.apply(x, weight, eps)
