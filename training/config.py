"""RUN.json: the one file that describes a training run.

    {"model": {ModelConfig fields}, "optimizer": {"name": "adamw", ...},
     "training": {TrainingConfig fields}, "data": {"mixture_dir": "/abs/mixture"}, "out_dir": "/abs/out"}

Relative paths are resolved against the directory holding RUN.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from training.model import ModelConfig
from training.optim import SCHEDULES


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

    def to_dict(self) -> dict:
        return {
            "model": self.model.to_dict(),
            "optimizer": self.optimizer,
            "training": {f.name: getattr(self.training, f.name) for f in fields(TrainingConfig)},
            "data": {"mixture_dir": str(self.mixture_dir)},
            "out_dir": str(self.out_dir),
        }


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
    _check_keys(d, {"model", "optimizer", "training", "data", "out_dir"}, source)

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

    return RunConfig(model, optimizer, training, resolve(data["mixture_dir"]), resolve(d["out_dir"]), source)


def load_run_config(path: Path) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"run config not found: {path}")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e
    return parse_run_config(d, source=str(path), base_dir=path.parent.resolve())
