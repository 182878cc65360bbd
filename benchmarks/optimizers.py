"""AdamW vs Muon (and Muon with QK-clip) at equal tokens, each over a small learning-rate sweep.

Every run is `training.train` itself (same model, data order, schedule and step count; only the
optimizer differs). Prints, per optimizer and lr, the final loss (mean of the last 10% of steps),
the median step time, and the tokens the best run of each optimizer needed to reach the best
AdamW run's final loss (smoothed), with the ratio (> 1 = fewer tokens than AdamW; the literature
reports ~1.1-1.4x for Muon at small scale).

Data: --mixture DIR (a mixture output, e.g. <store>/mixture/<key>), else the newest mixture in the
store ($FOUNDRY_STORE, else .store: build one with `foundry demo`), else a synthetic corpus (said so).

    python benchmarks/optimizers.py                          # small model, 300 steps, lr x {0.5, 1, 2}
    python benchmarks/optimizers.py --steps 1000 --lrs 0.25,0.5,1,2,4
    python benchmarks/optimizers.py --smoke                  # tiny model, 20 steps, one lr: checks it runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {
    "small": dict(d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=768),
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128),
}
# name -> optimizer config without lr; base lr (the sweep multiplies it)
OPTIMIZERS = {
    "adamw": ({"name": "adamw", "weight_decay": 0.1}, 3e-3),
    "muon": ({"name": "muon", "weight_decay": 0.1}, 3e-3),  # updates scaled to AdamW's RMS: same lr range
    "muon+qk_clip": ({"name": "muon", "weight_decay": 0.1, "qk_clip_tau": 100.0}, 3e-3),
}
SMOOTH = 10  # steps in the moving average used to find where a curve reaches a loss


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mixture", type=Path, help="mixture directory (index.npy + sources.json)")
    p.add_argument("--model", choices=sorted(MODELS), default="small")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lrs", default="0.5,1,2", help="multipliers of each optimizer's base lr")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=f"subset of {list(OPTIMIZERS)}")
    p.add_argument("--qk-clip-tau", type=float, default=100.0,
                   help="muon+qk_clip's threshold (Kimi K2: 100; a small model may never reach it: see max logit)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="tiny model, 20 steps, one lr: checks that it runs")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args()


def newest_store_mixture() -> Path | None:
    store = Path(os.environ.get("FOUNDRY_STORE") or ROOT / ".store")
    found = [p for p in (store / "mixture").glob("*") if (p / "_manifest.json").is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def synthetic_mixture(root: Path, vocab: int = 256, docs: int = 400, seed: int = 0) -> Path:
    """Documents from a sparse random bigram process (each token has 4 likely successors), so
    there is structure to learn; EOS = 0 ends every document."""
    rng = np.random.default_rng(seed)
    successors = rng.integers(1, vocab, size=(vocab, 4))
    out = []
    for _ in range(docs):
        t = int(rng.integers(1, vocab))
        doc = [t]
        for _ in range(int(rng.integers(64, 512))):
            t = int(successors[t, rng.integers(0, 4)]) if rng.random() < 0.9 else int(rng.integers(1, vocab))
            doc.append(t)
        out.append(doc + [0])
    tok = root / "tokenized"
    tok.mkdir(parents=True)
    np.save(tok / "tokens.npy", np.array([t for d in out for t in d], dtype=np.uint16))
    np.save(tok / "offsets.npy", np.concatenate([[0], np.cumsum([len(d) for d in out])]).astype(np.int64))
    mix = root / "mixture"
    mix.mkdir()
    np.save(mix / "index.npy", np.array([(0, i) for i in rng.permutation(docs)], dtype=np.int64))
    (mix / "sources.json").write_text(json.dumps([{"id": 0, "name": "synthetic", "tokenized": str(tok)}]))
    return mix


def vocab_of(mixture: Path) -> int:
    """Model vocabulary big enough for every token id in the mixture (rounded up to 64)."""
    top = 0
    for entry in json.loads((mixture / "sources.json").read_text()):
        tok_dir = mixture / entry["tokenized"]  # relative entries are anchored at the mixture, as training.data does
        tokens = np.load(tok_dir / "tokens.npy", mmap_mode="r")
        top = max(top, int(tokens.max()) if len(tokens) else 0)
    return (top + 1 + 63) // 64 * 64


def smoothed_first_reach(losses: list[float], target: float) -> int | None:
    """First step (1-based) at which the moving average of the last SMOOTH steps is <= target."""
    for i in range(1, len(losses) + 1):
        window = losses[max(0, i - SMOOTH):i]
        if i >= min(SMOOTH, len(losses)) and sum(window) / len(window) <= target:
            return i
    return None


def main() -> int:
    args = parse_args()
    import pyarrow.parquet as pq
    import torch

    from training.config import parse_run_config
    from training.reporting import QuietReporter
    from training.train import train

    model_name, steps, mults = args.model, args.steps, [float(x) for x in args.lrs.split(",")]
    batch, seq = args.batch_size, args.seq_len
    if args.smoke:
        model_name, steps, mults, batch, seq = "tiny", 20, [1.0], 4, 64
    names = args.optimizers.split(",")
    if unknown := sorted(set(names) - set(OPTIMIZERS)):
        raise SystemExit(f"--optimizers: unknown {unknown}; choose from {list(OPTIMIZERS)}")
    threads = args.threads or (1 if args.smoke else torch.get_num_threads())

    with tempfile.TemporaryDirectory(prefix="foundry-optim-bench-") as tmp:
        mixture = args.mixture or (None if args.smoke else newest_store_mixture())
        data_note = str(mixture)
        if mixture is None:
            mixture, data_note = synthetic_mixture(Path(tmp) / "data"), "synthetic bigram corpus (no mixture found)"
        vocab = vocab_of(mixture)
        print(f"optimizers: {model_name} model, vocab {vocab}, {steps} steps x {batch} x {seq} tokens, "
              f"{threads} threads; data: {data_note}")
        runs = []
        for name in names:
            base_cfg, base_lr = OPTIMIZERS[name]
            if "qk_clip_tau" in base_cfg:
                base_cfg = {**base_cfg, "qk_clip_tau": args.qk_clip_tau}
            for mult in mults:
                out = Path(tmp) / f"{name}-{mult}"
                run = parse_run_config({
                    "model": {"vocab_size": vocab, "max_seq_len": seq, **MODELS[model_name]},
                    "optimizer": {**base_cfg, "lr": base_lr * mult},
                    "training": {"steps": steps, "batch_size": batch, "seq_len": seq,
                                 "warmup_steps": max(1, steps // 20), "schedule": "cosine", "seed": 0,
                                 "log_every": steps, "threads": threads},
                    "data": {"mixture_dir": str(mixture)}, "out_dir": str(out),
                }, source=f"{name} lr x{mult}")
                summary = train(run, QuietReporter())
                m = pq.read_table(out / "metrics.parquet").to_pydict()
                step_ms = statistics.median(batch * seq / v * 1e3 for v in m["tokens_per_s"][1:] or m["tokens_per_s"])
                # tracked on QK-clip runs: the largest attention logit seen, before the clip acts
                logits = [x for x in m.get("max_attn_logit", []) if x is not None]
                max_logit = max(logits) if logits else None
                runs.append({"optimizer": name, "lr": base_lr * mult, "final_loss": summary["final_loss_avg"],
                             "step_ms": step_ms, "losses": m["loss"], "max_attn_logit": max_logit})
                print(f"  {name:<13} lr {base_lr * mult:<8.2g} final loss {summary['final_loss_avg']:.4f}  "
                      f"step {step_ms:.1f} ms" + (f"  max logit {max_logit:.2f}" if max_logit is not None else ""),
                      flush=True)

    best = {name: min((r for r in runs if r["optimizer"] == name), key=lambda r: r["final_loss"]) for name in names}
    print(f"\n  {'optimizer':<13} {'best lr':>8} {'final loss':>11} {'step ms':>9} {'tokens to target':>17} "
          f"{'x tokens':>9}")
    # The target: where the best AdamW run ends, on the same moving average used to find the crossings.
    target = None
    if "adamw" in best:
        tail = best["adamw"]["losses"][-SMOOTH:]
        target = sum(tail) / len(tail)
    adamw_reach = smoothed_first_reach(best["adamw"]["losses"], target) if target is not None else None
    for name, r in best.items():
        reach = smoothed_first_reach(r["losses"], target) if target is not None else None
        r["tokens_to_target"] = reach * batch * seq if reach else None
        ratio = f"{adamw_reach / reach:.2f}x" if reach and adamw_reach else "-"
        tokens = f"{r['tokens_to_target']:,}" if reach else "not reached"
        print(f"  {name:<13} {r['lr']:>8.2g} {r['final_loss']:>11.4f} {r['step_ms']:>9.1f} {tokens:>17} {ratio:>9}")
    if target is not None:
        print(f"  target: the best AdamW run's final loss {target:.4f} ({SMOOTH}-step moving average)")
    if args.json:
        args.json.write_text(json.dumps({"steps": steps, "batch": batch, "seq": seq, "model": model_name,
                                         "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
