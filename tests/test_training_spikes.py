"""Loss-spike handling: a step whose loss jumps far above the running median is not applied, is
marked in train_metrics' `skipped` column, and too many of them stop the run."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from tests.test_training import write_run
from training import train as train_mod
from training.spikes import SpikeGuard, SpikePolicy, TooManySpikes

POLICY = {"factor": 3.0, "window": 10, "max_skips": 2}


@pytest.fixture
def spike_at(monkeypatch):
    """spike_at({25, 40}): the loss (and so its gradient) of those steps is multiplied by 10, as a
    corrupt batch would do. One cross-entropy call per step (no gradient accumulation)."""

    def inject(steps: set[int]) -> None:
        original = torch.nn.functional.cross_entropy
        calls = {"n": 0}

        def spiky(*args, **kwargs):
            calls["n"] += 1
            loss = original(*args, **kwargs)
            return loss * 10 if calls["n"] in steps else loss

        monkeypatch.setattr(torch.nn.functional, "cross_entropy", spiky)

    return inject


def _run(tmp_path, steps: int, **training):
    # constant lr: a run of N-1 steps is the first N-1 steps of a run of N
    return write_run(tmp_path, steps=steps, schedule="constant", log_every=50, **training)


def test_a_spike_step_is_skipped_and_changes_nothing(tmp_path, spike_at, capsys):
    spike_at({25, 40})
    summary = train_mod.main(["--config", str(_run(tmp_path / "a", 40, skip_spikes=POLICY))])
    m = pq.read_table(tmp_path / "a" / "out" / "metrics.parquet").to_pydict()
    assert [s for s, skipped in zip(m["step"], m["skipped"]) if skipped] == [25, 40]
    assert m["loss"][24] > 3 * max(m["loss"][14:24])  # the spike is logged as it was
    assert summary["skipped_steps"] == 2
    assert "step 25: update skipped: loss " in capsys.readouterr().err

    # Skipping the last step leaves the weights of the step before: the same as a run of 39 steps
    # with the same spike at 25 (this also shows step 25 was not applied in either).
    spike_at({25})
    train_mod.main(["--config", str(_run(tmp_path / "b", 39, skip_spikes=POLICY))])
    a, b = load_file(str(tmp_path / "a" / "out" / "model.safetensors")), load_file(str(tmp_path / "b" / "out" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    # without skipping, the spiked update is applied: the weights differ
    spike_at({25})
    train_mod.main(["--config", str(_run(tmp_path / "c", 39))])
    c = load_file(str(tmp_path / "c" / "out" / "model.safetensors"))
    assert not all(torch.equal(b[k], c[k]) for k in b)
    assert pq.read_table(tmp_path / "c" / "out" / "metrics.parquet").column("skipped").to_pylist() == [False] * 39


def test_more_spikes_than_max_skips_stop_the_run(tmp_path, spike_at):
    spike_at({25, 26, 27})
    with pytest.raises(TooManySpikes, match=r"step 27: loss \S+ > 3 x median \S+ of the last 10 steps; that is 3 "
                                             r"skipped steps, more than training\.skip_spikes\.max_skips=2"):
        train_mod.main(["--config", str(_run(tmp_path, 40, skip_spikes=POLICY))])
    assert "max_skips=2" in (tmp_path / "out" / "FAILED.txt").read_text()
    assert not (tmp_path / "out" / "summary.json").exists()


def test_skipped_steps_resume_exactly(tmp_path, spike_at):
    """The guard's window and skip count travel in the resumable checkpoint."""
    spike_at({25})
    cfg = _run(tmp_path, 30, skip_spikes=POLICY, checkpoint_every=27)
    train_mod.main(["--config", str(cfg)])
    state = torch.load(next((tmp_path / "out" / "resume").iterdir()) / "state.pt", weights_only=True)
    assert state["spikes"]["skips"] == 1 and len(state["spikes"]["losses"]) == 10
    # the optimizer stepped 26 times in 27 steps
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {26}


def test_guard_on_loss_and_grad_norm():
    guard = SpikeGuard(SpikePolicy(factor=3.0, window=3, max_skips=5, grad_norm_factor=2.0))
    assert guard.check(1, 100.0, 1.0) is None  # the window is not full yet: nothing is judged
    for step, (loss, norm) in enumerate([(2.0, 1.0), (2.2, 1.2)], start=2):
        assert guard.check(step, loss, norm) is None
    assert guard.check(4, 5.9, 1.0) is None  # 5.9 < 3 x 2.2, the median of (100, 2.0, 2.2)
    assert "loss 30.0000 > 3 x median" in guard.check(5, 30.0, 1.0)
    assert "grad norm 2.5000 > 2 x median 1.0000" in guard.check(6, 2.0, 2.5)
    assert guard.skips == 2 and list(guard.losses) == [2.0, 2.2, 5.9]  # skipped steps stay out of the window
    again = SpikeGuard(guard.policy)
    again.load_state_dict(guard.state_dict())
    assert again.check(7, 30.0, 1.0) == guard.check(7, 30.0, 1.0) and again.skips == guard.skips == 3


@pytest.mark.parametrize(
    "value, message",
    [({"factor": 1.0}, r"training\.skip_spikes\.factor must be a number > 1, got 1\.0"),
     ({"window": 0}, r"training\.skip_spikes\.window must be an integer >= 1, got 0"),
     ({"max_skips": -1}, r"training\.skip_spikes\.max_skips must be an integer >= 0"),
     ({"grad_norm_factor": "2"}, r"training\.skip_spikes\.grad_norm_factor must be a number > 1"),
     ({"factr": 2}, r"training\.skip_spikes: unknown field\(s\) \['factr'\]"),
     (3, r"training\.skip_spikes must be an object")],
)
def test_bad_skip_spikes_config_names_the_field(tmp_path, value, message):
    with pytest.raises(ValueError, match=r"RUN\.json: " + message):
        train_mod.main(["--config", str(_run(tmp_path, 5, skip_spikes=value))])


def test_recipe_identity_and_run_config():
    from assets.recipe import RecipeError, parse_recipe
    from assets.training import run_config, training_spec
    from training.config import parse_run_config

    def recipe(**training):
        return parse_recipe({"name": "unit", "sources": {"web": {"kind": "jsonl", "path": "x.jsonl"}},
                             "mixture": {"weights": {"web": 1.0}, "total_tokens": 1000}, "training": training})

    off, on = recipe(), recipe(skip_spikes={"factor": 4})
    assert "skip_spikes" not in training_spec(off)["training"]  # older recipes keep their identity
    assert training_spec(on)["training"]["skip_spikes"] == {"factor": 4.0, "window": 20, "max_skips": 10,
                                                          "grad_norm_factor": None}
    ctx = SimpleNamespace(plan=SimpleNamespace(context={"recipe": on}), foundry=SimpleNamespace(train_threads=1),
                          upstream={"mixture": SimpleNamespace(dir="/m")}, out_dir="/o")
    rc = run_config(ctx, 100)
    assert rc["training"]["skip_spikes"]["factor"] == 4.0
    assert parse_run_config(json.loads(json.dumps(rc))).training.skip_spikes["factor"] == 4.0
    with pytest.raises(RecipeError, match="skip_spikes.factor: Input should be greater than 1"):
        recipe(skip_spikes={"factor": 0.5})
