"""Triton kernels against PyTorch eager and torch.compile of the same reference, on a GPU.

One run measures every kernel at training shapes (8 x 2048 tokens, each --hidden width, vocab
49152, bf16): RMSNorm, SwiGLU's activation, RoPE on q and k, fused linear + cross-entropy (forward
and forward+backward), and Muon's symmetric product X·Xᵀ plus the whole Newton–Schulz iteration
(forward only: the optimizer runs under no_grad). Times are `triton.testing.do_bench` medians. The
table gives ms, throughput (GB/s for the memory-bound ops: the bytes each must read and write once;
TFLOP/s for the matmul ones), speedup over eager and over torch.compile, the peak-memory ratio
against eager (peak allocated during the timed pass, above what its inputs hold), and the max error
against eager relative to eager's largest value (outputs and, for fwd+bwd, input gradients), which
checks the compiled GPU code paths the CPU tests cannot reach.

    python benchmarks/kernels.py                   # needs a CUDA device; says so and exits 0 without one
    python benchmarks/kernels.py --hidden 576      # one width; --no-compile skips torch.compile
    python benchmarks/kernels.py --smoke           # CPU, Triton interpreter, tiny shapes: checks it runs

Issue 7 targets (checked at the end): >= 1.5x over eager for RMSNorm and SwiGLU forward+backward;
fused linear + cross-entropy peak memory <= 0.5x of the unfused path at vocab 49152.
The smoke mode's timings mean nothing (the interpreter is ~1000x slower than a GPU) and it skips
torch.compile (CPU inductor needs a C++ toolchain and minutes).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter at tiny shapes")
    p.add_argument("--tokens", type=int, default=8 * 2048, help="rows (batch x sequence), a multiple of --seq")
    p.add_argument("--seq", type=int, default=2048, help="sequence length (RoPE)")
    p.add_argument("--hidden", type=int, nargs="+", default=[576, 2048], help="model widths to measure")
    p.add_argument("--ffn-mult", type=float, default=4.0, help="SwiGLU width = mult x hidden (and Muon's matrix)")
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    return p.parse_args()


@dataclass
class Case:
    name: str
    make_inputs: Callable[[], list]  # fresh leaf tensors, the ones gradients are taken for
    impls: dict[str, Callable]  # "eager" (the reference) and "triton"; "compile" is added
    fwd_work: float  # bytes or FLOPs of one forward
    bwd_work: float  # ... of the backward alone; 0 = no backward pass is measured
    unit: str  # "GB/s" or "TFLOP/s"
    results: dict = field(default_factory=dict)  # (pass, impl) -> (ms, peak bytes, rel err)


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

    from kernels.fused_linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
    from kernels.rmsnorm import rms_norm, rms_norm_reference
    from kernels.rope import rope, rope_reference
    from kernels.swiglu import swiglu, swiglu_reference
    from kernels.sym_matmul import sym_matmul, sym_matmul_reference
    from training.model import rope_cache
    from training.muon import newton_schulz

    device = "cpu" if args.smoke else "cuda"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    es = torch.finfo(dtype).bits // 8
    use_compile = not (args.no_compile or args.smoke)
    if use_compile:  # each case compiles its own closures; keep dynamo from giving up on them
        import torch._dynamo

        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 256)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype)

    def cases_for(hidden: int) -> list[Case]:
        if args.smoke:
            tokens, seq, ffn, vocab, head_dim = 6, 6, 160, 300, 32
        else:
            tokens, seq, vocab, head_dim = args.tokens, args.seq, args.vocab, 64
            ffn = int(args.ffn_mult * hidden) // 64 * 64
        if tokens % seq:
            raise SystemExit(f"--tokens ({tokens}) must be a multiple of --seq ({seq})")
        batch = tokens // seq
        heads = max(1, hidden // head_dim)
        kv_heads = max(1, heads // 3)
        cos, sin = rope_cache(seq, head_dim, 10000.0)
        cos, sin = cos.to(device), sin.to(device)
        target = torch.randint(0, vocab, (tokens,), device=device)
        n_ffn, q_el, k_el = tokens * ffn, batch * heads * seq * head_dim, batch * kv_heads * seq * head_dim
        m, n = hidden, ffn  # Muon's matrix: the MLP's [ffn, hidden] weight in its wide orientation
        ns_flops = 5 * (4 * m * m * n + 2 * m**3)  # per step: X Xᵀ, A·A, poly·X
        return [
            Case(
                f"rmsnorm {tokens}x{hidden}",
                lambda: [randn(tokens, hidden), torch.rand(hidden, device=device, dtype=dtype) + 0.5],
                {"eager": lambda x, w: rms_norm_reference(x, w, 1e-5), "triton": lambda x, w: rms_norm(x, w, 1e-5)},
                2 * tokens * hidden * es, 3 * tokens * hidden * es, "GB/s",
            ),
            Case(
                f"swiglu {tokens}x{ffn}",
                lambda: [randn(tokens, ffn), randn(tokens, ffn)],
                {"eager": swiglu_reference, "triton": swiglu},
                3 * n_ffn * es, 5 * n_ffn * es, "GB/s",
            ),
            Case(
                f"rope q{batch}x{heads}x{seq}x{head_dim} k{kv_heads}h",
                lambda: [randn(batch, seq, heads, head_dim).transpose(1, 2),
                         randn(batch, seq, kv_heads, head_dim).transpose(1, 2)],
                {"eager": lambda q, k: rope_reference(q, k, cos, sin), "triton": lambda q, k: rope(q, k, cos, sin)},
                2 * (q_el + k_el) * es, 2 * (q_el + k_el) * es, "GB/s",
            ),
            Case(
                f"linear+CE {tokens}x{hidden} V{vocab}",
                lambda: [randn(tokens, hidden), randn(vocab, hidden, scale=hidden**-0.5)],
                {"eager": lambda x, w: linear_cross_entropy_reference(x, w, target),
                 "triton": lambda x, w: linear_cross_entropy(x, w, target)},
                2 * tokens * hidden * vocab, 4 * tokens * hidden * vocab, "TFLOP/s",
            ),
            Case(
                f"X·Xᵀ {m}x{n}",
                lambda: [randn(m, n)],
                {"eager": sym_matmul_reference, "triton": sym_matmul},
                2 * m * m * n, 0, "TFLOP/s",
            ),
            Case(
                f"newton-schulz x5 {m}x{n}",
                lambda: [randn(m, n)],
                {"eager": lambda g: newton_schulz(g, dtype=dtype),
                 "triton": lambda g: newton_schulz(g, dtype=dtype, sym_matmul=sym_matmul)},
                ns_flops, 0, "TFLOP/s",
            ),
        ]

    def bench(fn) -> float:
        if args.smoke:  # do_bench needs CUDA events; one call shows the path runs (its time means nothing)
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def peak_bytes(fn) -> float:
        if device != "cuda":
            return math.nan
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)

    def outputs_and_grads(fn, inputs, with_grad: bool, seed: int) -> list:
        """What an implementation computes: outputs and, with_grad, input gradients for fixed upstream grads."""
        leaves = [t.detach().clone().requires_grad_(with_grad) for t in inputs]
        with torch.set_grad_enabled(with_grad):
            out = fn(*leaves)
        outs = list(out) if isinstance(out, tuple) else [out]
        if not with_grad:
            return [o.detach() for o in outs]
        gen = torch.Generator(device=device).manual_seed(seed)
        ups = [torch.randn(o.shape, generator=gen, device=device, dtype=torch.float32).to(o.dtype) for o in outs]
        return [o.detach() for o in outs] + list(torch.autograd.grad(outs, leaves, ups))

    def rel_err(got: list, want: list) -> float:
        worst = 0.0
        for g, w in zip(got, want, strict=True):
            scale = w.float().abs().max().item() or 1.0
            worst = max(worst, (g.float() - w.float()).abs().max().item() / scale)
        return worst

    def measure(case: Case) -> None:
        impls = dict(case.impls)
        if use_compile:
            impls["compile"] = torch.compile(case.impls["eager"])
        passes = [("fwd", False)] + ([("fwd+bwd", True)] if case.bwd_work else [])
        torch.manual_seed(0)
        inputs = case.make_inputs()
        for pass_name, with_grad in passes:
            want = None
            for impl in ("eager", *[i for i in impls if i != "eager"]):
                fn = impls[impl]
                leaves = [t.detach().requires_grad_(with_grad) for t in inputs]

                def run(fn=fn, leaves=leaves, with_grad=with_grad):
                    if not with_grad:
                        with torch.no_grad():
                            return fn(*leaves)
                    out = fn(*leaves)
                    outs = out if isinstance(out, tuple) else (out,)
                    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
                    for t in leaves:
                        t.grad = None

                try:
                    got = outputs_and_grads(fn, inputs, with_grad, seed=1)  # also warms up / compiles
                    want = got if impl == "eager" else want
                    err = rel_err(got, want) if impl != "eager" else 0.0
                    del got
                    ms = bench(run)
                    case.results[(pass_name, impl)] = (ms, peak_bytes(run), err)
                except Exception as e:  # noqa: BLE001 - report it, keep measuring the rest
                    print(f"  {case.name} {pass_name} {impl} failed: {type(e).__name__}: {str(e)[:300]}")
        del inputs
        if device == "cuda":
            torch.cuda.empty_cache()

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter, smoke: timings meaningless)"
    print(f"device: {name}; dtype {dtype}; triton {triton.__version__}; torch {torch.__version__}; "
          f"tokens {args.tokens if not args.smoke else 6}; torch.compile {'on' if use_compile else 'off'}")
    header = (f"{'op':<36}{'pass':<9}{'impl':<9}{'ms':>10}{'throughput':>16}{'vs eager':>10}"
              f"{'vs compile':>11}{'peak mem':>10}{'rel err':>10}")
    print(header)
    print("-" * len(header))
    all_cases = []
    started = time.perf_counter()
    for hidden in (args.hidden if not args.smoke else [96]):
        for case in cases_for(hidden):
            measure(case)
            all_cases.append(case)
            print_rows(case)  # as each case finishes: a run cut short still reports what it measured
    print(f"measured in {time.perf_counter() - started:.0f} s (torch.compile's compilations included)")
    print("vs eager / vs compile: their ms / this ms (higher is faster); peak mem: this / eager peak allocated "
          "during the pass; rel err: max |this - eager| / max |eager| over outputs (and input grads for fwd+bwd).")
    if not args.smoke:
        print_targets(all_cases)
    return 0


def _fmt_ratio(x: float, width: int) -> str:
    return f"{x:>{width - 1}.2f}x" if x == x else f"{'-':>{width}}"


def print_rows(case: Case) -> None:
    for pass_name in ("fwd", "fwd+bwd"):
        eager = case.results.get((pass_name, "eager"), (math.nan, math.nan, 0.0))
        comp = case.results.get((pass_name, "compile"), (math.nan, math.nan, 0.0))
        work = case.fwd_work + (case.bwd_work if pass_name == "fwd+bwd" else 0)
        scale = 1e9 if case.unit == "GB/s" else 1e12
        for impl in ("eager", "compile", "triton"):
            if (pass_name, impl) not in case.results:
                continue
            ms, mem, err = case.results[(pass_name, impl)]
            thr = f"{work / (ms * 1e-3) / scale:>9.1f} {case.unit:<7}" if ms > 0 else f"{'-':>16}"
            mem_ratio = mem / eager[1] if eager[1] == eager[1] and eager[1] > 0 else math.nan
            print(f"{case.name:<36}{pass_name:<9}{impl:<9}{ms:>10.3f}{thr:>16}{_fmt_ratio(eager[0] / ms, 10)}"
                  f"{_fmt_ratio(comp[0] / ms, 11)}{_fmt_ratio(mem_ratio, 10)}{err:>10.1e}", flush=True)


def print_targets(cases: list[Case]) -> None:
    print("issue 7 targets:")
    for case in cases:
        op = case.name.split()[0]
        tri, eager = case.results.get(("fwd+bwd", "triton")), case.results.get(("fwd+bwd", "eager"))
        if tri is None or eager is None:
            continue
        if op in ("rmsnorm", "swiglu"):
            speedup = eager[0] / tri[0]
            print(f"  {case.name}: fwd+bwd {speedup:.2f}x over eager (target >= 1.5x): {'met' if speedup >= 1.5 else 'MISSED'}")
        elif op == "linear+CE":
            ratio = tri[1] / eager[1] if eager[1] > 0 else math.nan
            print(f"  {case.name}: fwd+bwd peak memory {ratio:.2f}x of eager (target <= 0.5x): "
                  f"{'met' if ratio <= 0.5 else 'MISSED'}")


if __name__ == "__main__":
    sys.exit(main())
