"""Muon: momentum orthogonalised by Newton–Schulz for hidden 2-D weights, AdamW for the rest.

One `torch.optim.Optimizer` holds both kinds of parameter group (``use_muon`` True/False), so a
run has a single optimizer state to checkpoint and a single `step()`:

* Muon groups — the 2-D weight matrices inside the transformer blocks (attention q/k/v/o, the
  SwiGLU projections, and each MoE expert's projections, orthogonalised expert by expert). Per
  step: ``buf = mu * buf + (1 - mu) * g``; the update direction is ``g + mu * (buf - g)`` with
  Nesterov, else ``buf``; it is replaced by the nearest
  semi-orthogonal matrix (Newton–Schulz, `newton_schulz`), scaled to AdamW's typical update RMS
  (``0.2 * sqrt(max(rows, cols))``, as in Moonlight, Liu et al. 2025, so the same lr suits both
  kinds of group) and applied with decoupled weight decay: ``p -= lr * (wd * p + scale * O)``.
* AdamW groups — embeddings, the output head (tied or not), norms, any 1-D parameter, a MoE
  router (E x C) and a shared expert's gate (1 x C): parameters whose rows are looked up, scored
  or that are vectors, for which orthogonalising makes no sense. Plain AdamW with bias correction;
  weight decay on the 2-D ones (an untied head, routers, gates), matching
  `training.optim.param_groups`, none on embeddings, a tied head, norms and vectors.

Newton–Schulz runs in bfloat16 on CUDA (fast, and the iteration tolerates it) and in float32
elsewhere (CPU bf16 matmuls are slow and gain nothing). For a model built with
`ModelConfig.kernels="triton"`, `build_muon` hands the iteration `kernels.sym_matmul`, which computes
its two symmetric products (X Xᵀ and A·A = A Aᵀ) one triangle at a time.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

# Quintic Newton–Schulz coefficients (Keller Jordan's Muon): chosen to push small singular values
# up fast rather than to converge exactly, so after ~5 steps the singular values land in a band
# around 1 (roughly [0.7, 1.2]) instead of exactly 1 — good enough for an update direction.
NS_COEFFS = (3.4445, -4.7750, 2.0315)

MUON_DEFAULTS = {"momentum": 0.95, "nesterov": True, "ns_steps": 5}
# Parameters whose name contains one of these always go to AdamW (a MoE router and the shared
# expert's gate are 2-D but tiny, and their rows are scores, not a hidden linear map).
ADAMW_NAME_PARTS = ("router", "shared_expert_gate")


def newton_schulz(
    g: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype | None = None, sym_matmul=None
) -> torch.Tensor:
    """Approximately orthogonalise a 2-D matrix: U V^T of its SVD U S V^T, with S pushed toward 1.

    Works on the wide orientation (rows <= cols) so X X^T is the smaller Gram matrix; returns the
    input's shape and dtype. sym_matmul: `kernels.sym_matmul` (alpha * x x^T + beta * add, one
    triangle computed) for the symmetric products, or None for plain matmuls.
    """
    if g.ndim != 2:
        raise ValueError(f"newton_schulz expects a 2-D matrix, got shape {tuple(g.shape)}")
    if dtype is None:
        dtype = torch.bfloat16 if g.is_cuda else torch.float32
    a, b, c = NS_COEFFS
    x = g.to(dtype)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T  # [m, n] with m <= n
    x = x / (x.norm() + eps)  # spectral norm <= Frobenius norm = 1, so the iteration converges
    for _ in range(steps):
        if sym_matmul is None:
            gram = x @ x.T  # [m, m]
            poly = b * gram + c * (gram @ gram)  # [m, m]
        else:  # gram is symmetric, so gram @ gram = gram @ gram^T: both products are symmetric
            gram = sym_matmul(x)  # [m, m]
            poly = sym_matmul(gram, alpha=c, beta=b, add=gram)  # [m, m]
        x = a * x + poly @ x  # [m, n]
    if transposed:
        x = x.T
    return x.to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for groups with ``use_muon=True``, AdamW for the others (see the module docstring).

    Group options: lr, weight_decay, use_muon; Muon groups: momentum, nesterov, ns_steps;
    AdamW groups: betas, eps. sym_matmul: see `newton_schulz` (not a group option: it is how, not
    what, so it stays out of the state dict).
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        sym_matmul=None,
    ):
        self.sym_matmul = sym_matmul
        defaults = dict(
            lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay,
            betas=betas, eps=eps, use_muon=False,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["use_muon"]:
                bad = [tuple(p.shape) for p in group["params"] if p.ndim != 2]
                if bad:
                    raise ValueError(f"Muon groups take 2-D matrices only, got shapes {bad}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(g, 1 - mu)  # buf = mu * buf + (1 - mu) * g
            update = g.lerp(buf, mu) if group["nesterov"] else buf
            o = newton_schulz(update, steps=group["ns_steps"], sym_matmul=self.sym_matmul)
            scale = 0.2 * math.sqrt(max(p.shape))  # match AdamW's update RMS (~0.2)
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(o, alpha=-lr * scale)

    def _adamw_step(self, group: dict) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            state = self.state[p]
            if "step" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = state["step"]
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v / (1 - beta2**t)).sqrt_().add_(eps)
            if wd:
                p.mul_(1 - lr * wd)
            p.addcdiv_(m, denom, value=-lr / (1 - beta1**t))


def split_params(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """(name, param) lists: "muon" (hidden 2-D matrices), "adamw_decay" (an untied output head and
    other 2-D non-hidden weights), "adamw_no_decay" (embeddings, a tied head, norms, 1-D)."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "lm_head", None)
    head_id = id(head.weight) if head is not None else None
    out: dict[str, list[tuple[str, nn.Parameter]]] = {"muon": [], "adamw_decay": [], "adamw_no_decay": []}
    for name, p in model.named_parameters():  # yields tied tensors once
        if not p.requires_grad:
            continue
        if p.ndim < 2 or id(p) in embedding_ids:
            out["adamw_no_decay"].append((name, p))
        elif id(p) == head_id or any(part in name for part in ADAMW_NAME_PARTS) or p.ndim != 2:
            out["adamw_decay"].append((name, p))
        else:
            out["muon"].append((name, p))
    return out


def _number(cfg: dict, key: str, default, *, minimum: float, strict: bool, upper: float | None = None) -> float:
    value = cfg.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"optimizer 'muon': {key} must be a number, got {value!r}")
    if value < minimum or (strict and value == minimum) or (upper is not None and value >= upper):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ValueError(f"optimizer 'muon': {key} must be {bound}" + (f" and < {upper}" if upper else "") + f", got {value!r}")
    return float(value)


MUON_FIELDS = {"name", "lr", "adamw_lr", "momentum", "nesterov", "ns_steps", "weight_decay", "betas", "eps"}


def build_muon(model: nn.Module, cfg: dict) -> Muon:
    """`{"name": "muon", "lr", "adamw_lr"?, "momentum"?, "nesterov"?, "ns_steps"?, "weight_decay"?,
    "betas"?, "eps"?}`; adamw_lr (for the AdamW groups) defaults to lr."""
    unknown = sorted(set(cfg) - MUON_FIELDS)
    if unknown:
        raise ValueError(f"optimizer 'muon': unknown field(s) {unknown}; allowed: {sorted(MUON_FIELDS)}")
    if "lr" not in cfg:
        raise ValueError("optimizer 'muon': field 'lr' is required")
    lr = _number(cfg, "lr", None, minimum=0, strict=True)
    adamw_lr = _number(cfg, "adamw_lr", lr, minimum=0, strict=True)
    momentum = _number(cfg, "momentum", MUON_DEFAULTS["momentum"], minimum=0, strict=False, upper=1)
    weight_decay = _number(cfg, "weight_decay", 0.1, minimum=0, strict=False)
    eps = _number(cfg, "eps", 1e-8, minimum=0, strict=True)
    nesterov = cfg.get("nesterov", MUON_DEFAULTS["nesterov"])
    if not isinstance(nesterov, bool):
        raise ValueError(f"optimizer 'muon': nesterov must be true or false, got {nesterov!r}")
    ns_steps = cfg.get("ns_steps", MUON_DEFAULTS["ns_steps"])
    if not isinstance(ns_steps, int) or isinstance(ns_steps, bool) or ns_steps < 1:
        raise ValueError(f"optimizer 'muon': ns_steps must be an integer >= 1, got {ns_steps!r}")
    betas = cfg.get("betas", [0.9, 0.95])
    if not isinstance(betas, (list, tuple)) or len(betas) != 2 or not all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas
    ):
        raise ValueError(f"optimizer 'muon': betas must be two numbers in [0, 1), got {betas!r}")

    split = split_params(model)
    groups = [
        {"params": [p for _, p in split["muon"]], "use_muon": True, "lr": lr, "weight_decay": weight_decay,
         "name": "muon"},
        {"params": [p for _, p in split["adamw_decay"]], "use_muon": False, "lr": adamw_lr,
         "weight_decay": weight_decay, "name": "adamw_decay"},
        {"params": [p for _, p in split["adamw_no_decay"]], "use_muon": False, "lr": adamw_lr, "weight_decay": 0.0,
         "name": "adamw_no_decay"},
    ]
    groups = [g for g in groups if g["params"]]
    # A model built with kernels="triton" (and able to run them) carries the Triton ops.
    ops = getattr(getattr(model, "module", model), "kernel_ops", None)  # .module: under DDP
    return Muon(
        groups, lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay,
        betas=(float(betas[0]), float(betas[1])), eps=eps, sym_matmul=ops.sym_matmul if ops is not None else None,
    )
