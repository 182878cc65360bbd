"""Rotary position embeddings on q and k: Triton forward and backward beside the PyTorch reference.

Semantics are exactly those of `training.model.apply_rope` (the rotate-half convention: dimension
i is paired with i + D/2) applied to both q [B, H, T, D] and k [B, K, T, D], with cos/sin tables of
shape [T, D] (as `training.model.rope_cache` builds them; the two halves are read separately, so
any table works):

    out = (x.float() * cos + cat([-x2, x1]).float() * sin).to(x.dtype)

The backward is the transposed rotation; in low precision it rounds the two gradient paths to
x's dtype before adding them, as autograd does for the reference. q and k may be strided views
(the model passes `view(B, T, H, D).transpose(1, 2)`); outputs keep the input's layout.
One program handles one (batch, position) pair: all heads, all D/2 rotation pairs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import can_run


def rope_reference_one(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch RoPE on one tensor, identical to `training.model.apply_rope`."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).type_as(x)


def rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch RoPE on q and k."""
    return rope_reference_one(q, cos, sin), rope_reference_one(k, cos, sin)


@triton.jit
def _rope_kernel(
    X, Y, COS, SIN,
    sx_b, sx_h, sx_t, sx_d,
    sy_b, sy_h, sy_t, sy_d,
    s_cos, s_sin,
    seq_len, n_heads, half,
    BACKWARD: tl.constexpr,
    H_BLOCK: tl.constexpr,
    HALF_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    t = pid % seq_len
    h = tl.arange(0, H_BLOCK)[:, None]
    d = tl.arange(0, HALF_BLOCK)[None, :]
    d_mask = d < half
    mask = (h < n_heads) & d_mask

    cos1 = tl.load(COS + t * s_cos + d, mask=d_mask, other=0.0).to(tl.float32)
    cos2 = tl.load(COS + t * s_cos + half + d, mask=d_mask, other=0.0).to(tl.float32)
    sin1 = tl.load(SIN + t * s_sin + d, mask=d_mask, other=0.0).to(tl.float32)
    sin2 = tl.load(SIN + t * s_sin + half + d, mask=d_mask, other=0.0).to(tl.float32)

    x_row = X + b * sx_b + t * sx_t + h * sx_h
    x1 = tl.load(x_row + d * sx_d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + (d + half) * sx_d, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        # x1 receives g1*cos1 (direct path) + g2*sin2 (rotated path); x2 receives g2*cos2 - g1*sin1.
        # Each path is rounded to the input dtype before the sum, as autograd does.
        dt = Y.dtype.element_ty
        y1 = (x1 * cos1).to(dt).to(tl.float32) + (x2 * sin2).to(dt).to(tl.float32)
        y2 = (x2 * cos2).to(dt).to(tl.float32) - (x1 * sin1).to(dt).to(tl.float32)
    else:
        y1 = x1 * cos1 - x2 * sin1
        y2 = x2 * cos2 + x1 * sin2
    y_row = Y + b * sy_b + t * sy_t + h * sy_h
    tl.store(y_row + d * sy_d, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(y_row + (d + half) * sy_d, y2.to(Y.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    B, H, T, D = x.shape
    y = torch.empty_like(x)  # keeps x's (dense) layout
    if y.stride() != x.stride():
        y = torch.empty((B, H, T, D), dtype=x.dtype, device=x.device)
    if x.numel() > 0:
        half = D // 2
        _rope_kernel[(B * T,)](
            x, y, cos, sin,
            *x.stride(), *y.stride(), cos.stride(0), sin.stride(0),
            T, H, half,
            BACKWARD=backward,
            H_BLOCK=triton.next_power_of_2(H),
            HALF_BLOCK=triton.next_power_of_2(half),
        )
    return y


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, name: str) -> None:
    if x.ndim != 4 or x.shape[-1] % 2:
        raise ValueError(f"rope: {name} must be [B, heads, T, D] with D even, got {tuple(x.shape)}")
    T, D = x.shape[2], x.shape[3]
    for table in (cos, sin):
        if tuple(table.shape) != (T, D) or table.stride(-1) != 1:
            raise ValueError(f"rope: cos/sin must be [T, D] = {(T, D)} with unit last stride, got {tuple(table.shape)}")


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        _check(q, cos, sin, "q")
        _check(k, cos, sin, "k")
        ctx.save_for_backward(cos, sin)
        return _launch(q, cos, sin, False), _launch(k, cos, sin, False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq_in = _launch(dq, cos, sin, True) if dq is not None else None
        dk_in = _launch(dk, cos, sin, True) if dk is not None else None
        return dq_in, dk_in, None, None


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q and k through the Triton kernels (reference where they cannot run)."""
    if not can_run(q, k, cos, sin) or q.dtype != k.dtype:
        return rope_reference(q, k, cos, sin)
    return RoPEFunction.apply(q, k, cos, sin)
