"""Mixture-of-Experts feed-forward layer, its auxiliary losses, and expert-load bookkeeping.

Routing (one choice, matched exactly by the Hugging Face export to Qwen2-MoE):

* A linear router (d_model -> n_experts, no bias) gives logits; ``probs = softmax(logits)`` over
  ALL experts, in float32. Each token goes to its ``top_k`` most probable experts.
* Its combine weights are those k probabilities, renormalised to sum to 1 when ``norm_topk`` is
  on (the default); that is exactly a softmax over the k selected logits (Mixtral, Qwen3-MoE).
  With ``norm_topk`` off the weights are the raw probabilities (Switch, Qwen1.5-MoE, OLMoE).
  Note: with top_k = 1 and ``norm_topk`` on the weight is always 1, so the router then learns only
  from the auxiliary losses; turn ``norm_topk`` off for Switch-style top-1.
* Optional shared expert (Qwen2-MoE style): a SwiGLU applied to every token, scaled by a learned
  per-token gate ``sigmoid(shared_expert_gate(x))`` and added to the routed output.
* Dropless: every token reaches its k experts (no capacity factor). Dispatch sorts the (token,
  slot) pairs by expert, runs each expert once on its contiguous chunk, and scatter-adds the
  weighted results back (`dispatch`).

Auxiliary losses (their coefficients live in ModelConfig; the model averages them over its MoE
layers, so a coefficient does not scale with depth):

* Load balancing (Switch / GShard): ``E * sum_e f_e * P_e``, where ``f_e = counts_e / sum(counts)``
  is the fraction of the k*N routing slots that chose expert e (not differentiable) and ``P_e`` is
  the mean router probability of e (differentiable). It is 1 at perfect balance.
* Router z-loss (ST-MoE): ``mean(logsumexp(logits)^2)`` over tokens.

Global-batch load balancing. The global loss over all micro-batches m (and data-parallel ranks)
of one optimizer step is ``E * sum_e f_e^G * P_e^G``. With equal-sized micro-batches,
``P^G = mean_m P^m``, so

    L^G = mean_m [ E * sum_e f_e^G * P_e^m ]

That is: each micro-batch forms the usual loss from its OWN differentiable ``P^m`` but the
GLOBAL, constant ``f^G``, and the trainer's usual 1/M scaling (and data-parallel gradient
averaging) sums these into exactly the global loss and its gradient. Only the token counts need
combining, and they must be known before any micro-batch forms its loss: a layer reports them
in `RouterStats`, `global_counts` sums them across ranks, and with several micro-batches the
trainer first counts every micro-batch's routing under no_grad (`Transformer.route_counts`).

Shape legend: N tokens (B*T), C d_model, E experts, k top_k, S sources.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

LB_SCOPES = ("micro_batch", "global_batch")


@dataclass
class RouterStats:
    """What one MoE layer's last forward routed: the inputs of the auxiliary losses and of logging."""

    counts: torch.Tensor  # [E] float32, routing slots per expert (sums to k*N); no grad
    prob_mean: torch.Tensor  # [E] float32, mean router probability per expert; differentiable
    z: torch.Tensor  # [] float32, mean logsumexp(logits)^2; differentiable
    top_idx: torch.Tensor  # [N, k] long, the chosen experts of each token; no grad


class MoE(nn.Module):
    """Top-k routed experts (plus an optional gated shared expert) in place of a block's MLP.

    `make_expert()` builds one expert: any module mapping [n, C] -> [n, C] (the model passes its
    SwiGLU). After each forward, `self.stats` holds that forward's `RouterStats`.
    """

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        top_k: int,
        make_expert: Callable[[], nn.Module],
        shared_expert: nn.Module | None = None,
        norm_topk: bool = True,
    ):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={n_experts}], got {top_k}")
        self.n_experts, self.top_k, self.norm_topk = n_experts, top_k, norm_topk
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(make_expert() for _ in range(n_experts))
        self.shared_expert = shared_expert
        self.shared_expert_gate = nn.Linear(d_model, 1, bias=False) if shared_expert is not None else None
        self.stats: RouterStats | None = None

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """h: [N, C] -> logits [N, E], probs [N, E], weights [N, k] (all float32), top_idx [N, k]."""
        logits = self.router(h).float()  # [N, E]
        probs = logits.softmax(dim=-1)  # [N, E]
        weights, top_idx = probs.topk(self.top_k, dim=-1)  # [N, k] each
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)  # = softmax over the k chosen logits
        return logits, probs, weights, top_idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        h = x.reshape(B * T, C)  # [N, C]
        logits, probs, weights, top_idx = self.route(h)
        y = dispatch(h, top_idx, weights.to(h.dtype), self.experts)  # [N, C]
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(h)) * self.shared_expert(h)  # [N, 1] * [N, C]
        self.stats = RouterStats(
            counts=torch.bincount(top_idx.reshape(-1), minlength=self.n_experts).float(),
            prob_mean=probs.mean(dim=0),
            z=router_z_loss(logits),
            top_idx=top_idx.detach(),
        )
        return y.view(B, T, C)


def dispatch(h: torch.Tensor, top_idx: torch.Tensor, weights: torch.Tensor, experts: nn.ModuleList) -> torch.Tensor:
    """sum_j weights[n, j] * experts[top_idx[n, j]](h[n]) for every token n; h: [N, C] -> [N, C].

    The N*k (token, slot) pairs are sorted by expert so each expert runs once on one contiguous
    chunk of its tokens; the weighted outputs are scatter-added back to their tokens.
    """
    N, k = top_idx.shape
    flat = top_idx.reshape(-1)  # [N*k] expert of each (token, slot), token-major
    order = torch.argsort(flat, stable=True)  # [N*k] slots grouped by expert
    token = order // k  # [N*k] the token of each sorted slot
    chunks = torch.bincount(flat, minlength=len(experts)).tolist()  # slots per expert
    xs = h.index_select(0, token).split(chunks)  # per expert: [n_e, C]
    ys = [expert(xe) for expert, xe in zip(experts, xs, strict=True) if len(xe)]  # empty experts are skipped
    if not ys:  # no tokens at all
        return torch.zeros_like(h)
    y_sorted = torch.cat(ys) * weights.reshape(-1)[order, None]  # [N*k, C]
    return torch.zeros_like(h).index_add_(0, token, y_sorted)


def load_balancing_loss(prob_mean: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """E * sum_e f_e * P_e with f = counts / sum(counts) (constant) and P = prob_mean (differentiable).

    prob_mean: [E] mean router probability; counts: [E] routing slots per expert, from this
    micro-batch or summed over the global batch (see the module docstring). 1 at perfect balance.
    """
    f = counts.detach().float() / counts.sum().clamp(min=1)  # [E]
    return prob_mean.numel() * (f * prob_mean).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """mean over tokens of logsumexp(router logits)^2 (ST-MoE); logits: [N, E]."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def global_counts(counts: torch.Tensor) -> torch.Tensor:
    """Sum routing counts over data-parallel ranks when torch.distributed is running (a copy)."""
    counts = counts.detach().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    return counts


class ExpertLoad:
    """Tokens routed to each (MoE layer, expert, source) since the last `flush`.

    `add` takes each MoE layer's chosen experts [N, k] and the source id [N] of each token; a token
    counts once per slot, so each layer's counts grow by k*N per call.
    """

    def __init__(self, layers: list[int], n_experts: int, sources: dict[int, str]):
        self.layers, self.n_experts = layers, n_experts
        self.source_ids = sorted(sources)
        self.source_names = [sources[s] for s in self.source_ids]
        # source id -> dense column 0..S-1 (ids may be sparse, e.g. 0 and 7)
        self._column = torch.full((max(self.source_ids) + 1,), -1, dtype=torch.long)
        self._column[self.source_ids] = torch.arange(len(self.source_ids))
        self.counts = torch.zeros(len(layers), n_experts, len(self.source_ids), dtype=torch.long)  # [L, E, S]

    def add(self, top_idx: list[torch.Tensor], source: torch.Tensor) -> None:
        # Counts stay on the routing's device (no host sync per step) until flush.
        device = top_idx[0].device
        if self.counts.device != device:
            self.counts, self._column = self.counts.to(device), self._column.to(device)
        S = len(self.source_ids)
        col = self._column[source.reshape(-1).to(device)]  # [N]
        for i, idx in enumerate(top_idx):
            cell = idx * S + col[:, None]  # [N, k] flat (expert, source) cell
            self.counts[i] += torch.bincount(cell.reshape(-1), minlength=self.n_experts * S).view(self.n_experts, S)

    def max_load(self) -> float:
        """Since the last flush, the busiest expert's tokens over the mean expert's (1.0 = balanced),
        max over layers; 0.0 before any token."""
        per_expert = self.counts.sum(dim=2).float()  # [L, E]
        mean = per_expert.mean(dim=1).clamp(min=1e-9)  # [L]
        return float((per_expert.amax(dim=1) / mean).max()) if per_expert.sum() > 0 else 0.0

    def flush(self, step: int) -> list[dict]:
        """Rows (step, layer, expert, source, tokens) for every cell, zeros included; then reset."""
        counts = self.counts.cpu().tolist()  # [L][E][S]
        self.counts.zero_()
        return [
            {"step": step, "layer": layer, "expert": e, "source": name, "tokens": counts[i][e][s]}
            for i, layer in enumerate(self.layers)
            for e in range(self.n_experts)
            for s, name in enumerate(self.source_names)
        ]
