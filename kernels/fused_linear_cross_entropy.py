"""Fused output head + cross-entropy: the loss and its gradients without the full [N, V] logits.

    loss = cross_entropy(x @ W.T (+ b), target, ignore_index, mean) + z_loss * mean(lse^2)

With a 49k vocabulary the logits (and their float32 copy and gradient) are the training step's
memory peak. Here the tokens are processed in chunks of rows: for each chunk, a GEMM makes its
logits, one Triton program per row computes that row's log-sum-exp (online, over vocabulary
blocks), its loss and the gradient w.r.t. its logits, and two more GEMMs turn that gradient into
the chunk's rows of dL/dx and its contribution to dL/dW (and dL/db). All of it happens in the
forward pass; the backward only scales the stored gradients by the incoming scalar. Only one
chunk's logits and logit gradients exist at a time. GEMMs are `torch.matmul` (Liger-Kernel's shape).

Semantics are exactly those of `training.model.Transformer`'s loss (`linear_cross_entropy_reference`):
logits in the input dtype, soft-max in float32, mean over the targets that are not ignore_index
(NaN when every target is ignored, as `F.cross_entropy`), plus PaLM's z-loss `z_loss *
sum(lse^2) / max(n_kept, 1)` over the same targets. Like the reference, the logit gradient is
rounded to the input dtype before the GEMMs. The weight gradient is accumulated in float32 over
chunks (each chunk's GEMM in the input dtype), so low-precision results differ from the reference's
single GEMM by a rounding per chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._common import INTERPRETED, can_run, num_warps_for

MAX_VOCAB_BLOCK = 32768  # widest vocabulary slice one program holds at a time on a GPU


def linear_cross_entropy_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Plain PyTorch, identical to the model's `lm_head` + cross-entropy (+ z-loss)."""
    logits = F.linear(x, weight, bias)  # [..., V]
    flat = logits.float().view(-1, logits.shape[-1])  # [N, V]
    t = target.reshape(-1)
    loss = F.cross_entropy(flat, t, ignore_index=ignore_index)
    if z_loss > 0:
        lse = torch.logsumexp(flat, dim=-1)  # [N]
        keep = t != ignore_index
        loss = loss + z_loss * (lse[keep] ** 2).sum() / keep.sum().clamp(min=1)
    return loss


@triton.jit
def _ce_rows_kernel(
    LOGITS, GRAD, TARGET, LOSS, SCALE,
    stride_l, stride_g,
    n_cols, ignore_index, z_coef,
    HAS_Z: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row: LOSS[row] = lse - logit[target] (+ z lse^2); GRAD[row] = dLOSS[row]/dlogits * SCALE."""
    row = tl.program_id(0).to(tl.int64)
    l_row = LOGITS + row * stride_l
    g_row = GRAD + row * stride_g
    t = tl.load(TARGET + row).to(tl.int64)
    cols = tl.arange(0, BLOCK)

    if t == ignore_index:
        if COMPUTE_GRAD:
            for start in range(0, n_cols, BLOCK):
                offs = start + cols
                tl.store(g_row + offs, tl.zeros((BLOCK,), dtype=tl.float32).to(GRAD.dtype.element_ty),
                         mask=offs < n_cols)
        tl.store(LOSS + row, 0.0)
        return

    # Pass 1: online max and sum of exp over the vocabulary blocks.
    m = -float("inf")
    d = 0.0
    for start in range(0, n_cols, BLOCK):
        offs = start + cols
        x = tl.load(l_row + offs, mask=offs < n_cols, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    in_range = (t >= 0) & (t < n_cols)  # out-of-range targets are rejected on the host
    x_t = tl.load(l_row + t, mask=in_range, other=0.0).to(tl.float32)
    loss = lse - x_t
    g_scale = 1.0
    if HAS_Z:
        loss += z_coef * lse * lse
        g_scale = 1.0 + 2.0 * z_coef * lse  # d(z lse^2)/dlogit_j = 2 z lse softmax_j
    tl.store(LOSS + row, loss)

    # Pass 2: (softmax * g_scale - onehot(target)) * SCALE, SCALE = 1 / n_kept for the mean.
    if COMPUTE_GRAD:
        scale = tl.load(SCALE)
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            mask = offs < n_cols
            x = tl.load(l_row + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) * g_scale
            g = tl.where(offs == t, g - 1.0, g)
            tl.store(g_row + offs, (g * scale).to(GRAD.dtype.element_ty), mask=mask)


def default_chunk_rows(n_rows: int, hidden: int, vocab: int) -> int:
    """Rows per chunk so one chunk's logits hold about as many elements as the whole input x."""
    rows = triton.next_power_of_2(max(1, triton.cdiv(n_rows * hidden, vocab)))
    return max(1, min(rows, n_rows))


def _vocab_block(vocab: int) -> int:
    if INTERPRETED:
        return min(triton.next_power_of_2(vocab), 1024)  # the interpreter favours few, wide blocks
    return min(triton.next_power_of_2(vocab), MAX_VOCAB_BLOCK)


def _chunked_loss_and_grads(x2, weight, t, bias, ignore_index, z_loss, need_grads, chunk_rows, vocab_block):
    """Loss (float32 scalar) and, if need_grads = (dx, dW, db) flags, the gradients of loss == 1."""
    n_rows, hidden = x2.shape
    vocab = weight.shape[0]
    dtype, device = x2.dtype, x2.device
    kept = (t != ignore_index).sum()  # a tensor: no host sync
    grad_scale = (1.0 / kept.clamp(min=1).float()).reshape(1)
    want_dx, want_dw, want_db = need_grads
    compute_grad = want_dx or want_dw or want_db

    chunk = chunk_rows or default_chunk_rows(n_rows, hidden, vocab)
    block = vocab_block or _vocab_block(vocab)
    losses = torch.empty(n_rows, dtype=torch.float32, device=device)
    logits_buf = torch.empty((min(chunk, n_rows), vocab), dtype=dtype, device=device)
    grad_buf = torch.empty_like(logits_buf) if compute_grad else logits_buf
    dx = torch.empty_like(x2) if want_dx else None
    # Float32 accumulators over chunks (they start at zero by definition).
    dw = torch.zeros((vocab, hidden), dtype=torch.float32, device=device) if want_dw else None
    db = torch.zeros(vocab, dtype=torch.float32, device=device) if want_db else None
    w_t = weight.t()  # [H, V] view

    for start in range(0, n_rows, chunk):
        end = min(start + chunk, n_rows)
        xc = x2[start:end]  # [c, H]
        logits = logits_buf[: end - start]  # [c, V]
        grads = grad_buf[: end - start]  # [c, V]
        if bias is None:
            torch.matmul(xc, w_t, out=logits)
        else:
            torch.addmm(bias, xc, w_t, out=logits)
        _ce_rows_kernel[(end - start,)](
            logits, grads, t[start:end], losses[start:end], grad_scale,
            logits.stride(0), grads.stride(0),
            vocab, ignore_index, float(z_loss),
            HAS_Z=z_loss > 0, COMPUTE_GRAD=compute_grad,
            BLOCK=block, num_warps=num_warps_for(block),
        )
        if want_dx:
            torch.matmul(grads, weight, out=dx[start:end])  # [c, V] @ [V, H]
        if want_dw:
            if dtype == torch.float32:
                dw.addmm_(grads.t(), xc)  # [V, c] @ [c, H]
            else:
                dw.add_(grads.t() @ xc)  # accumulates in float32 without a float32 copy
        if want_db:
            db += grads.float().sum(0)
    loss = losses.sum() / kept  # NaN when every target is ignored, as F.cross_entropy
    return loss, dx, dw, db


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, target, bias, ignore_index, z_loss, chunk_rows, vocab_block):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        t = target.reshape(-1).contiguous()
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3])
        loss, dx, dw, db = _chunked_loss_and_grads(
            x2, weight, t, bias, ignore_index, z_loss, need, chunk_rows, vocab_block
        )
        ctx.save_for_backward(dx, dw, db)
        ctx.shape, ctx.dtypes = shape, (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dw, db = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        g = grad_loss.float()
        out_dx = (dx * g.to(dx.dtype)).view(ctx.shape) if dx is not None else None
        out_dw = (dw * g).to(w_dtype) if dw is not None else None
        out_db = (db * g).to(b_dtype) if db is not None else None
        return out_dx, out_dw, None, out_db, None, None, None, None


def _check(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None) -> None:
    if weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: x [..., H] and weight [V, H] disagree: x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    if tuple(target.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"linear_cross_entropy: target shape {tuple(target.shape)} must be x's without H: {tuple(x.shape[:-1])}")
    if target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"linear_cross_entropy: target must be int64 or int32 class indices, got {target.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"linear_cross_entropy: bias must be [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    z_loss: float = 0.0,
    *,
    chunk_rows: int | None = None,
    vocab_block: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy (+ z-loss) of `x @ weight.T (+ bias)` against `target`, fused and chunked.

    x [..., H], weight [V, H], target [...] (ignore_index entries do not count), bias [V] or None.
    chunk_rows / vocab_block override the launch sizes (tests use small ones to cover many chunks
    and vocabulary blocks). Falls back to the reference where the kernels cannot run.
    """
    _check(x, weight, target, bias)
    if z_loss < 0:
        raise ValueError(f"linear_cross_entropy: z_loss must be >= 0, got {z_loss}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"linear_cross_entropy: chunk_rows must be >= 1, got {chunk_rows}")
    if vocab_block is not None and (vocab_block < 16 or vocab_block & (vocab_block - 1)):
        raise ValueError(f"linear_cross_entropy: vocab_block must be a power of two >= 16, got {vocab_block}")
    tensors = (x, weight, target) if bias is None else (x, weight, target, bias)
    if not can_run(*tensors):
        return linear_cross_entropy_reference(x, weight, target, bias, ignore_index, z_loss)
    if torch.is_autocast_enabled(x.device.type):  # do what autocast does to F.linear's inputs
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        return linear_cross_entropy_reference(x, weight, target, bias, ignore_index, z_loss)  # F.linear's error
    if x.shape[:-1].numel() == 0:
        return linear_cross_entropy_reference(x, weight, target, bias, ignore_index, z_loss)
    vocab = weight.shape[0]
    valid = ((target >= 0) & (target < vocab)) | (target == ignore_index)
    torch._assert_async(valid.all(), f"linear_cross_entropy: a target is outside [0, {vocab}) and not {ignore_index}")
    with torch.autocast(x.device.type, enabled=False):
        if not torch.is_grad_enabled() or not any(a.requires_grad for a in tensors):
            # Evaluation: the loss alone (the kernel skips its gradient pass).
            x2, t = x.reshape(-1, x.shape[-1]).contiguous(), target.reshape(-1).contiguous()
            loss, *_ = _chunked_loss_and_grads(
                x2, weight, t, bias, ignore_index, z_loss, (False, False, False), chunk_rows, vocab_block
            )
            return loss
        return LinearCrossEntropyFunction.apply(x, weight, target, bias, ignore_index, float(z_loss), chunk_rows, vocab_block)
