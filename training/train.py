"""Training entry point: ``python -m training.train --config RUN.json``, alone or under torchrun.

Outputs in out_dir: model.safetensors + config.json (checkpoint), metrics.parquet (one row per
step), for an MoE model expert_load.parquet (tokens routed to each layer, expert and mixture
source per logging window; EXPERT_LOAD_SCHEMA) and summary.json, written last, so its presence
marks a finished run.

A step accumulates gradients over training.grad_accum_steps micro-batches. With an MoE model whose
load-balancing loss is global (moe_lb_scope = "global_batch") and several micro-batches, the step
first counts every micro-batch's routing under no_grad (one extra forward per micro-batch), so
each micro-batch's loss uses the whole step's expert loads (see training.moe).

Resume: with training.checkpoint_every = N, every N steps the full training state goes to
resume_dir (training.resume); a run that finds a checkpoint there continues from it and gives the
same losses and weights as an uninterrupted run (bitwise on CPU with the same thread count).

Data parallel: under ``torchrun --nproc_per_node=W`` each rank trains on its batch_size slice of
a global batch of batch_size * W sequences per micro-batch (training.data), gradients are averaged
by DDP once per step (no_sync on the other micro-batches), the logged loss is the global mean,
and only rank 0 writes or reports.

Loss spikes: with training.skip_spikes, a step whose loss jumps far above the recent median is not
applied (training.spikes); metrics.parquet marks it in the `skipped` column.

Kept steps: with training.keep_every = N, the weights of steps N, 2N, ... before the last go to
out_dir/steps/step_<N>/ (training.kept_steps); summary.json lists them under kept_steps.

NaN/inf: a non-finite loss or gradient norm stops the run (TrainingDiverged), or with
training.on_nonfinite = "rollback" reloads the last resumable checkpoint, skips the batches from
there up to the bad step (the data stream keeps its position) and goes on, at most
training.max_rollbacks times. metrics.parquet then has a `rollbacks` column (rollbacks before the
row's step was trained) and summary.json lists each rollback.
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

from dataprep.progress import format_duration
from training import distributed, kept_steps, resume
from training.atomic import atomic_path, write_json_atomic
from training.checkpoint import save_checkpoint
from training.config import RunConfig, load_run_config
from training.data import MixtureTokenStream
from training.distributed import World
from training.model import Transformer, estimate_mfu
from training.moe import ExpertLoad
from training.optim import build_optimizer, lr_at, qk_clip_tau
from training.qk_clip import apply_qk_clip
from training.reporting import FAILURE_FILE, Reporter, open_reporter
from training.spikes import SpikeGuard, SpikePolicy

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
        ("skipped", pa.bool_()),  # the update was not applied (loss spike; training.skip_spikes)
    ]
)

# expert_load.parquet: tokens each (MoE layer, expert, mixture source) received since the previous
# row's step (one row per cell at every logged step, zeros included); a token counts once per
# expert it is routed to, so per step and layer the tokens sum to k * tokens trained on.
# with training.on_nonfinite = "rollback" only (default runs write the columns above, as before)
ROLLBACK_FIELD = pa.field("rollbacks", pa.int64())  # rollbacks that happened before this step was trained

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
    """Loss or gradient norm became NaN/inf (and the run may not, or may no more, roll back)."""


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


def _eta(elapsed_s: float, steps_done: int, steps_left: int) -> str:
    """Time left at this process's mean step time so far."""
    return "?" if steps_done <= 0 else format_duration(elapsed_s / steps_done * steps_left)


def train(run: RunConfig, reporter: Reporter, world: World | None = None) -> dict:
    world = world or distributed.world_from_env()
    tc = run.training
    if tc.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{run.source}: training.device is {tc.device!r} but CUDA is not available")
    device = distributed.start(world, tc.device)
    try:
        return _train(run, reporter, world, device)
    finally:
        distributed.stop()


def _train(run: RunConfig, reporter: Reporter, world: World, device: str) -> dict:
    tc = run.training
    if tc.threads is not None:
        torch.set_num_threads(tc.threads)
    _seed_everything(tc.seed)

    model = Transformer(run.model).to(device)
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
        run.mixture_dir, tc.batch_size, tc.seq_len, rank=world.rank, world_size=world.world_size,
        vocab_size=run.model.vocab_size,
    )
    guard = SpikeGuard(SpikePolicy.from_dict(tc.skip_spikes)) if tc.skip_spikes is not None else None

    n_micro = tc.grad_accum_steps
    tokens_per_step = tc.batch_size * tc.seq_len * n_micro * world.world_size
    n_params = model.num_params()
    flops_per_token = model.flops_per_token(tc.seq_len)
    moe = bool(model.moe_layers)
    # Global-batch load balancing over several micro-batches needs the step's counts up front.
    count_first = moe and run.model.moe_lb_scope == "global_batch" and n_micro > 1
    expert_load = ExpertLoad([i for i, _ in model.moe_layers], run.model.moe_experts, stream.source_names) if moe else None
    active_note = f", {model.num_params(active=True) / 1e6:.2f}M active per token" if moe else ""
    ranks_note = f" on {world.world_size} ranks" if world.parallel else ""
    reporter.log(
        f"model {n_params / 1e6:.2f}M params ({model.num_params(exclude_embeddings=True) / 1e6:.2f}M non-embedding"
        f"{active_note}); mixture {stream.total_tokens:,} tokens; {tc.steps} steps x {tokens_per_step:,} tokens "
        f"({tc.steps * tc.batch_size * n_micro * world.world_size / stream.windows_per_epoch:.2f} epochs){ranks_note}"
    )

    records: list[dict] = []
    load_rows: list[dict] = []
    rollbacks: list[dict] = []  # {"step", "to_step", "reason"} per rollback (on_nonfinite = "rollback")
    start_step, seconds_before = 0, 0.0
    trained = (model, optimizer, stream, expert_load, guard, world)
    ckpt = resume.latest(run.resume_dir)
    if ckpt is not None:
        state = _restore(ckpt, run, *trained)
        records, load_rows = list(state["metrics"]), list(state["expert_load_rows"])
        rollbacks = list(state.get("rollbacks") or [])
        start_step, seconds_before = int(state["step"]), float(state["seconds"])
        reporter.log(f"resuming from checkpoint {ckpt} at step {start_step}/{tc.steps}")
    elif tc.on_nonfinite == "rollback" and run.resume_dir is not None:
        # a state to roll back to before the first periodic checkpoint: the initial one
        _save_resumable(run, world, 0, model, optimizer, stream, records, load_rows, expert_load, guard, 0.0, rollbacks)
        distributed.barrier(world)
    net = distributed.wrap(model, world, device, moe=moe)  # what the training forward goes through
    keep_root = kept_steps.kept_root(run.out_dir, run.resume_dir)

    max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
    t_start = time.perf_counter()
    launcher_alive = _launcher_watch()
    torch.set_grad_enabled(True)  # an importer (e.g. lighteval) may have turned it off process-wide
    step = start_step
    while step < tc.steps:
        step += 1
        if not launcher_alive():
            # The orchestrator died (e.g. SIGKILL): stop instead of writing into an abandoned dir.
            raise SystemExit(f"the launching process is gone; stopping at step {step}")
        t0 = time.perf_counter()
        lr = lr_at(step - 1, tc.steps, peak_lr, tc.warmup_steps, tc.schedule, tc.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr if group["peak_lr"] == peak_lr else group["peak_lr"] * lr / peak_lr

        micro = [stream.next_batch_with_sources() for _ in range(n_micro)]  # (x, y, source) [B, T] each
        counts = model.route_counts([x.to(device) for x, _, _ in micro]) if count_first else None
        optimizer.zero_grad(set_to_none=True)
        loss_value, lb_loss, z_loss = 0.0, 0.0, 0.0  # means over micro-batches; loss without MoE aux terms
        step_max: list[torch.Tensor] | None = None  # per layer [H] max attention logit over micro-batches
        for i, (x, y, source) in enumerate(micro):
            x, y = x.to(device), y.to(device)
            # DDP averages gradients over ranks on the step's last micro-batch only.
            with distributed.maybe_no_sync(net, skip_sync=i < n_micro - 1):
                _, loss = net(x, y, moe_counts=counts)
                (loss / n_micro if n_micro > 1 else loss).backward()
            value = loss.item()
            if moe:
                lb, z, weighted = torch.stack([model.moe_losses[k] for k in ("lb", "z", "weighted")]).tolist()
                value -= weighted
                lb_loss, z_loss = lb_loss + lb / n_micro, z_loss + z / n_micro
                expert_load.add(model.expert_choices(), source)
            loss_value += value / n_micro
            if model.track_max_logit:
                step_max = _keep_step_max_logit(model, step_max)
        if world.parallel:  # the global batch's figures, identical on every rank
            loss_value, lb_loss, z_loss = distributed.mean_over_ranks([loss_value, lb_loss, z_loss], world, device)
            if step_max is not None:
                distributed.max_over_ranks_(step_max, world)
        # Checked after the micro-batches (not before backward) so every rank stops at the same step,
        # and before the update, so no NaN reaches the weights.
        layer_logits = model.max_attn_logits()  # per layer, over this step's forwards; None if untracked
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item() \
            if math.isfinite(loss_value) else math.nan
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            what = (f"loss became {loss_value} at step {step} (lr {lr:.3g})" if not math.isfinite(loss_value)
                    else f"gradient norm became {grad_norm} at step {step} (loss {loss_value:.4f})")
            if tc.on_nonfinite != "rollback":
                raise TrainingDiverged(f"{what}; aborting the run")
            if len(rollbacks) >= tc.max_rollbacks:
                raise TrainingDiverged(f"{what}; {len(rollbacks)} rollbacks already (training.max_rollbacks="
                                       f"{tc.max_rollbacks}); aborting the run")
            ckpt = resume.latest(run.resume_dir)
            if ckpt is None:
                raise TrainingDiverged(f"{what}; no resumable checkpoint in {run.resume_dir} to roll back to")
            skip_to = stream.state_dict()  # past this step's batches: the window up to here is skipped
            state = _restore(ckpt, run, *trained)
            stream.load_state_dict(skip_to)
            records, load_rows = list(state["metrics"]), list(state["expert_load_rows"])
            rollbacks.append({"step": step, "to_step": int(state["step"]), "reason": what})
            reporter.log(f"step {step}: {what}; rolled back to step {state['step']} ({len(rollbacks)} of at most "
                         f"{tc.max_rollbacks} rollbacks), skipping the batches of steps {state['step'] + 1}-{step}")
            step = int(state["step"])
            continue
        skip_reason = guard.check(step, loss_value, grad_norm) if guard is not None else None
        if skip_reason is None:
            optimizer.step()
            if tau is not None:
                apply_qk_clip(model, tau)
        else:
            reporter.log(f"step {step}: update skipped: {skip_reason} ({guard.skips} skipped so far)")

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
            "skipped": skip_reason is not None,
        }
        if tc.on_nonfinite == "rollback":
            record["rollbacks"] = len(rollbacks)
        records.append(record)
        if step % tc.log_every == 0 or step == 1 or step == tc.steps:
            logit_note = "" if layer_logits is None else " | max_logit " + " ".join(f"{v:.1f}" for v in layer_logits)
            extra = {} if layer_logits is None else {"max_attn_logit_per_layer": layer_logits}
            moe_note = ""
            if moe:
                distributed.sum_over_ranks_(expert_load.counts, world)
                extra["moe_max_load"] = expert_load.max_load()
                moe_note = f" | lb {lb_loss:.3f} z {z_loss:.3f} max_load {extra['moe_max_load']:.2f}"
                load_rows += expert_load.flush(step)
            reporter.log(
                f"step {step}/{tc.steps} | loss {loss_value:.4f} | lr {lr:.2e} | grad_norm {grad_norm:.3f} "
                f"| {record['tokens_per_s']:,.0f} tok/s | epoch {stream.epochs_completed}"
                f" | ETA {_eta(time.perf_counter() - t_start, step - start_step, tc.steps - step)}{moe_note}{logit_note}"
            )
            reporter.metrics({**record, **extra})
        if kept_steps.is_kept(step, tc.keep_every, tc.steps) and world.is_main:
            kept_steps.save(keep_root, step, model, tokens=record["tokens"])
        if run.resume_dir is not None and tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < tc.steps:
            _save_resumable(run, world, step, model, optimizer, stream, records, load_rows, expert_load, guard,
                            seconds_before + time.perf_counter() - t_start, rollbacks)
    seconds = time.perf_counter() - t_start

    tokens = tc.steps * tokens_per_step
    tokens_per_s = (tc.steps - start_step) * tokens_per_step / seconds if seconds > 0 else 0.0  # this process's rate
    tail = records[-max(1, len(records) // 10) :]
    summary = {
        "final_loss": records[-1]["loss"],
        "final_loss_avg": sum(r["loss"] for r in tail) / len(tail),  # mean over the last 10% of steps
        "steps": tc.steps,
        "tokens": tokens,
        "seconds": seconds_before + seconds,
        "tokens_per_s": tokens_per_s,
        "params": n_params,
        "flops_per_token": flops_per_token,
        "mfu": estimate_mfu(flops_per_token, tokens_per_s, tc.peak_flops) if tc.peak_flops else None,
        "epochs_completed": stream.epochs_completed,
        "seed": tc.seed,
    }
    if moe:
        summary["active_params"] = model.num_params(active=True)
    if start_step:
        summary["resumed_from_step"] = start_step
    if guard is not None:
        summary["skipped_steps"] = guard.skips
    if tc.on_nonfinite == "rollback":
        summary["rollbacks"] = rollbacks
    keep = [s for s in range(tc.keep_every, tc.steps, tc.keep_every)] if tc.keep_every else []
    if keep:
        summary["kept_steps"] = [{"step": s, "tokens": s * tokens_per_step} for s in keep]
    if world.parallel:
        summary["world_size"] = world.world_size
    if world.is_main:
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
        schema = METRICS_SCHEMA.append(ROLLBACK_FIELD) if tc.on_nonfinite == "rollback" else METRICS_SCHEMA
        write_metrics(out / "metrics.parquet", records, schema)
        if keep:
            kept_steps.publish(keep_root, out, keep)
        if moe:
            write_metrics(out / "expert_load.parquet", load_rows, EXPERT_LOAD_SCHEMA)
        write_json_atomic(out / "summary.json", summary)
    distributed.barrier(world)  # no rank leaves (and tears the group down) before the outputs exist
    reporter.log(f"done: {tc.steps} steps, {tokens:,} tokens in {seconds:.1f}s, final loss {summary['final_loss']:.4f}")
    reporter.summary(summary)
    return summary


def _restore(ckpt: Path, run: RunConfig, model, optimizer, stream, expert_load, guard, world: World) -> dict:
    """Put the model, optimizer, data stream, expert-load window, spike guard and RNG back to a
    resumable checkpoint (to resume, or to roll back); returns its state for the caller's lists."""
    state = resume.load(ckpt, model)
    resume.check_same_run(state, {**run.identity(), "world_size": world.world_size}, ckpt, run.resume_dir)
    optimizer.load_state_dict(state["optimizer"])
    stream.load_state_dict(state["data"])
    if expert_load is not None:  # the window's counts, summed over ranks when saved: rank 0 holds them
        if world.is_main:
            expert_load.counts.copy_(state["expert_load_counts"])
        else:
            expert_load.counts.zero_()
    if guard is not None:
        guard.load_state_dict(state["spikes"])
    resume.restore_rng(state["rng"])  # last: everything above may draw from the generators
    return state


def _save_resumable(run, world, step, model, optimizer, stream, records, load_rows, expert_load, guard, seconds,
                    rollbacks) -> None:
    """Rank 0 writes the full training state: replicas are identical after the step, and the RNG
    state saved is rank 0's (training draws no random numbers after the model's initialisation)."""
    window_counts = None
    if expert_load is not None:  # the open logging window's counts, over all ranks
        window_counts = expert_load.counts.clone()
        distributed.sum_over_ranks_(window_counts, world)
    if not world.is_main:
        return
    state = {
        "run": {**run.identity(), "world_size": world.world_size},
        "optimizer": optimizer.state_dict(),
        "data": stream.state_dict(),
        "rng": resume.capture_rng(),
        "metrics": records,
        "expert_load_rows": load_rows,
        "expert_load_counts": window_counts.cpu() if window_counts is not None else None,
        "spikes": guard.state_dict() if guard is not None else None,
        "seconds": seconds,
        "rollbacks": rollbacks,
    }
    resume.save(run.resume_dir, step, model, state, model_extra={"step": step})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path, help="path to RUN.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run training from the command line (or in-process from tests); returns the summary."""
    args = parse_args(argv)
    world = distributed.world_from_env()
    # Open the reporter first so that config errors, too, reach Dagster as a reported exception.
    with open_reporter(world.rank) as reporter:
        run = load_run_config(args.config)
        try:
            return train(run, reporter, world)
        except Exception as err:
            # One line the launcher can show as the cause, whatever channel carried the traceback.
            with atomic_path(Path(run.out_dir) / FAILURE_FILE) as tmp:
                tmp.write_text(f"{type(err).__name__}: {err}\n")
            raise


if __name__ == "__main__":
    main()
