"""Loss-spike handling: skip the optimizer step of a batch whose loss (or gradient norm) jumps far
above the recent median, as PaLM did, instead of letting one bad batch wreck the weights.

training.skip_spikes in RUN.json (absent or null = off):

    {"factor": 3.0, "window": 20, "max_skips": 10, "grad_norm_factor": null}

A step is a spike when its loss exceeds factor x the median loss of the last `window` steps that
were applied (or, with grad_norm_factor, its gradient norm exceeds grad_norm_factor x their median
gradient norm). Checking starts once `window` applied steps are known, so the fast early descent
and its rising gradient norms are never judged. A skipped step still consumes its batch and its
place in the lr schedule (the data stream and schedule stay aligned with an unskipped run); its
loss does not enter the window. More than max_skips skips in a run stop it with an error.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

FIELDS = ("factor", "window", "max_skips", "grad_norm_factor")


class TooManySpikes(RuntimeError):
    """More loss spikes than training.skip_spikes.max_skips allows."""


@dataclass(frozen=True)
class SpikePolicy:
    factor: float = 3.0
    window: int = 20
    max_skips: int = 10
    grad_norm_factor: float | None = None

    @classmethod
    def from_dict(cls, d: object, where: str = "training.skip_spikes") -> SpikePolicy:
        if not isinstance(d, dict):
            raise ValueError(f"{where} must be an object like {{factor: 3.0, window: 20, max_skips: 10}}, got {d!r}")
        unknown = sorted(set(d) - set(FIELDS))
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; allowed: {list(FIELDS)}")
        policy = cls(**d)
        for name in ("factor", "grad_norm_factor"):
            value = getattr(policy, name)
            if value is None and name == "grad_norm_factor":
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 1:
                raise ValueError(f"{where}.{name} must be a number > 1, got {value!r}")
        for name, minimum in (("window", 1), ("max_skips", 0)):
            value = getattr(policy, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{where}.{name} must be an integer >= {minimum}, got {value!r}")
        return policy


class SpikeGuard:
    """Decides, step by step, whether to apply the update; its state goes into resume checkpoints."""

    def __init__(self, policy: SpikePolicy):
        self.policy = policy
        self.losses: deque[float] = deque(maxlen=policy.window)
        self.grad_norms: deque[float] = deque(maxlen=policy.window)
        self.skips = 0

    def check(self, step: int, loss: float, grad_norm: float) -> str | None:
        """None to apply this step's update, else why it is skipped (the step is then counted).
        Raises TooManySpikes past max_skips."""
        p = self.policy
        reason = None
        if len(self.losses) == p.window:
            median_loss = statistics.median(self.losses)
            if loss > p.factor * median_loss:
                reason = f"loss {loss:.4f} > {p.factor:g} x median {median_loss:.4f} of the last {p.window} steps"
            elif p.grad_norm_factor is not None:
                median_norm = statistics.median(self.grad_norms)
                if grad_norm > p.grad_norm_factor * median_norm:
                    reason = (f"grad norm {grad_norm:.4f} > {p.grad_norm_factor:g} x median {median_norm:.4f} "
                              f"of the last {p.window} steps")
        if reason is None:
            self.losses.append(loss)
            self.grad_norms.append(grad_norm)
            return None
        self.skips += 1
        if self.skips > p.max_skips:
            raise TooManySpikes(
                f"step {step}: {reason}; that is {self.skips} skipped steps, more than "
                f"training.skip_spikes.max_skips={p.max_skips}; stopping the run"
            )
        return reason

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "grad_norms": list(self.grad_norms), "skips": self.skips}

    def load_state_dict(self, state: dict) -> None:
        self.losses = deque((float(v) for v in state["losses"]), maxlen=self.policy.window)
        self.grad_norms = deque((float(v) for v in state["grad_norms"]), maxlen=self.policy.window)
        self.skips = int(state["skips"])
