"""Resumable training state: all a run killed at any moment needs to continue exactly.

    resume_dir/step_00000040/
        model.safetensors, config.json   the weights (training.checkpoint; loadable on their own)
        state.pt                         optimizer state (Muon momentum buffers included), RNG
                                         states (python, numpy, torch CPU and CUDA), the data
                                         stream position, the metrics rows so far, the spike
                                         guard's and expert-load windows, the NaN/inf rollbacks
                                         so far, and the run's identity
    resume_dir/kept/step_00000020/       weights kept for good (training.keep_every; training.kept_steps)

state.pt is written with torch.save and read back only with torch.load(weights_only=True):
tensors and plain containers, never pickled code. A step directory is filled under a temp name
and renamed into place, so any `step_*` directory is complete; older ones are deleted after the
new one is in place. The trainer resumes from the newest; with training.on_nonfinite = "rollback"
it also rolls back to the newest, and a run that starts from scratch first saves step 0 (the
initial state) so there is one to roll back to before the first periodic checkpoint.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from training.atomic import atomic_path
from training.checkpoint import load_weights_into, save_checkpoint
from training.model import Transformer

STATE_FILE = "state.pt"
STEP_PREFIX = "step_"
FORMAT = 1  # bump when the layout of state.pt changes


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def _step_of(path: Path) -> int | None:
    digits = path.name[len(STEP_PREFIX):]
    return int(digits) if path.name.startswith(STEP_PREFIX) and digits.isdigit() and path.is_dir() else None


def latest(resume_dir: Path | None) -> Path | None:
    """The newest complete step directory under resume_dir, or None."""
    if resume_dir is None or not Path(resume_dir).is_dir():
        return None
    found = [(s, p) for p in Path(resume_dir).iterdir() if (s := _step_of(p)) is not None]
    return max(found)[1] if found else None


# -- random number generators ------------------------------------------------------------------


def capture_rng() -> dict:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        # numpy's uint32 key array as int64 (a tensor survives weights_only loading)
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- save / load ---------------------------------------------------------------------------------


def save(resume_dir: Path, step: int, model: Transformer, state: dict, model_extra: dict | None = None) -> Path:
    """Write step `step`'s directory (weights + state.pt) atomically, then drop older steps."""
    resume_dir = Path(resume_dir)
    resume_dir.mkdir(parents=True, exist_ok=True)
    final = resume_dir / step_dir_name(step)
    tmp = resume_dir / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(tmp, model, extra=model_extra)
    with atomic_path(tmp / STATE_FILE) as t:
        torch.save({"format": FORMAT, "step": step, **state}, t)
    if final.exists():  # the same step saved by an earlier, killed attempt
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(resume_dir)
    for p in resume_dir.iterdir():
        s = _step_of(p)
        if (s is not None and s < step) or (p.name.startswith(f".{STEP_PREFIX}") and ".tmp-" in p.name):
            shutil.rmtree(p, ignore_errors=True)  # older steps; temp dirs of killed attempts
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(ckpt_dir: Path, model: Transformer) -> dict:
    """Load the weights into `model` (in place) and return state.pt's contents."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"resume checkpoint incomplete, no {STATE_FILE}: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, or a pickled object weights_only refuses
        raise ValueError(f"{path}: unreadable resume state (corrupt or not written by training.resume): {e}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: unsupported resume state format {got!r}; expected {FORMAT}")
    load_weights_into(model, ckpt_dir)
    return state


def check_same_run(state: dict, identity: dict, ckpt_dir: Path, resume_dir: Path) -> None:
    """Refuse to continue a checkpoint written by a run with another model, optimizer, data or
    schedule: the result would be neither run."""
    saved = state.get("run", {})
    if saved == identity:
        return
    diffs = _differences(saved, identity)
    raise ValueError(
        f"{Path(ckpt_dir) / STATE_FILE}: written by a different run ({'; '.join(diffs[:5])}); "
        f"delete {resume_dir} to start this run from scratch"
    )


def _differences(a: object, b: object, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: checkpoint {a!r}, now {b!r}"]

