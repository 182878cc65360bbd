"""Intermediate checkpoints that are kept (training.keep_every): the weights of every N-th step.

    out_dir/steps/step_00000040/model.safetensors + config.json   {"model": ..., "step": 40, "tokens": ...}

Weights only (training.checkpoint's format, so `load_checkpoint` and the evals read them like the
final checkpoint); the full training state for resuming stays in training.resume.

While training, they are written where a killed run keeps them — `resume_dir/kept/` when the run
has a resume_dir, else straight into out_dir/steps/ — each step directory filled under a temp
name and renamed into place. `publish` links (or copies) them into out_dir/steps/ at the end, so
a run killed after that and resumed still finds every kept step of its first attempt.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from training.checkpoint import save_checkpoint
from training.model import Transformer
from training.resume import STEP_PREFIX, step_dir_name

STEPS_DIR = "steps"  # inside out_dir
KEPT_IN_RESUME = "kept"  # inside resume_dir


def kept_root(out_dir: Path, resume_dir: Path | None) -> Path:
    return Path(resume_dir) / KEPT_IN_RESUME if resume_dir is not None else Path(out_dir) / STEPS_DIR


def is_kept(step: int, keep_every: int, last_step: int) -> bool:
    """Steps N, 2N, ... before the last one (the last one is the checkpoint itself)."""
    return keep_every > 0 and step % keep_every == 0 and step < last_step


def save(root: Path, step: int, model: Transformer, tokens: int) -> Path:
    """Write one step's weights atomically (a killed run's partial directory is never seen)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(tmp, model, extra={"step": step, "tokens": tokens})
    if final.exists():  # the same step trained again after a resume or a rollback
        shutil.rmtree(final)
    os.rename(tmp, final)
    return final


def steps_in(root: Path) -> list[int]:
    """Complete kept steps under root, in order (temp directories are not listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        digits = p.name[len(STEP_PREFIX):]
        if p.is_dir() and p.name.startswith(STEP_PREFIX) and digits.isdigit():
            found.append(int(digits))
    return sorted(found)


def publish(root: Path, out_dir: Path, keep: list[int]) -> list[int]:
    """Put the kept steps `keep` into out_dir/steps/ (hard links where the filesystem allows)."""
    target = Path(out_dir) / STEPS_DIR
    root = Path(root)
    missing = [s for s in keep if not (root / step_dir_name(s)).is_dir()]
    if missing:
        raise FileNotFoundError(f"kept checkpoints of steps {missing} are missing from {root}")
    if root.resolve() == target.resolve():
        return keep
    target.mkdir(parents=True, exist_ok=True)
    for step in keep:
        dst = target / step_dir_name(step)
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(root / step_dir_name(step), dst, copy_function=_link_or_copy)
    return keep


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # no second copy of the weights on disk
    except OSError:
        shutil.copy2(src, dst)
