"""Training-step throughput: Foundry's model against a minimal reference loop, side by side.

Every column times the same step — forward, cross-entropy loss, backward, AdamW step — on the
same shapes and batch, in one process:

    reference   a minimal plain-PyTorch Llama-style model written for this benchmark
                (F.scaled_dot_product_attention, F.rms_norm, SwiGLU, RoPE, tied embeddings)
    eager       training.model.Transformer as `training.train` runs it
    compile     the same under torch.compile
    kernels     the same with ModelConfig.kernels="triton" (GPU only)

and prints the median step time, tokens/s and the ratio to the reference (> 1 = faster), plus
MFU on a GPU. Issue 6's target: eager >= 1.0x the reference on the CPU.

    python benchmarks/train_step.py                  # ~135M SmolLM-shaped model on a GPU, a small one on CPU
    python benchmarks/train_step.py --preset small   # any device
    python benchmarks/train_step.py --smoke          # tiny shapes, a few steps: checks that it runs (< 1 min)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# name -> (ModelConfig fields, batch, seq)
PRESETS = {
    "smollm-135m": (dict(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_hidden=1536,
                         max_seq_len=2048), 8, 2048),
    "small": (dict(vocab_size=8192, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=768,
                   max_seq_len=256), 8, 256),
    "tiny": (dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                  max_seq_len=64), 4, 64),
}
# Peak dense bf16 FLOP/s for MFU, by GPU name fragment (vendor datasheets, no sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), help="default: smollm-135m on a GPU, small on CPU")
    p.add_argument("--steps", type=int, default=20, help="timed steps per column (after warmup)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="autocast dtype; default bf16 on GPU, fp32 on CPU")
    p.add_argument("--columns", default=None,
                   help="comma-separated subset of reference,eager,compile,kernels (default: all that apply; "
                        "--smoke: reference,eager)")
    p.add_argument("--smoke", action="store_true", help="tiny preset, a few steps: checks that it runs (< 1 min)")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args()


def build_reference(cfg, torch, nn, F):
    """A deliberately plain Llama-style decoder with the same shapes and parameter count."""
    head_dim = cfg.d_model // cfg.n_heads

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            C, kv = cfg.d_model, cfg.n_kv_heads * head_dim
            self.n1, self.n2 = nn.Parameter(torch.ones(C)), nn.Parameter(torch.ones(C))
            self.q, self.k, self.v = nn.Linear(C, C, bias=False), nn.Linear(C, kv, bias=False), nn.Linear(C, kv, bias=False)
            self.o = nn.Linear(C, C, bias=False)
            self.gate, self.up = nn.Linear(C, cfg.ffn_hidden, bias=False), nn.Linear(C, cfg.ffn_hidden, bias=False)
            self.down = nn.Linear(cfg.ffn_hidden, C, bias=False)

        def forward(self, x, cos, sin):
            B, T, C = x.shape
            h = F.rms_norm(x, (C,), self.n1, cfg.norm_eps)
            q = self.q(h).view(B, T, cfg.n_heads, head_dim).transpose(1, 2)  # [B, H, T, D]
            k = self.k(h).view(B, T, cfg.n_kv_heads, head_dim).transpose(1, 2)  # [B, Hkv, T, D]
            v = self.v(h).view(B, T, cfg.n_kv_heads, head_dim).transpose(1, 2)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # [B, H, T, D]
            x = x + self.o(a.transpose(1, 2).reshape(B, T, C))
            h = F.rms_norm(x, (C,), self.n2, cfg.norm_eps)
            return x + self.down(F.silu(self.gate(h)) * self.up(h))

    def rotate(x, cos, sin):  # rotate-half RoPE
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    class Reference(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.blocks = nn.ModuleList(Block() for _ in range(cfg.n_layers))
            self.norm = nn.Parameter(torch.ones(cfg.d_model))
            inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
            freqs = torch.outer(torch.arange(cfg.max_seq_len).float(), inv)  # [T, D/2]
            emb = torch.cat((freqs, freqs), dim=-1)
            self.register_buffer("cos", emb.cos(), persistent=False)
            self.register_buffer("sin", emb.sin(), persistent=False)
            for p in self.parameters():
                if p.ndim == 2:
                    nn.init.normal_(p, std=0.02)

        def forward(self, idx, targets):
            T = idx.shape[1]
            x = self.embed(idx)
            for block in self.blocks:
                x = block(x, self.cos[:T], self.sin[:T])
            logits = F.linear(F.rms_norm(x, (cfg.d_model,), self.norm, cfg.norm_eps), self.embed.weight)
            return None, F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    return Reference()


class Runner:
    """One column's model and optimizer; `run(n)` times n training steps (seconds each)."""

    def __init__(self, model, batches, device: str, dtype, torch):
        self.model, self.batches, self.device, self.torch = model, batches, device, torch
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
        self.autocast = lambda: torch.autocast(device_type=device.split(":")[0], dtype=dtype,
                                               enabled=dtype != torch.float32)
        self.i = 0

    def run(self, n: int) -> list[float]:
        torch, cuda = self.torch, self.device.startswith("cuda")
        times = []
        for _ in range(n):
            x, y = self.batches[self.i % len(self.batches)]
            self.i += 1
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with self.autocast():
                _, loss = self.model(x, y)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            else:
                loss.item()
            times.append(time.perf_counter() - t0)
        return times


def main() -> int:
    args = parse_args()
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from training.model import ModelConfig, Transformer, estimate_mfu

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    preset = "tiny" if args.smoke else args.preset or ("smollm-135m" if cuda else "small")
    fields, batch, seq = PRESETS[preset]
    steps, warmup = (5, 2) if args.smoke else (args.steps, args.warmup)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if cuda else "fp32")]
    if args.threads or args.smoke:
        torch.set_num_threads(args.threads or 1)  # smoke: one thread is steadier on a shared machine
    cfg = ModelConfig(**fields)
    torch.manual_seed(0)
    batches = [(torch.randint(0, cfg.vocab_size, (batch, seq), device=device),
                torch.randint(0, cfg.vocab_size, (batch, seq), device=device)) for _ in range(4)]

    def foundry(kernels: str = "reference"):
        torch.manual_seed(0)
        return Transformer(ModelConfig(**fields, kernels=kernels)).to(device).train()

    makers = {"reference": lambda: build_reference(cfg, torch, nn, F).to(device).train(), "eager": foundry,
              "compile": lambda: torch.compile(foundry()), "kernels": lambda: foundry("triton")}
    # Smoke: no compile (inductor takes minutes on a small CPU) and no kernels (Triton needs a GPU;
    # its CPU interpreter takes ~40 s per step even at the tiny preset).
    default = ["reference", "eager"] if args.smoke else ["reference", "eager", "compile"] + (["kernels"] if cuda else [])
    wanted = args.columns.split(",") if args.columns else default
    unknown = sorted(set(wanted) - set(makers))
    if unknown or "reference" not in wanted:
        raise SystemExit(f"--columns: unknown {unknown}; choose from {list(makers)}, reference included")
    columns = {name: makers[name] for name in makers if name in wanted}
    kernels_note = "" if "kernels" in columns or args.smoke else "kernels: skipped (Triton kernels need a GPU)"

    probe = foundry()
    ref_params = sum(p.numel() for p in build_reference(cfg, torch, nn, F).parameters())
    assert ref_params == probe.num_params(), (ref_params, probe.num_params())  # same model size, or no comparison
    flops_per_token = probe.flops_per_token(seq)
    gpu = torch.cuda.get_device_name() if cuda else None
    peak = next((v for k, v in PEAK_FLOPS.items() if gpu and k in gpu), None)
    tokens = batch * seq
    print(f"train step: {preset} ({probe.num_params() / 1e6:.1f}M params), batch {batch} x {seq} = {tokens:,} tokens, "
          f"{str(dtype).removeprefix('torch.')}, {gpu or f'CPU x {torch.get_num_threads()} threads'}; "
          f"median of {steps} steps after {warmup} warmup, columns interleaved")
    del probe

    runners = {}
    for name, make in columns.items():
        model = make()
        if name == "kernels" and not getattr(model, "uses_triton_kernels", False):
            print("  kernels: not available here (the model fell back to the reference ops)")
            continue
        t0 = time.perf_counter()
        runners[name] = Runner(model, batches, device, dtype, torch)
        runners[name].run(warmup)  # compile happens here
        print(f"  {name}: ready ({time.perf_counter() - t0:.1f}s incl. {warmup} warmup steps)")
    # Columns take turns, a few steps each, so load from other processes hits them alike.
    times: dict[str, list[float]] = {name: [] for name in runners}
    chunk = max(1, min(5, steps // 4))
    while len(times["reference"]) < steps:
        for name, runner in runners.items():
            times[name] += runner.run(min(chunk, steps - len(times[name])))
    results = {}
    for name, ts in times.items():
        step_s = statistics.median(ts)
        results[name] = {"step_ms": step_s * 1e3, "tokens_per_s": tokens / step_s,
                         "mfu": estimate_mfu(flops_per_token, tokens / step_s, peak) if peak else None}

    base = results["reference"]["tokens_per_s"]
    print(f"  {'column':<10} {'step ms':>10} {'tokens/s':>12} {'x reference':>12}" + ("  MFU" if peak else ""))
    for name, r in results.items():
        mfu = f"  {r['mfu']:.1%}" if r["mfu"] is not None else ""
        print(f"  {name:<10} {r['step_ms']:>10.2f} {r['tokens_per_s']:>12,.0f} {r['tokens_per_s'] / base:>11.2f}x{mfu}")
    if kernels_note:
        print(f"  {kernels_note}")
    if args.json:
        args.json.write_text(json.dumps({"preset": preset, "device": gpu or "cpu", "dtype": str(dtype),
                                         "tokens_per_step": tokens, "results": results}, indent=2))
    return 0 if all(math.isfinite(r["step_ms"]) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
