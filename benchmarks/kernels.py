"""Triton kernels against PyTorch eager and torch.compile of the same reference, on a GPU.

For each implemented op (RMSNorm, SwiGLU's activation, RoPE on q and k) at training shapes
(8 x 2048 tokens, bf16), times forward and forward+backward with `triton.testing.do_bench`
(median ms), and prints ms, effective GB/s (the bytes each op must read and write once), the
speedup over eager, and the peak-memory ratio of forward+backward. One run measures everything:

    python benchmarks/kernels.py             # needs a CUDA device; says so and exits 0 without one
    python benchmarks/kernels.py --smoke     # CPU, Triton interpreter, tiny shapes: checks it runs

Issue 7 targets: >= 1.5x over eager for RMSNorm and SwiGLU forward+backward.
The smoke mode's timings mean nothing (the interpreter is ~1000x slower than a GPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter at tiny shapes")
    p.add_argument("--tokens", type=int, default=8 * 2048, help="rows (batch x sequence)")
    p.add_argument("--hidden", type=int, default=2048, help="RMSNorm width")
    p.add_argument("--ffn", type=int, default=8192, help="SwiGLU hidden width")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("benchmarks/kernels.py: no CUDA device found; nothing to measure here. "
              "Run it on a GPU machine, or `--smoke` for a CPU interpreter run at tiny shapes.")
        return 0

    import triton
    import triton.testing

    from kernels.rmsnorm import rms_norm, rms_norm_reference
    from kernels.rope import rope, rope_reference
    from kernels.swiglu import swiglu, swiglu_reference
    from training.model import rope_cache

    if args.smoke:
        device, dtype = "cpu", torch.bfloat16
        tokens, hidden, ffn, batch, seq, heads, kv_heads, head_dim = 6, 96, 160, 1, 6, 4, 2, 32
    else:
        device, dtype = "cuda", torch.bfloat16
        tokens, hidden, ffn = args.tokens, args.hidden, args.ffn
        batch, seq = max(1, tokens // 2048), min(tokens, 2048)
        head_dim = 64
        heads, kv_heads = hidden // head_dim, max(1, hidden // head_dim // 4)
    es = torch.finfo(dtype).bits // 8

    def bench(fn) -> float:
        if args.smoke:  # do_bench needs CUDA events
            times = []
            for _ in range(3):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
            return statistics.median(times)
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def peak_mem(fn) -> float:
        if device != "cuda":
            return float("nan")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)

    # Each case: name, make_inputs() -> list of leaf tensors, {impl: fn(*inputs) -> tensor|tuple},
    # bytes of the forward, bytes of the backward.
    cos, sin = rope_cache(seq, head_dim, 10000.0)
    cos, sin = cos.to(device), sin.to(device)
    n_ffn = tokens * ffn
    q_el, k_el = batch * heads * seq * head_dim, batch * kv_heads * seq * head_dim
    cases = [
        (
            f"rmsnorm {tokens}x{hidden}",
            lambda: [torch.randn(tokens, hidden, device=device, dtype=dtype),
                     torch.ones(hidden, device=device, dtype=dtype)],
            {"triton": lambda x, w: rms_norm(x, w, 1e-5), "eager": lambda x, w: rms_norm_reference(x, w, 1e-5)},
            2 * tokens * hidden * es, 3 * tokens * hidden * es,
        ),
        (
            f"swiglu {tokens}x{ffn}",
            lambda: [torch.randn(tokens, ffn, device=device, dtype=dtype) for _ in range(2)],
            {"triton": swiglu, "eager": swiglu_reference},
            3 * n_ffn * es, 5 * n_ffn * es,
        ),
        (
            f"rope q{batch}x{heads}x{seq}x{head_dim} k{kv_heads}h",
            lambda: [torch.randn(batch, seq, heads, head_dim, device=device, dtype=dtype).transpose(1, 2),
                     torch.randn(batch, seq, kv_heads, head_dim, device=device, dtype=dtype).transpose(1, 2)],
            {"triton": lambda q, k: rope(q, k, cos, sin), "eager": lambda q, k: rope_reference(q, k, cos, sin)},
            2 * (q_el + k_el) * es, 2 * (q_el + k_el) * es,
        ),
    ]

    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'CPU (Triton interpreter, smoke)'}; "
          f"dtype {dtype}; triton {triton.__version__}; torch {torch.__version__}")
    header = f"{'op':<34}{'pass':<9}{'impl':<9}{'ms':>9}{'GB/s':>9}{'vs eager':>10}{'peak mem':>10}"
    print(header)
    print("-" * len(header))
    for name, make_inputs, impls, fwd_bytes, bwd_bytes in cases:
        impls = dict(impls)
        if not args.no_compile and not args.smoke:
            try:
                impls["compile"] = torch.compile(impls["eager"])
            except Exception as e:  # noqa: BLE001 - report, keep measuring the rest
                print(f"  torch.compile unavailable for {name}: {e}")
        results: dict[tuple[str, str], tuple[float, float]] = {}
        for impl, fn in impls.items():
            inputs = make_inputs()

            def fwd(fn=fn, inputs=inputs):
                with torch.no_grad():
                    return fn(*inputs)

            leaves = [t.detach().requires_grad_() for t in inputs]

            def fwd_bwd(fn=fn, leaves=leaves):
                out = fn(*leaves)
                outs = out if isinstance(out, tuple) else (out,)
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
                for t in leaves:
                    t.grad = None

            try:
                results[("fwd", impl)] = (bench(fwd), float("nan"))
                results[("fwd+bwd", impl)] = (bench(fwd_bwd), peak_mem(fwd_bwd))
            except Exception as e:  # noqa: BLE001
                print(f"  {name} {impl} failed: {type(e).__name__}: {e}")
        for pass_name, nbytes in (("fwd", fwd_bytes), ("fwd+bwd", fwd_bytes + bwd_bytes)):
            eager_ms, eager_mem = results.get((pass_name, "eager"), (float("nan"), float("nan")))
            for impl in impls:
                if (pass_name, impl) not in results:
                    continue
                ms, mem = results[(pass_name, impl)]
                gbs = nbytes / (ms * 1e-3) / 1e9
                speedup = eager_ms / ms
                mem_ratio = mem / eager_mem if eager_mem == eager_mem and eager_mem > 0 else float("nan")
                mem_s = f"{mem_ratio:>9.2f}x" if mem_ratio == mem_ratio else f"{'-':>10}"
                print(f"{name:<34}{pass_name:<9}{impl:<9}{ms:>9.3f}{gbs:>9.1f}{speedup:>9.2f}x{mem_s}")
    print("vs eager: eager ms / impl ms (higher is faster); peak mem: impl / eager peak allocated during fwd+bwd.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
