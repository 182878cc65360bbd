"""Optimizer construction and learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into decayed matrices and non-decayed norms/biases/embeddings.

    Decaying gains, biases or embedding rows pulls them toward zero for no benefit, so only
    2-D+ weights of non-embedding layers get weight decay. A tied output head is the embedding
    tensor itself, so it is (correctly) left undecayed too.
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # yields tied tensors once
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in embedding_ids else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _build_adamw(model: nn.Module, cfg: dict) -> torch.optim.Optimizer:
    allowed = {"name", "lr", "weight_decay", "betas", "eps"}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ValueError(f"optimizer 'adamw': unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    if "lr" not in cfg:
        raise ValueError("optimizer 'adamw': field 'lr' is required")
    lr = float(cfg["lr"])
    if not lr > 0:
        raise ValueError(f"optimizer 'adamw': lr must be positive, got {cfg['lr']!r}")
    betas = cfg.get("betas", [0.9, 0.95])
    if not isinstance(betas, (list, tuple)) or len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ValueError(f"optimizer 'adamw': betas must be two numbers in [0, 1), got {betas!r}")
    return torch.optim.AdamW(
        param_groups(model, float(cfg.get("weight_decay", 0.1))),
        lr=lr,
        betas=(float(betas[0]), float(betas[1])),
        eps=float(cfg.get("eps", 1e-8)),
    )


def _build_muon(model: nn.Module, cfg: dict) -> torch.optim.Optimizer:
    from training.muon import build_muon

    return build_muon(model, cfg)


# name -> builder(model, cfg). A new optimizer is added by writing a builder and registering it
# here. A builder gets the config without the keys every optimizer shares (COMMON_FIELDS) and
# makes its own parameter split (Muon: hidden matrices vs the rest). Shampoo/SOAP would follow
# Muon's pattern: one torch.optim.Optimizer whose groups say which update rule they take, so
# the trainer, the lr schedule (per-group peak lr) and checkpointing need nothing new.
OPTIMIZERS: dict[str, Callable[[nn.Module, dict], torch.optim.Optimizer]] = {
    "adamw": _build_adamw,
    "muon": _build_muon,
}

# Keys any optimizer config may carry, handled by the trainer rather than the optimizer.
# qk_clip_tau: QK-clip threshold on the max attention logit (None / absent = off); see training.qk_clip.
COMMON_FIELDS = ("qk_clip_tau",)


def qk_clip_tau(cfg: dict) -> float | None:
    """The QK-clip threshold of an optimizer config, validated; None when off."""
    tau = cfg.get("qk_clip_tau") if isinstance(cfg, dict) else None
    if tau is None:
        return None
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not tau > 0:
        raise ValueError(f"qk_clip_tau must be a positive number or null, got {tau!r}")
    return float(tau)


def build_optimizer(model: nn.Module, cfg: dict) -> torch.optim.Optimizer:
    if not isinstance(cfg, dict):
        raise ValueError(f"optimizer config must be a JSON object, got {type(cfg).__name__}")
    name = cfg.get("name")
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer name {name!r}; supported: {sorted(OPTIMIZERS)}")
    qk_clip_tau(cfg)  # validate
    return OPTIMIZERS[name](model, {k: v for k, v in cfg.items() if k not in COMMON_FIELDS})


SCHEDULES = ("cosine", "constant", "wsd")
WSD_DECAY_FRACTION = 0.2  # warmup-stable-decay: linear decay over the last 20% of steps


def lr_at(
    step: int,
    total_steps: int,
    peak_lr: float,
    warmup_steps: int,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.1,
) -> float:
    """Learning rate for 0-based `step` of a `total_steps` run.

    All schedules warm up linearly, reaching peak_lr at step warmup_steps - 1. "cosine" then
    decays to min_lr_ratio * peak_lr, reached exactly at the last step; "constant" holds the peak;
    "wsd" holds the peak and decays linearly to min_lr_ratio * peak_lr over the last 20% of steps.
    Steps past the end keep the final value.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; supported: {list(SCHEDULES)}")
    if total_steps <= 0 or warmup_steps < 0 or step < 0:
        raise ValueError(f"need total_steps > 0, warmup_steps >= 0, step >= 0; got {total_steps}, {warmup_steps}, {step}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    min_lr = min_lr_ratio * peak_lr
    last = total_steps - 1

    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak_lr
    if schedule == "cosine":
        span = last - warmup_steps
        progress = 1.0 if span <= 0 else min(1.0, (step - warmup_steps) / span)
        return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # wsd
    decay_steps = max(1, round(WSD_DECAY_FRACTION * total_steps))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return peak_lr
    progress = min(1.0, (step - decay_start + 1) / decay_steps)  # first decay step already below peak
    return peak_lr + (min_lr - peak_lr) * progress
