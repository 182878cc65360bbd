"""X·Xᵀ computing one triangle: the symmetric product at the heart of Muon's Newton–Schulz step.

    sym_matmul(x, alpha=1, beta=0, add=None) = alpha * x @ x.T + beta * add      x: [M, K] or [B, M, K]

The result is symmetric, so only the tiles on and above the diagonal are computed (T(T+1)/2 of the
T² output tiles, T = ceil(M / BLOCK)); each program mirrors its tile into the lower triangle. That
saves nearly half the FLOPs of a plain GEMM. Newton–Schulz has two such products per step: the Gram
matrix A = X Xᵀ, and A·A = A Aᵀ (A is symmetric), whose polynomial b·A + c·A·A is the fused
alpha/beta/add epilogue here (`training.muon.newton_schulz`).

Accumulation is float32; the output has x's dtype. float32 inputs use IEEE products unless PyTorch
itself allows TF32 matmuls (`torch.backends.cuda.matmul.allow_tf32`), so the kernel matches the
reference `x @ x.T` in precision. The backward (used only by tests and anyone differentiating
through it; the optimizer runs under no_grad) is plain PyTorch: d(x xᵀ) = (G + Gᵀ) x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import INTERPRETED, can_run


def sym_matmul_reference(
    x: torch.Tensor, alpha: float = 1.0, beta: float = 0.0, add: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain PyTorch: alpha * x @ x.T + beta * add (x @ x.T with the defaults)."""
    out = x @ x.transpose(-1, -2)
    if alpha != 1.0:
        out = alpha * out
    if add is not None and beta != 0.0:
        out = out + beta * add
    return out


@triton.jit
def _sym_matmul_kernel(
    X, ADD, OUT,
    sx_b, sx_m, sx_k,
    sa_b, sa_m, sa_n,
    so_b, so_m, so_n,
    M, K, alpha, beta,
    HAS_ADD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Program `pid` owns tile (tm, tn) of the upper triangle, tm <= tn. Tiles are numbered row-major
    # through the lower triangle (r, c), c <= r: pid = r(r+1)/2 + c, then (tm, tn) = (c, r).
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    r = ((tl.sqrt(8.0 * pid.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    # float sqrt can land one off near perfect squares: correct it exactly in integers.
    r = tl.where(r * (r + 1) // 2 > pid, r - 1, r)
    r = tl.where((r + 1) * (r + 2) // 2 <= pid, r + 1, r)
    c = pid - r * (r + 1) // 2
    tm, tn = c, r

    rm = tm * BLOCK + tl.arange(0, BLOCK)
    rn = tn * BLOCK + tl.arange(0, BLOCK)
    rk = tl.arange(0, BLOCK_K)
    x_base = X + batch * sx_b
    a_ptr = x_base + rm[:, None].to(tl.int64) * sx_m + rk[None, :] * sx_k  # [BLOCK, BLOCK_K] rows tm
    b_ptr = x_base + rn[None, :].to(tl.int64) * sx_m + rk[:, None] * sx_k  # [BLOCK_K, BLOCK] rows tn, transposed
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        a = tl.load(a_ptr, mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr, mask=k_ok[:, None] & (rn[None, :] < M), other=0.0)
        if UPCAST:  # the interpreter multiplies 16-bit floats' raw bits: products in float32 are exact
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptr += BLOCK_K * sx_k
        b_ptr += BLOCK_K * sx_k
    acc = acc * alpha

    # Upper part: the tile itself, elements with row <= col (all of it off the diagonal).
    in_bounds = (rm[:, None] < M) & (rn[None, :] < M)
    upper = in_bounds & (rm[:, None] <= rn[None, :])
    tile = acc
    if HAS_ADD:
        extra = tl.load(ADD + batch * sa_b + rm[:, None] * sa_m + rn[None, :] * sa_n, mask=upper, other=0.0)
        tile = tile + beta * extra.to(tl.float32)
    o_base = OUT + batch * so_b
    tl.store(o_base + rm[:, None] * so_m + rn[None, :] * so_n, tile.to(OUT.dtype.element_ty), mask=upper)

    # Lower part: the mirror, elements with row > col. On a diagonal tile this writes the strict
    # lower half from the same values as the upper half, so the result is exactly symmetric.
    acc_t = tl.trans(acc)  # [rn, rm]
    lower = (rn[:, None] < M) & (rm[None, :] < M) & (rn[:, None] > rm[None, :])
    tile_t = acc_t
    if HAS_ADD:
        extra_t = tl.load(ADD + batch * sa_b + rn[:, None] * sa_m + rm[None, :] * sa_n, mask=lower, other=0.0)
        tile_t = tile_t + beta * extra_t.to(tl.float32)
    tl.store(o_base + rn[:, None] * so_m + rm[None, :] * so_n, tile_t.to(OUT.dtype.element_ty), mask=lower)


def _input_precision(dtype: torch.dtype) -> str:
    if INTERPRETED or (dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"  # TF32 for float32 where PyTorch allows it; Triton ignores it for 16-bit inputs


def _triangle_programs(m: int, block: int) -> int:
    tiles = triton.cdiv(m, block)
    return tiles * (tiles + 1) // 2


# GPU launch sizes, autotuned per (M, K): wide tiles feed the tensor cores, narrow ones give a
# small Gram matrix (few tiles, e.g. M = 576) enough programs to fill the SMs.
GPU_CONFIGS = [
    triton.Config({"BLOCK": block, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages)
    for block, block_k, warps, stages in [
        (128, 64, 8, 3), (128, 32, 4, 4), (64, 64, 4, 4), (64, 128, 4, 3), (32, 128, 4, 4), (32, 64, 2, 5),
    ]
]


def autotuned(configs: list) -> triton.runtime.Autotuner:
    """The kernel autotuned over `configs` (the GPU launcher's; tests pass a single config)."""
    return triton.autotune(configs=configs, key=["M", "K", "HAS_ADD", "INPUT_PRECISION"])(_sym_matmul_kernel)


_tuned_kernel = autotuned(GPU_CONFIGS)


def _launch(
    x: torch.Tensor, alpha: float, beta: float, add: torch.Tensor | None, block: int | None, kernel=None
) -> torch.Tensor:
    """block: fixed tile width; None = autotuned `kernel` (default GPU_CONFIGS) on a GPU, or a
    size the interpreter runs quickly."""
    batched = x.ndim == 3
    x3 = x if batched else x.unsqueeze(0)
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()  # a transposed view would make every load strided; the copy is O(MK)
    nb, m, k = x3.shape
    out = torch.empty((nb, m, m), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out if batched else out.squeeze(0)
    add3 = None if add is None else (add if batched else add.unsqueeze(0))
    args = (
        x3, out if add3 is None else add3, out,
        *x3.stride(), *((0, 0, 0) if add3 is None else add3.stride()), *out.stride(),
        m, k, float(alpha), float(beta),
    )
    flags = dict(
        HAS_ADD=add is not None and beta != 0.0,
        INPUT_PRECISION=_input_precision(x.dtype),
        UPCAST=INTERPRETED and x.dtype != torch.float32,
    )
    if block is None and (kernel is not None or not INTERPRETED):
        kernel = kernel or _tuned_kernel
        kernel[lambda meta: (_triangle_programs(m, meta["BLOCK"]), nb)](*args, **flags)
    else:
        # Interpreter: few, large programs run fastest. A fixed block: tests cover many tiles.
        block = block or max(16, min(64, triton.next_power_of_2(m)))
        block_k = max(16, min(64, triton.next_power_of_2(k))) if INTERPRETED else 64
        _sym_matmul_kernel[(_triangle_programs(m, block), nb)](
            *args, **flags, BLOCK=block, BLOCK_K=block_k, num_warps=8 if block >= 128 else 4, num_stages=3
        )
    return out if batched else out.squeeze(0)


def _check(x: torch.Tensor, add: torch.Tensor | None) -> None:
    if x.ndim not in (2, 3):
        raise ValueError(f"sym_matmul: x must be [M, K] or [B, M, K], got shape {tuple(x.shape)}")
    expected = (*x.shape[:-1], x.shape[-2])
    if add is not None and (tuple(add.shape) != expected or add.dtype != x.dtype):
        raise ValueError(
            f"sym_matmul: add must be {expected} of dtype {x.dtype} (x @ x.T's shape), "
            f"got {tuple(add.shape)} {add.dtype}"
        )


class SymMatmulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha, beta, add, block):
        ctx.save_for_backward(x)
        ctx.alpha, ctx.beta = alpha, beta
        return _launch(x, alpha, beta, add, block)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        dx = dadd = None
        if ctx.needs_input_grad[0]:
            dx = ctx.alpha * ((grad + grad.transpose(-1, -2)) @ x)
        if ctx.needs_input_grad[3]:
            dadd = ctx.beta * grad
        return dx, None, None, dadd, None


def sym_matmul(
    x: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 0.0,
    add: torch.Tensor | None = None,
    *,
    block: int | None = None,
) -> torch.Tensor:
    """alpha * x @ x.T + beta * add through the one-triangle kernel (reference where it cannot run).

    block: output tile width (a power of two >= 16); None picks one for the device. Tests pass a
    small one to cover many tiles.
    """
    _check(x, add)
    if not can_run(x, *(() if add is None else (add,))) or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return sym_matmul_reference(x, alpha, beta, add)
    if block is not None and (block < 16 or block & (block - 1)):
        raise ValueError(f"sym_matmul: block must be a power of two >= 16, got {block}")
    return SymMatmulFunction.apply(x, alpha, beta, add, block)
