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
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from tests.support.network import free_port
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
    from assets.launch import TrainLaunch
    from assets.training import with_execution_settings
    from training.config import parse_run_config

    config = {"model": {"vocab_size": 64}, "optimizer": {"name": "adamw", "lr": 1e-3},
              "training": {"steps": 10, "batch_size": 8, "seq_len": 16, "threads": 4},
              "data": {"mixture_dir": "/m"}, "out_dir": "/o"}
    run_file = tmp_path / "run.json"
    single = TrainLaunch.of(1)
    one = with_execution_settings(config, launch=single, checkpoint_every=0, resume_dir=tmp_path / "r")
    assert one["training"] == config["training"] and one["resume_dir"] == str(tmp_path / "r")
    assert single.command(run_file, "id")[1:] == ["-m", "training.train", "--config", str(run_file)]
    assert single.env(123) == {"FOUNDRY_PARENT_PID": "123"}

    local = TrainLaunch.of(2)
    two = with_execution_settings(config, launch=local, checkpoint_every=25, resume_dir=tmp_path / "r")
    assert two["training"] == {**config["training"], "batch_size": 4, "threads": 2, "checkpoint_every": 25}
    run = parse_run_config(two)
    assert run.resume_dir == tmp_path / "r" and run.training.checkpoint_every == 25
    assert local.command(run_file, "id")[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    with pytest.raises(ValueError, match=r"training\.batch_size \(8\) must be divisible by the number of training "
                                         r"processes \(1 node\(s\) x 3: .* = 3\)"):
        with_execution_settings(config, launch=TrainLaunch.of(3), checkpoint_every=0, resume_dir=tmp_path)

    # two nodes of two: the batch over all four ranks, each node's threads over its two
    nodes = TrainLaunch.of(2, 2, "node0:29500", "srun --nodes=2 --ntasks-per-node=1")
    four = with_execution_settings(config, launch=nodes, checkpoint_every=0, resume_dir=tmp_path)
    assert (four["training"]["batch_size"], four["training"]["threads"]) == (2, 2)
    assert nodes.command(run_file, "foundry-abc") == [
        "srun", "--nodes=2", "--ntasks-per-node=1", sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node=2", "--nnodes=2", "--rdzv_backend=c10d", "--rdzv_endpoint=node0:29500",
        "--rdzv_id=foundry-abc", "--max_restarts=0", "-m", "training.train", "--config", str(run_file)]
    assert nodes.env(123) == {}  # Dagster's pid means nothing on another node
    client = nodes.pipes_client(tmp_path, tmp_path / "messages.jsonl")
    assert type(client.context_injector).__name__ == "PipesEnvContextInjector"
    assert type(client.message_reader).__name__ == "PipesFileMessageReader"


@pytest.mark.parametrize("fields, message", [
    ({"nproc": 0}, r"train_nproc \(FOUNDRY_TRAIN_NPROC\) must be >= 1, got 0"),
    ({"nnodes": 2, "launcher": "srun"}, r"train_nnodes = 2 needs train_rdzv_endpoint \(FOUNDRY_TRAIN_RDZV_ENDPOINT\)"),
    ({"nnodes": 2, "rdzv_endpoint": "node0"}, r"as host:port .* got 'node0'"),
    ({"nnodes": 2, "rdzv_endpoint": "node0:29500"}, r"needs train_launcher \(FOUNDRY_TRAIN_LAUNCHER\)"),
    ({"launcher": "srun 'unclosed"}, r"train_launcher \(FOUNDRY_TRAIN_LAUNCHER\) \"srun 'unclosed\": No closing quotation"),
])
def test_bad_launch_settings_name_the_field(fields, message):
    from assets.launch import TrainLaunch

    with pytest.raises(ValueError, match=message):
        TrainLaunch.of(**{"nproc": 1, **fields})


def test_the_resource_reads_the_launch_from_the_environment(monkeypatch):
    from assets.resources import FoundryResource

    monkeypatch.setenv("FOUNDRY_TRAIN_NNODES", "2")
    monkeypatch.setenv("FOUNDRY_TRAIN_RDZV_ENDPOINT", "10.0.0.1:29400")
    monkeypatch.setenv("FOUNDRY_TRAIN_LAUNCHER", "srun --nodes=2")
    launch = FoundryResource().train_launch()
    assert (launch.nnodes, launch.rdzv_endpoint, launch.launcher) == (2, "10.0.0.1:29400", ("srun", "--nodes=2"))


def test_two_nodes_rendezvous_and_roll_back_together_like_one_process(tmp_path, monkeypatch):
    """A Dagster asset starts training as the checkpoint asset does on two "nodes"
    (tests/support/local_nodes.py standing in for srun): they meet at a c10d rendezvous, Pipes
    carries the context in the environment and the messages through a file; the second rank's loss
    turns NaN at step 8, so every rank rolls back to the step-6 checkpoint rank 0 wrote, exactly as
    one process on the global batch does."""
    from dagster import DagsterInstance, MaterializeResult, asset, materialize

    from assets.launch import TrainLaunch

    launcher = f"{sys.executable} {REPO / 'tests' / 'support' / 'local_nodes.py'} 2"
    launch = TrainLaunch.of(1, 2, f"127.0.0.1:{free_port()}", launcher)
    rollback = {"checkpoint_every": 3, "on_nonfinite": "rollback", "max_rollbacks": 1}
    cfg = _config(tmp_path / "nodes", batch_size=4, **rollback)  # per rank: 2 x 4 = the global 8
    nan_call = 2 * 7 + 1  # two micro-batches per step: the first forward of step 8
    env = {"OMP_NUM_THREADS": "1", "FOUNDRY_TEST_NAN_AT": f"1:{nan_call}",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "support" / "nan_fault"), str(REPO)])}
    messages: list = []

    @asset
    def checkpoint_on_two_nodes(context):  # (a local type would not resolve: future annotations)
        invocation = launch.pipes_client(REPO, tmp_path / "messages.jsonl").run(
            command=launch.command(cfg, rdzv_id="foundry-test"), context=context, env={**env, **launch.env(os.getpid())})
        messages.extend(invocation.get_custom_messages())
        return MaterializeResult()  # as the checkpoint asset: it publishes the output itself

    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with DagsterInstance.local_temp(str(home)) as instance:
        result = materialize([checkpoint_on_two_nodes], instance=instance)
        assert result.success
        logs = [e.message for e in instance.all_logs(result.run_id)]
    # rank 0 speaks for the job, from whichever "node" it landed on
    assert [m["event"] for m in messages].count("summary") == 1
    assert [m["step"] for m in messages if m["event"] == "metrics"][-1] == STEPS
    assert any("rolled back to step 6" in (line or "") for line in logs)
    assert not (tmp_path / "messages.jsonl").exists()  # Pipes removes its file

    original, calls = torch.nn.functional.cross_entropy, [0]

    def poisoned(*args, **kwargs):
        calls[0] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls[0] == nan_call else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)
    single = train_mod.main(["--config", str(_config(tmp_path / "single", batch_size=8, **rollback))])
    assert [r["step"] for r in single["rollbacks"]] == [8]

    summary = json.loads((tmp_path / "nodes" / "out" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert [(r["step"], r["to_step"]) for r in summary["rollbacks"]] == [(8, 6)]
    a = pq.read_table(tmp_path / "nodes" / "out" / "metrics.parquet").to_pydict()
    b = pq.read_table(tmp_path / "single" / "out" / "metrics.parquet").to_pydict()
    assert a["step"] == b["step"] == list(range(1, STEPS + 1))  # the rolled-back steps trained again
    assert a["rollbacks"] == b["rollbacks"] == [0] * 6 + [1] * 6
    for column in ("loss", "grad_norm", "moe_lb_loss"):
        torch.testing.assert_close(torch.tensor(a[column]), torch.tensor(b[column]), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, c=column: f"{c}: {m}")


def test_the_asset_passes_the_kernel_choice_to_the_model_config(tmp_path):
    from assets.launch import TrainLaunch
    from assets.training import with_execution_settings
    from training.config import parse_run_config

    config = {"model": {"vocab_size": 64}, "optimizer": {"name": "adamw", "lr": 1e-3},
              "training": {"steps": 10, "batch_size": 8, "seq_len": 16},
              "data": {"mixture_dir": "/m"}, "out_dir": "/o"}
    one = TrainLaunch.of(1)
    plain = with_execution_settings(config, launch=one, checkpoint_every=0, resume_dir=tmp_path)
    assert "kernels" not in plain["model"] and parse_run_config(plain).model.kernels == "reference"
    fused = with_execution_settings(config, launch=one, checkpoint_every=0, resume_dir=tmp_path, kernels="triton")
    assert parse_run_config(fused).model.kernels == "triton" and "kernels" not in config["model"]
    with pytest.raises(ValueError, match=r"FOUNDRY_KERNELS.*'cuda'"):
        with_execution_settings(config, launch=one, checkpoint_every=0, resume_dir=tmp_path, kernels="cuda")
