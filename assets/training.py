"""checkpoint: `python -m training.train` launched through Dagster Pipes.

The training loop lives in `training/` (plain PyTorch, no Dagster) and runs in a subprocess, or
under torchrun with FoundryResource.train_nproc > 1 on this node or on train_nnodes nodes
(assets/launch.py; the recipe's batch split over the ranks, so the global batch and the identity
stay the same); this module writes its RUN.json, streams its per-step metrics back as Pipes
messages, and publishes the checkpoint directory into the store.

Resumable checkpoints (every FoundryResource.checkpoint_every steps) go to
`<store>/resume/checkpoint/<key>/`, outside the build's temp dir, which a killed build loses: the
next build of the same key resumes from there (exactly: same losses and weights), and removes it
once the output is complete.

With training.keep_every = N the output also holds the weights of steps N, 2N, ... as
`steps/step_<N>/` (listed in the manifest's files and in its counts as kept_steps); the
`eval_steps` asset evaluates each as a partition (assets/eval_steps.py).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from dagster import MetadataValue

from training.reporting import FAILURE_FILE
from training.resume import step_dir_name

from .engine import BuildContext
from .launch import TrainLaunch
from .settings import PROJECT_ROOT
from .store import Manifest, atomic_write_json


def training_spec(recipe) -> dict[str, Any]:
    return {
        # hashed(): fields added later are left out while unused, so old recipes keep their key
        "model": recipe.model.hashed(),
        "optimizer": recipe.optimizer.hashed(),
        "training": recipe.training.hashed(),
    }


def run_config(ctx: BuildContext, vocab_size: int, eos_token_id: int | None = None) -> dict[str, Any]:
    recipe = ctx.plan.context["recipe"]
    m, t = recipe.model, recipe.training
    # Optional model features only when used, so RUN.json and config.json look as before otherwise.
    optional = {k: v for k, v in m.hashed().items()
                if k in ("nope_every", "intra_doc_mask", "z_loss") or k.startswith("moe_")}
    if m.intra_doc_mask:
        if eos_token_id is None:
            raise ValueError("model.intra_doc_mask needs the tokenizer's EOS token id")
        optional["eos_token_id"] = eos_token_id
    return {
        "model": {
            "vocab_size": vocab_size, "d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads,
            "n_kv_heads": m.n_kv_heads, "ffn_hidden": m.ffn_hidden, "max_seq_len": m.seq_len,
            "rope_theta": m.rope_theta, "tie_embeddings": m.tie_embeddings, **optional,
        },
        "optimizer": recipe.optimizer.hashed(),
        "training": {
            "steps": t.steps, "batch_size": t.batch_size, "seq_len": m.seq_len, "warmup_steps": t.warmup_steps,
            "schedule": t.schedule, "grad_clip": t.grad_clip, "seed": t.seed, "log_every": t.log_every,
            "threads": ctx.foundry.train_threads, **({"grad_accum_steps": t.grad_accum_steps}
                                                     if t.grad_accum_steps != 1 else {}),
            **({"skip_spikes": t.skip_spikes.model_dump(mode="json")} if t.skip_spikes is not None else {}),
            # only when used, so RUN.json and config.json look as before otherwise
            **({"keep_every": t.keep_every} if t.keep_every else {}),
            **({"on_nonfinite": t.on_nonfinite, "max_rollbacks": t.max_rollbacks}
               if t.on_nonfinite != "stop" else {}),
        },
        "data": {"mixture_dir": str(ctx.upstream["mixture"].dir)},
        "out_dir": str(ctx.out_dir),
    }


RESUME_DIR = "resume"  # <store>/resume/<kind>/<key>/: resumable checkpoints of unfinished builds


def with_execution_settings(config: dict[str, Any], *, launch: TrainLaunch, checkpoint_every: int,
                            resume_dir: Path, kernels: str = "reference") -> dict[str, Any]:
    """RUN.json plus the execution knobs (none hashed): data-parallel ranks, checkpoint cadence,
    where resumable checkpoints live and which ops run (ModelConfig.kernels). With W ranks in all
    (nodes x processes per node) each trains on batch_size / W sequences per micro-batch, so the
    global batch is the recipe's; a node's CPU threads are shared by its processes."""
    from training.model import KERNEL_CHOICES

    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels (FOUNDRY_KERNELS) must be one of {list(KERNEL_CHOICES)}, got {kernels!r}")
    model = config["model"] if kernels == "reference" else {**config["model"], "kernels": kernels}
    t = dict(config["training"])
    if launch.world_size > 1:
        if t["batch_size"] % launch.world_size:
            raise ValueError(f"training.batch_size ({t['batch_size']}) must be divisible by the number of training "
                             f"processes ({launch.nnodes} node(s) x {launch.nproc}: train_nnodes / FOUNDRY_TRAIN_NNODES "
                             f"x train_nproc / FOUNDRY_TRAIN_NPROC = {launch.world_size})")
        t["batch_size"] //= launch.world_size
        if t.get("threads"):
            t["threads"] = max(1, t["threads"] // launch.nproc)
    if checkpoint_every > 0:
        t["checkpoint_every"] = checkpoint_every
    elif t.get("on_nonfinite") == "rollback":
        raise ValueError("training.on_nonfinite: rollback needs resumable checkpoints to roll back to, but "
                         "checkpoint_every (FOUNDRY_CHECKPOINT_EVERY) is 0")
    return {**config, "model": model, "training": t, "resume_dir": str(resume_dir)}


def build_checkpoint(ctx: BuildContext) -> dict[str, Any]:
    from dataprep.tokenize import EOS, load_tokenizer

    tokenizer = load_tokenizer(ctx.upstream["tokenizer"].dir / "tokenizer.json")
    vocab_size = tokenizer.get_vocab_size()
    run_file = ctx.out_dir.parent / f"{ctx.out_dir.name}.run.json"
    resume_dir = ctx.foundry.store().root / RESUME_DIR / ctx.plan.kind / ctx.key
    launch = ctx.foundry.train_launch()
    config = with_execution_settings(run_config(ctx, vocab_size, eos_token_id=tokenizer.token_to_id(EOS)), launch=launch,
                                     checkpoint_every=ctx.foundry.checkpoint_every, resume_dir=resume_dir,
                                     kernels=ctx.foundry.kernels)
    atomic_write_json(run_file, config)
    messages = ctx.out_dir.parent / f"{ctx.out_dir.name}.pipes.jsonl"  # used when ranks may run elsewhere
    try:
        try:
            invocation = launch.pipes_client(PROJECT_ROOT, messages).run(
                command=launch.command(run_file, rdzv_id=f"foundry-{ctx.key}"),
                context=ctx.dagster,
                env=launch.env(os.getpid()),
            )
        except Exception as err:  # Pipes says only "exit code 1"
            failure = ctx.out_dir / FAILURE_FILE
            if failure.is_file():  # the trainer's own one-line cause beats "exit code 1"
                raise RuntimeError(f"{ctx.plan.label}: training failed: {failure.read_text().strip()}") from err
            raise
        summary = {}
        for message in invocation.get_custom_messages():
            if isinstance(message, dict) and message.get("event") == "summary":
                summary = message
    finally:
        run_file.unlink(missing_ok=True)
        messages.unlink(missing_ok=True)
    if not (ctx.out_dir / "summary.json").is_file():
        raise RuntimeError(f"{ctx.plan.label}: training finished without writing summary.json")
    summary = json.loads((ctx.out_dir / "summary.json").read_text()) | {k: v for k, v in summary.items() if k != "event"}
    if summary.get("resumed_from_step"):
        ctx.log.info(f"{ctx.plan.label}: training resumed at step {summary['resumed_from_step']} from the checkpoint "
                     f"of an interrupted build")
    shutil.rmtree(resume_dir, ignore_errors=True)  # the output is complete: nothing left to resume
    keep = ("final_loss", "steps", "tokens", "seconds", "params", "active_params", "kept_steps", "rollbacks")
    return {k: summary[k] for k in keep if k in summary} | {
        "vocab_size": vocab_size
    }


def describe_checkpoint(manifest: Manifest) -> dict[str, Any]:
    c = manifest.counts
    meta: dict[str, Any] = {k: c[k] for k in ("final_loss", "steps", "tokens", "params", "active_params") if k in c}
    if c.get("kept_steps"):
        meta["kept_steps"] = MetadataValue.md(
            "| kept step | tokens | folder |\n|---:|---:|---|\n" + "\n".join(
                f"| {k['step']:,} | {k['tokens']:,} | steps/{step_dir_name(k['step'])} |" for k in c["kept_steps"]))
    if c.get("rollbacks"):
        meta["rollbacks"] = MetadataValue.md("\n".join(
            f"- step {r['step']}: {r['reason']}; rolled back to step {r['to_step']}" for r in c["rollbacks"]))
    metrics = manifest.path / "metrics.parquet"
    if metrics.is_file():
        table = pq.read_table(metrics, columns=["step", "loss"]).to_pylist()
        meta["loss_curve"] = MetadataValue.md(_loss_plot(table))
    return meta


def _loss_plot(rows: list[dict]) -> str:
    """A small text plot of loss against step: readable in the asset page with no image."""
    if not rows:
        return "(no steps)"
    width, height = 60, 12
    losses = [r["loss"] for r in rows]
    lo, hi = min(losses), max(losses)
    span = (hi - lo) or 1.0
    grid = [[" "] * width for _ in range(height)]
    for i, loss in enumerate(losses):
        x = min(width - 1, i * width // len(losses))
        y = height - 1 - int((loss - lo) / span * (height - 1))
        grid[y][x] = "•"
    lines = [f"{hi:7.3f} ┤" + "".join(grid[0])]
    lines += ["        │" + "".join(row) for row in grid[1:-1]]
    lines += [f"{lo:7.3f} ┤" + "".join(grid[-1]), "        └" + "─" * width, f"         step 1 … {rows[-1]['step']}"]
    return "**training loss**\n\n```\n" + "\n".join(lines) + "\n```"
