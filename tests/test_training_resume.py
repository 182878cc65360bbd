"""Exact resume: a training process SIGKILLed after a checkpoint and started again ends with the
same losses at every step and the same weights as a run never interrupted (bitwise, on CPU).

The killed run is a real `python -m training.train` process; the resumed run and the uninterrupted
one for comparison train in-process (same code, one thread each; a process start costs seconds).
The uninterrupted run saves no checkpoints, which also shows that checkpointing perturbs nothing.
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from tests.test_training import REPO, _subprocess_env, write_run
from training import resume
from training import train as train_mod
from training.config import load_run_config
from training.model import ModelConfig, Transformer

STEPS, EVERY = 120, 10

VARIANTS = {
    "adamw": ({}, {}, {}),
    "muon_qk_clip": ({"name": "muon", "lr": 1e-2, "adamw_lr": 5e-3, "qk_clip_tau": 30.0}, {}, {}),
    # MoE with global-batch balancing over 2 micro-batches: the open expert-load window and the
    # routing counts must resume too.
    "moe_muon": ({"name": "muon", "lr": 1e-2}, {"moe_experts": 4, "moe_top_k": 2, "moe_ffn_hidden": 16,
                                                  "moe_lb_scope": "global_batch"}, {"grad_accum_steps": 2}),
}


def _config(tmp_path: Path, optimizer: dict, model: dict, training: dict, **more) -> Path:
    path = write_run(tmp_path, steps=STEPS, log_every=7, **training, **more)
    run = json.loads(path.read_text())
    if optimizer:
        run["optimizer"] = optimizer
    run["model"].update(model)
    path.write_text(json.dumps(run))
    return path


def _kill_after_first_checkpoint(cfg: Path, resume_dir: Path, log: Path) -> None:
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "training.train", "--config", str(cfg)], cwd=REPO,
                                env=_subprocess_env(), stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 120
        while proc.poll() is None and resume.latest(resume_dir) is None and time.time() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{log.read_text()}"


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sigkilled_run_resumes_bitwise(tmp_path, capsys, variant):
    optimizer, model, training = VARIANTS[variant]
    cfg = _config(tmp_path / "killed", optimizer, model, training, checkpoint_every=EVERY)
    out, resume_dir = tmp_path / "killed" / "out", tmp_path / "killed" / "out" / "resume"
    _kill_after_first_checkpoint(cfg, resume_dir, tmp_path / "killed.log")
    assert not (out / "summary.json").exists()
    killed_at = int(resume.latest(resume_dir).name.split("_")[1])
    assert killed_at % EVERY == 0 and 0 < killed_at < STEPS

    summary = train_mod.main(["--config", str(cfg)])  # resumed here (in-process saves a startup)
    log = capsys.readouterr().err
    assert f"resuming from checkpoint {resume_dir / resume.step_dir_name(killed_at)} at step {killed_at}/{STEPS}" in log
    assert summary["resumed_from_step"] == killed_at

    clean_cfg = _config(tmp_path / "clean", optimizer, model, training)
    clean = train_mod.main(["--config", str(clean_cfg)])
    clean_out = tmp_path / "clean" / "out"
    assert not (clean_out / "resume").exists()

    resumed_m = pq.read_table(out / "metrics.parquet").to_pydict()
    clean_m = pq.read_table(clean_out / "metrics.parquet").to_pydict()
    assert resumed_m["step"] == list(range(1, STEPS + 1))
    for column in ("loss", "lr", "grad_norm", "max_attn_logit", "moe_lb_loss", "moe_z_loss", "tokens", "skipped"):
        assert resumed_m[column] == clean_m[column], column  # exact, every step
    assert summary["final_loss"] == clean["final_loss"]
    a, b = _weights(out), _weights(clean_out)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    if model.get("moe_experts"):
        assert pq.read_table(out / "expert_load.parquet").equals(pq.read_table(clean_out / "expert_load.parquet"))


# ------------------------------------------------------------------ the state file on its own


def test_rng_round_trip():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = resume.capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    resume.restore_rng(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def _saved_state(tmp_path: Path, **training) -> tuple[Path, Path]:
    cfg = write_run(tmp_path, steps=4, checkpoint_every=2, **training)
    train_mod.main(["--config", str(cfg)])
    return cfg, resume.latest(tmp_path / "out" / "resume")


def test_checkpoint_holds_optimizer_data_and_rng_and_keeps_only_the_newest(tmp_path):
    cfg, ckpt = _saved_state(tmp_path)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["step_00000002"]  # step 4 = the end: not saved
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors", "state.pt"]
    model = Transformer(ModelConfig.from_dict(json.loads((ckpt / "config.json").read_text())["model"]))
    state = resume.load(ckpt, model)  # weights_only loading: tensors and plain containers only
    assert state["step"] == 2 and state["data"]["windows_consumed"] == 2 * 8
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {2}
    assert set(state["rng"]) == {"python", "numpy", "torch", "cuda"}
    assert [r["step"] for r in state["metrics"]] == [1, 2]
    assert state["run"] == {**load_run_config(cfg).identity(), "world_size": 1}

    resume.save(ckpt.parent, 3, model, {**state, "step": 3})
    assert [p.name for p in ckpt.parent.iterdir()] == ["step_00000003"]  # the older one is gone


def test_corrupt_state_is_refused_with_its_path(tmp_path):
    cfg, ckpt = _saved_state(tmp_path)
    state_file = ckpt / resume.STATE_FILE
    state_file.write_bytes(state_file.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match=r"state\.pt: unreadable resume state"):
        train_mod.main(["--config", str(cfg)])
    assert "unreadable resume state" in (tmp_path / "out" / "FAILED.txt").read_text()

    (ckpt / "model.safetensors").write_bytes(b"\x00" * 64)
    state_file.unlink()
    with pytest.raises(FileNotFoundError, match="no state.pt"):
        train_mod.main(["--config", str(cfg)])


def test_pickled_code_in_the_state_file_is_refused(tmp_path):
    cfg, ckpt = _saved_state(tmp_path)
    torch.save({"format": resume.FORMAT, "payload": Path("/etc")}, ckpt / resume.STATE_FILE)  # an arbitrary class
    with pytest.raises(ValueError, match="unreadable resume state"):
        train_mod.main(["--config", str(cfg)])


def test_a_changed_run_does_not_resume_a_foreign_checkpoint(tmp_path):
    cfg, _ = _saved_state(tmp_path)
    run = json.loads(cfg.read_text())
    run["training"]["steps"] = 6
    run["optimizer"]["lr"] = 2e-2
    run["training"]["threads"] = 2  # an execution knob: allowed to change
    cfg.write_text(json.dumps(run))
    with pytest.raises(ValueError, match=r"written by a different run \(optimizer\.lr: checkpoint 0\.01, now 0\.02; "
                                         r"training\.steps: checkpoint 4, now 6\); delete .*resume to start"):
        train_mod.main(["--config", str(cfg)])


def test_resume_config_validation(tmp_path):
    with pytest.raises(ValueError, match=r"training\.checkpoint_every must be an integer >= 0, got -1"):
        train_mod.main(["--config", str(write_run(tmp_path / "a", checkpoint_every=-1))])
    cfg = write_run(tmp_path / "b")
    run = json.loads(cfg.read_text())
    run["resume_dir"] = 5
    cfg.write_text(json.dumps(run))
    with pytest.raises(ValueError, match="RUN.json: resume_dir must be a path string"):
        train_mod.main(["--config", str(cfg)])


# ------------------------------------------------------------------ fault drill through Dagster


@pytest.mark.slow
def test_sigkilled_sync_resumes_training_from_its_checkpoint(tmp_path):
    """`foundry sync` SIGKILLed (its whole process group) while training; the next sync resumes
    the training from its last checkpoint, and the published checkpoint equals a clean run's.
    The second sync is stopped once the checkpoint is published (evaluation would only cost time)."""
    import os

    import yaml

    from tests.recipes import tiny_recipe

    steps = 150
    recipe = tiny_recipe("drill")
    del recipe["sources"]["commoncrawl"]  # one small source is enough here
    recipe["sources"]["fineweb"]["limit"] = 40
    recipe["mixture"]["weights"] = {"fineweb": 1.0}
    recipe["training"].update(steps=steps, log_every=50)
    recipe["contamination"] = None
    path = tmp_path / "drill.yaml"
    path.write_text(yaml.safe_dump(recipe))
    store = tmp_path / "store"
    env = dict(os.environ, FOUNDRY_STORE=str(store), FOUNDRY_WORKERS="1", FOUNDRY_CHECKPOINT_EVERY="10",
               DAGSTER_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "-m", "assets.cli", "sync", "--recipe", str(path)]

    def sync_until(done, log: Path) -> subprocess.Popen:
        with open(log, "w") as err:  # its own process group: the trainer is in it too
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                    start_new_session=True)
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline and not done():
            time.sleep(0.01)
        assert proc.poll() is None, f"sync ended early:\n{log.read_text()[-3000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return proc

    sync_until(lambda: list(store.glob("resume/checkpoint/*/step_*")), tmp_path / "sync1.log")
    killed_at = max(int(p.name.split("_")[1]) for p in store.glob("resume/checkpoint/*/step_*"))
    assert killed_at < steps
    assert not [p for p in (store / "checkpoint").iterdir() if not p.name.startswith(".")], "nothing published"

    log2 = tmp_path / "sync2.log"
    sync_until(lambda: "drill/checkpoint (ran)" in log2.read_text(), log2)
    log = log2.read_text()
    resumed_at = re.search(rf"resuming from checkpoint \S+ at step (\d+)/{steps}", log)
    assert resumed_at and int(resumed_at[1]) >= killed_at, log[-3000:]
    assert f"training resumed at step {resumed_at[1]}" in log
    [published] = [p for p in (store / "checkpoint").iterdir() if not p.name.startswith(".")]
    assert not (store / "resume" / "checkpoint" / published.name).exists(), "resume state left after success"

    # a clean, uninterrupted run of the same RUN.json (read back from the published config.json)
    meta = json.loads((published / "config.json").read_text())
    training = {k: v for k, v in meta["training"].items() if k != "checkpoint_every"}
    clean_cfg = tmp_path / "clean.json"
    clean_cfg.write_text(json.dumps({"model": meta["model"], "optimizer": meta["optimizer"], "training": training,
                                     "data": meta["data"], "out_dir": str(tmp_path / "clean")}))
    train_mod.main(["--config", str(clean_cfg)])
    a, b = _weights(published), _weights(tmp_path / "clean")
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    resumed_loss = pq.read_table(published / "metrics.parquet").column("loss").to_pylist()
    clean_loss = pq.read_table(tmp_path / "clean" / "metrics.parquet").column("loss").to_pylist()
    assert len(resumed_loss) == steps
    np.testing.assert_allclose(resumed_loss, clean_loss, rtol=1e-6)


def test_stream_position_from_another_window_layout_is_refused(tmp_path):
    from training.data import MixtureTokenStream

    cfg = write_run(tmp_path, steps=2)
    mix = load_run_config(cfg).mixture_dir
    saved = MixtureTokenStream(mix, batch_size=2, seq_len=16)
    saved.next_batch()
    other = MixtureTokenStream(mix, batch_size=2, seq_len=8)
    with pytest.raises(ValueError, match=r"saved stream position counts windows with windows_per_epoch=\d+, but this "
                                         r"stream has windows_per_epoch=\d+"):
        other.load_state_dict(saved.state_dict())
    same = MixtureTokenStream(mix, batch_size=2, seq_len=16)
    same.load_state_dict(saved.state_dict())
    assert same.next_batch()[0].tolist() == saved.next_batch()[0].tolist()
