"""RUN.json: the one file that describes a training run.

    {"model": {ModelConfig fields}, "optimizer": {"name": "adamw", ...},
     "training": {TrainingConfig fields}, "data": {"mixture_dir": "/abs/mixture"}, "out_dir": "/abs/out",
     "resume_dir": "/abs/resume"}

Relative paths are resolved against the directory holding RUN.json. resume_dir (optional) is where
resumable checkpoints go when training.checkpoint_every > 0 (default: out_dir/resume); a run that
finds one there continues from it (training.resume).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from training.model import ModelConfig
from training.optim import SCHEDULES
from training.spikes import SpikePolicy

# Added after the first runs: left out of to_dict() while at these defaults, so a config.json
# of a run that does not use them looks as before.
TRAINING_OPTIONAL_DEFAULTS = {"checkpoint_every": 0, "skip_spikes": None, "keep_every": 0, "on_nonfinite": "stop",
                              "max_rollbacks": 3}
NONFINITE_ACTIONS = ("stop", "rollback")
# Execution knobs: a resumed run may change them (they do not change what is trained).
EXECUTION_FIELDS = ("threads", "checkpoint_every")


@dataclass
class TrainingConfig:
    steps: int
    batch_size: int
    seq_len: int
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping (the norm is still logged)
    seed: int = 0
    log_every: int = 10
    threads: int | None = None  # torch intra-op threads; None keeps torch's default
    device: str = "cpu"
    peak_flops: float | None = None  # hardware peak FLOP/s; when given, summary.json reports MFU
    # Micro-batches of batch_size sequences per optimizer step (gradient accumulation): a step
    # trains on batch_size * grad_accum_steps * world_size sequences.
    grad_accum_steps: int = 1
    # Save a resumable checkpoint (weights, optimizer, RNG, data position) every N steps; 0 = never.
    # An execution knob: with exact resume it changes nothing in the result.
    checkpoint_every: int = 0
    # Skip the update of loss-spike steps (training.spikes.SpikePolicy fields); None = off.
    skip_spikes: dict | None = None
    # Keep the weights of every N-th step (N, 2N, ... before the last) in out_dir/steps/step_<N>/,
    # loadable like the final checkpoint (evals follow them); 0 = keep none.
    keep_every: int = 0
    # A NaN/inf loss or gradient norm: "stop" the run, or "rollback": reload the last resumable
    # checkpoint, skip the batches from there to the bad step, and go on (at most max_rollbacks times).
    on_nonfinite: str = "stop"
    max_rollbacks: int = 3

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "log_every", "grad_accum_steps"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("warmup_steps", self.warmup_steps, minimum=0)
        _check_int("seed", self.seed, minimum=0)
        if self.threads is not None:
            _check_int("threads", self.threads, minimum=1)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"training.schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        if not _is_number(self.min_lr_ratio) or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"training.min_lr_ratio must be a number in [0, 1], got {self.min_lr_ratio!r}")
        if not _is_number(self.grad_clip) or self.grad_clip < 0:
            raise ValueError(f"training.grad_clip must be a number >= 0, got {self.grad_clip!r}")
        if self.peak_flops is not None and (not _is_number(self.peak_flops) or self.peak_flops <= 0):
            raise ValueError(f"training.peak_flops must be a positive number, got {self.peak_flops!r}")
        _check_int("checkpoint_every", self.checkpoint_every, minimum=0)
        if self.skip_spikes is not None:
            SpikePolicy.from_dict(self.skip_spikes)  # validate
        _check_int("keep_every", self.keep_every, minimum=0)
        _check_int("max_rollbacks", self.max_rollbacks, minimum=1)
        if self.on_nonfinite not in NONFINITE_ACTIONS:
            raise ValueError(f"training.on_nonfinite must be one of {list(NONFINITE_ACTIONS)}, got {self.on_nonfinite!r}")
        if self.on_nonfinite == "rollback" and self.checkpoint_every == 0:
            raise ValueError("training.on_nonfinite 'rollback' needs training.checkpoint_every > 0: "
                             "it rolls back to the last resumable checkpoint")
        if not isinstance(self.device, str):
            raise ValueError(f"training.device must be a string such as 'cpu' or 'cuda', got {self.device!r}")


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"training.{name} must be an integer >= {minimum}, got {value!r}")


@dataclass
class RunConfig:
    model: ModelConfig
    optimizer: dict
    training: TrainingConfig
    mixture_dir: Path
    out_dir: Path
    source: str  # where this config came from, for error messages
    resume_dir: Path | None = None  # resumable checkpoints: written there, resumed from there

    def to_dict(self) -> dict:
        training = {f.name: getattr(self.training, f.name) for f in fields(TrainingConfig)}
        training = {k: v for k, v in training.items()
                    if k not in TRAINING_OPTIONAL_DEFAULTS or v != TRAINING_OPTIONAL_DEFAULTS[k]}
        d = {
            "model": self.model.to_dict(),
            "optimizer": self.optimizer,
            "training": training,
            "data": {"mixture_dir": str(self.mixture_dir)},
            "out_dir": str(self.out_dir),
        }
        if self.resume_dir is not None:
            d["resume_dir"] = str(self.resume_dir)
        return d

    def identity(self) -> dict:
        """What makes two runs the same run (for resuming): everything but paths of outputs and
        execution knobs."""
        d = self.to_dict()
        d.pop("out_dir")
        d.pop("resume_dir", None)
        d["training"] = {k: v for k, v in d["training"].items() if k not in EXECUTION_FIELDS}
        return d


def _section(d: dict, key: str, source: str) -> dict:
    if key not in d:
        raise ValueError(f"{source}: missing section {key!r}")
    if not isinstance(d[key], dict):
        raise ValueError(f"{source}: section {key!r} must be a JSON object")
    return d[key]


def _check_keys(section: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")


def parse_run_config(d: dict, source: str = "<run config>", base_dir: Path | None = None) -> RunConfig:
    if not isinstance(d, dict):
        raise ValueError(f"{source}: expected a JSON object at the top level")
    _check_keys(d, {"model", "optimizer", "training", "data", "out_dir", "resume_dir"}, source)

    try:
        model = ModelConfig.from_dict(_section(d, "model", source))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: model: {e}") from e

    optimizer = _section(d, "optimizer", source)

    training_d = _section(d, "training", source)
    _check_keys(training_d, {f.name for f in fields(TrainingConfig)}, f"{source}: training")
    try:
        training = TrainingConfig(**training_d)
    except TypeError as e:  # a required field is missing
        raise ValueError(f"{source}: training: {e}") from e
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e
    if training.seq_len > model.max_seq_len:
        raise ValueError(
            f"{source}: training.seq_len ({training.seq_len}) exceeds model.max_seq_len ({model.max_seq_len})"
        )

    data = _section(d, "data", source)
    _check_keys(data, {"mixture_dir"}, f"{source}: data")
    if not isinstance(data.get("mixture_dir"), str):
        raise ValueError(f"{source}: data.mixture_dir must be a path string")
    if not isinstance(d.get("out_dir"), str):
        raise ValueError(f"{source}: out_dir must be a path string")

    def resolve(p: str) -> Path:
        path = Path(p)
        return path if path.is_absolute() or base_dir is None else base_dir / path

    if d.get("resume_dir") is not None and not isinstance(d["resume_dir"], str):
        raise ValueError(f"{source}: resume_dir must be a path string")
    out_dir = resolve(d["out_dir"])
    resume_dir = resolve(d["resume_dir"]) if d.get("resume_dir") else None
    if resume_dir is None and training.checkpoint_every > 0:
        resume_dir = out_dir / "resume"
    return RunConfig(model, optimizer, training, resolve(data["mixture_dir"]), out_dir, source, resume_dir)


def load_run_config(path: Path) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"run config not found: {path}")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e
    return parse_run_config(d, source=str(path), base_dir=path.parent.resolve())
