"""Training entry point: ``python -m training.train --config RUN.json``.

Single process for now, but laid out for torchrun: it reads RANK/WORLD_SIZE, the data stream
already shards by rank, and only rank 0 would write outputs.

Outputs in out_dir: model.safetensors + config.json (checkpoint), metrics.parquet (one row per
step), for an MoE model expert_load.parquet (tokens routed to each layer, expert and mixture
source per logging window; EXPERT_LOAD_SCHEMA) and summary.json, written last, so its presence
marks a finished run.

A step accumulates gradients over training.grad_accum_steps micro-batches. With an MoE model whose
load-balancing loss is global (moe_lb_scope = "global_batch") and several micro-batches, the step
first counts every micro-batch's routing under no_grad (one extra forward per micro-batch), so
each micro-batch's loss uses the whole step's expert loads (see training.moe).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from training.atomic import atomic_path, write_json_atomic
from training.checkpoint import save_checkpoint
from training.config import RunConfig, load_run_config
from training.data import MixtureTokenStream
from training.model import Transformer, estimate_mfu
from training.moe import ExpertLoad
from training.optim import build_optimizer, lr_at, qk_clip_tau
from training.qk_clip import apply_qk_clip
from training.reporting import FAILURE_FILE, Reporter, open_reporter

METRICS_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),  # optimizer steps completed (1-based)
        ("tokens", pa.int64()),  # cumulative training tokens, all ranks
        ("loss", pa.float64()),
        ("lr", pa.float64()),
        ("grad_norm", pa.float64()),  # global norm before clipping
        ("tokens_per_s", pa.float64()),
        ("max_attn_logit", pa.float64()),  # max over layers and heads; null unless tracked (QK-clip on)
        # MoE only (else null): the auxiliary losses, mean over MoE layers and micro-batches; "loss"
        # above is the language-model loss without them (their weighted sum is added in training).
        ("moe_lb_loss", pa.float64()),  # load balancing, 1.0 = perfectly balanced
        ("moe_z_loss", pa.float64()),  # router z-loss
    ]
)

# expert_load.parquet: tokens each (MoE layer, expert, mixture source) received since the previous
# row's step (one row per cell at every logged step, zeros included); a token counts once per
# expert it is routed to, so per step and layer the tokens sum to k * tokens trained on.
EXPERT_LOAD_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),  # the logged step closing the window
        ("layer", pa.int64()),  # 0-based model layer
        ("expert", pa.int64()),
        ("source", pa.string()),  # the mixture source's name (sources.json)
        ("tokens", pa.int64()),
    ]
)


class TrainingDiverged(RuntimeError):
    """Loss or gradient norm became NaN/inf."""


def _world() -> tuple[int, int]:
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != 1:
        raise RuntimeError(f"multi-process training is not implemented yet (WORLD_SIZE={world_size}); run one process")
    return rank, world_size


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_metrics(path: Path, records: list[dict], schema: pa.Schema = METRICS_SCHEMA) -> None:
    table = pa.table({name: [r[name] for r in records] for name in schema.names}, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _keep_step_max_logit(model: Transformer, so_far: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """Make each layer's tracked [H] max attention logit the max over this step's micro-batches so
    far (QK-clip and the log read it from the layers), and return those maxima."""
    attns = [layer.attn for layer in model.layers]
    if so_far is not None:
        for attn, prev in zip(attns, so_far, strict=True):
            attn.max_logit = torch.maximum(attn.max_logit, prev)
    return [attn.max_logit for attn in attns]


def _launcher_watch():
    """A check that the orchestrator still runs. The launcher may pass its pid in
    FOUNDRY_PARENT_PID (it may be a grandparent under torchrun, and a launcher that died while
    this interpreter was starting is caught too); otherwise watch for a change of parent."""
    expected = os.environ.get("FOUNDRY_PARENT_PID")
    if expected:
        pid = int(expected)

        def alive() -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True

        return alive
    first = os.getppid()
    return lambda: os.getppid() == first


def train(run: RunConfig, reporter: Reporter) -> dict:
    tc = run.training
    rank, world_size = _world()
    if tc.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{run.source}: training.device is {tc.device!r} but CUDA is not available")
    if tc.threads is not None:
        torch.set_num_threads(tc.threads)
    _seed_everything(tc.seed)

    model = Transformer(run.model).to(tc.device)
    model.train()
    try:
        optimizer = build_optimizer(model, run.optimizer)
        tau = qk_clip_tau(run.optimizer)
    except ValueError as e:
        raise ValueError(f"{run.source}: optimizer: {e}") from e
    # Groups may have their own peak lr (Muon's AdamW groups); the schedule scales each alike.
    # The first group's lr is the one logged.
    for group in optimizer.param_groups:
        group.setdefault("peak_lr", group["lr"])
    peak_lr = optimizer.param_groups[0]["peak_lr"]
    model.track_max_logit = tau is not None  # the max logit costs one extra q.k per layer
    stream = MixtureTokenStream(
        run.mixture_dir, tc.batch_size, tc.seq_len, rank=rank, world_size=world_size, vocab_size=run.model.vocab_size
    )

    n_micro = tc.grad_accum_steps
    tokens_per_step = tc.batch_size * tc.seq_len * n_micro * world_size
    n_params = model.num_params()
    flops_per_token = model.flops_per_token(tc.seq_len)
    moe = bool(model.moe_layers)
    # Global-batch load balancing over several micro-batches needs the step's counts up front.
    count_first = moe and run.model.moe_lb_scope == "global_batch" and n_micro > 1
    expert_load = ExpertLoad([i for i, _ in model.moe_layers], run.model.moe_experts, stream.source_names) if moe else None
    active_note = f", {model.num_params(active=True) / 1e6:.2f}M active per token" if moe else ""
    reporter.log(
        f"model {n_params / 1e6:.2f}M params ({model.num_params(exclude_embeddings=True) / 1e6:.2f}M non-embedding"
        f"{active_note}); mixture {stream.total_tokens:,} tokens; {tc.steps} steps x {tokens_per_step:,} tokens "
        f"({tc.steps * tc.batch_size * n_micro * world_size / stream.windows_per_epoch:.2f} epochs)"
    )

    max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
    records: list[dict] = []
    load_rows: list[dict] = []
    t_start = time.perf_counter()
    launcher_alive = _launcher_watch()
    torch.set_grad_enabled(True)  # an importer (e.g. lighteval) may have turned it off process-wide
    for step in range(1, tc.steps + 1):
        if not launcher_alive():
            # The orchestrator died (e.g. SIGKILL): stop instead of writing into an abandoned dir.
            raise SystemExit(f"the launching process is gone; stopping at step {step}")
        t0 = time.perf_counter()
        lr = lr_at(step - 1, tc.steps, peak_lr, tc.warmup_steps, tc.schedule, tc.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr if group["peak_lr"] == peak_lr else group["peak_lr"] * lr / peak_lr

        micro = [stream.next_batch_with_sources() for _ in range(n_micro)]  # (x, y, source) [B, T] each
        counts = model.route_counts([x.to(tc.device) for x, _, _ in micro]) if count_first else None
        optimizer.zero_grad(set_to_none=True)
        loss_value, lb_loss, z_loss = 0.0, 0.0, 0.0  # means over micro-batches; loss without MoE aux terms
        step_max: list[torch.Tensor] | None = None  # per layer [H] max attention logit over micro-batches
        for x, y, source in micro:
            x, y = x.to(tc.device), y.to(tc.device)
            _, loss = model(x, y, moe_counts=counts)
            value = loss.item()
            if not math.isfinite(value):
                raise TrainingDiverged(f"loss became {value} at step {step} (lr {lr:.3g}); aborting the run")
            (loss / n_micro if n_micro > 1 else loss).backward()
            if moe:
                lb, z, weighted = torch.stack([model.moe_losses[k] for k in ("lb", "z", "weighted")]).tolist()
                value -= weighted
                lb_loss, z_loss = lb_loss + lb / n_micro, z_loss + z / n_micro
                expert_load.add(model.expert_choices(), source)
            loss_value += value / n_micro
            if model.track_max_logit:
                step_max = _keep_step_max_logit(model, step_max)
        layer_logits = model.max_attn_logits()  # per layer, over this step's forwards; None if untracked

        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
        if not math.isfinite(grad_norm):
            raise TrainingDiverged(f"gradient norm became {grad_norm} at step {step} (loss {loss_value:.4f}); aborting the run")
        optimizer.step()
        if tau is not None:
            apply_qk_clip(model, tau)

        dt = time.perf_counter() - t0
        record = {
            "step": step,
            "tokens": step * tokens_per_step,
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_step / dt,
            "max_attn_logit": max(layer_logits) if layer_logits else None,
            "moe_lb_loss": lb_loss if moe else None,
            "moe_z_loss": z_loss if moe else None,
        }
        records.append(record)
        if step % tc.log_every == 0 or step == 1 or step == tc.steps:
            logit_note = "" if layer_logits is None else " | max_logit " + " ".join(f"{v:.1f}" for v in layer_logits)
            extra = {} if layer_logits is None else {"max_attn_logit_per_layer": layer_logits}
            moe_note = ""
            if moe:
                extra["moe_max_load"] = expert_load.max_load()
                moe_note = f" | lb {lb_loss:.3f} z {z_loss:.3f} max_load {extra['moe_max_load']:.2f}"
                load_rows += expert_load.flush(step)
            reporter.log(
                f"step {step}/{tc.steps} | loss {loss_value:.4f} | lr {lr:.2e} | grad_norm {grad_norm:.3f} "
                f"| {record['tokens_per_s']:,.0f} tok/s | epoch {stream.epochs_completed}{moe_note}{logit_note}"
            )
            reporter.metrics({**record, **extra})
    seconds = time.perf_counter() - t_start

    tokens = tc.steps * tokens_per_step
    tokens_per_s = tokens / seconds
    tail = records[-max(1, len(records) // 10) :]
    summary = {
        "final_loss": records[-1]["loss"],
        "final_loss_avg": sum(r["loss"] for r in tail) / len(tail),  # mean over the last 10% of steps
        "steps": tc.steps,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens_per_s,
        "params": n_params,
        "flops_per_token": flops_per_token,
        "mfu": estimate_mfu(flops_per_token, tokens_per_s, tc.peak_flops) if tc.peak_flops else None,
        "epochs_completed": stream.epochs_completed,
        "seed": tc.seed,
    }
    if moe:
        summary["active_params"] = model.num_params(active=True)
    if rank == 0:
        out = run.out_dir
        out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(
            out,
            model,
            extra={
                "tokens": tokens,
                "final_loss": summary["final_loss"],
                "steps": tc.steps,
                "seed": tc.seed,
                "optimizer": run.optimizer,
                "training": run.to_dict()["training"],
                "data": {"mixture_dir": str(run.mixture_dir)},
            },
        )
        write_metrics(out / "metrics.parquet", records)
        if moe:
            write_metrics(out / "expert_load.parquet", load_rows, EXPERT_LOAD_SCHEMA)
        write_json_atomic(out / "summary.json", summary)
    reporter.log(f"done: {tc.steps} steps, {tokens:,} tokens in {seconds:.1f}s, final loss {summary['final_loss']:.4f}")
    reporter.summary(summary)
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path, help="path to RUN.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run training from the command line (or in-process from tests); returns the summary."""
    args = parse_args(argv)
    # Open the reporter first so that config errors, too, reach Dagster as a reported exception.
    with open_reporter() as reporter:
        run = load_run_config(args.config)
        try:
            return train(run, reporter)
        except Exception as err:
            # One line the launcher can show as the cause, whatever channel carried the traceback.
            failure = Path(run.out_dir) / FAILURE_FILE
            failure.parent.mkdir(parents=True, exist_ok=True)
            failure.write_text(f"{type(err).__name__}: {err}\n")
            raise


if __name__ == "__main__":
    main()
