"""Data-parallel training under torchrun (2 CPU processes, gloo) matches one process trained on the
same global batch: loss, gradient norm and MoE figures at every step, and the final weights; and a
torchrun job resumes from its checkpoint exactly.

One demanding configuration covers the DDP paths at once: an MoE model (DDP with
find_unused_parameters; expert counts summed over ranks for the global-batch balancing loss),
Muon, QK-clip (per-head max logits reduced over ranks, so every replica clips alike) and 2
micro-batches per step (no_sync on the first).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from tests.test_training import REPO, _subprocess_env, write_run
from training import train as train_mod
from training.distributed import World, world_from_env

STEPS = 12


def _config(root: Path, batch_size: int, **training) -> Path:
    path = write_run(root, steps=STEPS, batch_size=batch_size, grad_accum_steps=2, log_every=4, **training)
    run = json.loads(path.read_text())
    run["optimizer"] = {"name": "muon", "lr": 1e-2, "qk_clip_tau": 30.0}
    run["model"].update({"moe_experts": 4, "moe_top_k": 2, "moe_ffn_hidden": 16, "moe_lb_scope": "global_batch"})
    path.write_text(json.dumps(run))
    return path


def _torchrun(cfg: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "training.train", "--config", str(cfg)],
        cwd=REPO, env=_subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_torchrun_two_ranks_match_one_process_on_the_same_global_batch(tmp_path):
    ddp_cfg = _config(tmp_path / "ddp", batch_size=4, checkpoint_every=5)  # per rank: 2 x 4 = the global 8
    proc = _torchrun(ddp_cfg)
    single = train_mod.main(["--config", str(_config(tmp_path / "single", batch_size=8))])

    ddp_out, single_out = tmp_path / "ddp" / "out", tmp_path / "single" / "out"
    # rank 0 alone writes and reports
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["event"] for e in events].count("summary") == 1
    assert [e["step"] for e in events if e["event"] == "metrics"] == [1, 4, 8, 12]
    assert sorted(p.name for p in ddp_out.iterdir()) == sorted([p.name for p in single_out.iterdir()] + ["resume"])
    summary = json.loads((ddp_out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["tokens"] == single["tokens"] == STEPS * 2 * 8 * 16

    a = pq.read_table(ddp_out / "metrics.parquet").to_pydict()
    b = pq.read_table(single_out / "metrics.parquet").to_pydict()
    assert a["tokens"] == b["tokens"]
    for column in ("loss", "grad_norm", "moe_lb_loss", "moe_z_loss", "max_attn_logit"):
        torch.testing.assert_close(torch.tensor(a[column]), torch.tensor(b[column]), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, c=column: f"{c}: {m}")
    assert b["loss"][-1] < b["loss"][0] - 0.5  # it trained: the match is not two untouched models
    wa, wb = load_file(str(ddp_out / "model.safetensors")), load_file(str(single_out / "model.safetensors"))
    for name in wb:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    # routing counts are summed over ranks before they are written
    la = pq.read_table(ddp_out / "expert_load.parquet").to_pydict()
    lb = pq.read_table(single_out / "expert_load.parquet").to_pydict()
    assert sum(la["tokens"]) == sum(lb["tokens"]) == STEPS * 2 * 8 * 16 * 2 * 2  # tokens x top-2 x 2 MoE layers

    # Resume under torchrun: the outputs gone, the last checkpoint (step 10) left, the same job again
    # ends bit for bit where the uninterrupted one did (expert-load window and Muon state included).
    first = {f: (ddp_out / f).read_bytes() for f in ("model.safetensors", "expert_load.parquet")}
    for f in ("model.safetensors", "metrics.parquet", "expert_load.parquet", "summary.json", "config.json"):
        (ddp_out / f).unlink()
    again = _torchrun(ddp_cfg)
    assert f"resuming from checkpoint {ddp_out / 'resume' / 'step_00000010'} at step 10/{STEPS}" in again.stderr
    again_m = pq.read_table(ddp_out / "metrics.parquet").to_pydict()
    assert again_m["loss"] == a["loss"] and again_m["grad_norm"] == a["grad_norm"]
    resumed = load_file(str(ddp_out / "model.safetensors"))
    assert all(torch.equal(resumed[k], wa[k]) for k in wa)
    assert pq.read_table(ddp_out / "expert_load.parquet").equals(pq.read_table(pa.BufferReader(first["expert_load.parquet"])))


@pytest.mark.parametrize(
    "env, message",
    [({"WORLD_SIZE": "2", "RANK": "2"}, r"RANK=2 must lie in \[0, WORLD_SIZE=2\)"),
     ({"WORLD_SIZE": "two"}, "environment variable WORLD_SIZE must be an integer, got 'two'")],
)
def test_bad_torchrun_environment(monkeypatch, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=message):
        world_from_env()


def test_single_process_world():
    assert world_from_env() == World(0, 1, 0) and not World().parallel


def test_the_asset_splits_the_recipe_batch_over_torchrun_ranks(tmp_path):
    from assets.training import launch_command, with_execution_settings
    from training.config import parse_run_config

    config = {"model": {"vocab_size": 64}, "optimizer": {"name": "adamw", "lr": 1e-3},
              "training": {"steps": 10, "batch_size": 8, "seq_len": 16, "threads": 4},
              "data": {"mixture_dir": "/m"}, "out_dir": "/o"}
    one = with_execution_settings(config, nproc=1, checkpoint_every=0, resume_dir=tmp_path / "r")
    assert one["training"] == config["training"] and one["resume_dir"] == str(tmp_path / "r")
    assert launch_command(tmp_path / "run.json", 1)[1:] == ["-m", "training.train", "--config", str(tmp_path / "run.json")]

    two = with_execution_settings(config, nproc=2, checkpoint_every=25, resume_dir=tmp_path / "r")
    assert two["training"] == {**config["training"], "batch_size": 4, "threads": 2, "checkpoint_every": 25}
    run = parse_run_config(two)
    assert run.resume_dir == tmp_path / "r" and run.training.checkpoint_every == 25
    assert launch_command(tmp_path / "run.json", 2)[1:6] == [
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    with pytest.raises(ValueError, match=r"training\.batch_size \(8\) must be divisible by the number of training "
                                         r"processes \(train_nproc / FOUNDRY_TRAIN_NPROC = 3\)"):
        with_execution_settings(config, nproc=3, checkpoint_every=0, resume_dir=tmp_path)


def test_the_asset_passes_the_kernel_choice_to_the_model_config(tmp_path):
    from assets.training import with_execution_settings
    from training.config import parse_run_config

    config = {"model": {"vocab_size": 64}, "optimizer": {"name": "adamw", "lr": 1e-3},
              "training": {"steps": 10, "batch_size": 8, "seq_len": 16},
              "data": {"mixture_dir": "/m"}, "out_dir": "/o"}
    plain = with_execution_settings(config, nproc=1, checkpoint_every=0, resume_dir=tmp_path)
    assert "kernels" not in plain["model"] and parse_run_config(plain).model.kernels == "reference"
    fused = with_execution_settings(config, nproc=1, checkpoint_every=0, resume_dir=tmp_path, kernels="triton")
    assert parse_run_config(fused).model.kernels == "triton" and "kernels" not in config["model"]
    with pytest.raises(ValueError, match=r"FOUNDRY_KERNELS.*'cuda'"):
        with_execution_settings(config, nproc=1, checkpoint_every=0, resume_dir=tmp_path, kernels="cuda")
