"""QK-clip (MuonClip, Kimi K2): cap attention logits by rescaling query/key weights after a step.

With `Transformer.track_max_logit` on, every attention layer records, during the forward pass,
m_h = the max pre-softmax logit q.k / sqrt(D) of query head h over the batch (allowed positions
only). After the optimizer step, every head with m_h > tau gets gamma_h = tau / m_h (others 1),
and the weights are rescaled so that head h's logits are multiplied by exactly gamma_h (q and k
are linear in W_q and W_k, and RoPE is a rotation, so logits scale with the product of the two
weight scales).

GQA: a key head is shared by the G = H / K query heads of its group, so it cannot take a
per-query-head scale. For group g with gamma_min = min of its members' gamma:
    W_k[g]  *= sqrt(gamma_min)
    W_q[h]  *= gamma_h / sqrt(gamma_min)      for each query head h in g
The head with the largest excess gets sqrt(gamma) on each side — the MuonClip split — and
every other head of the group keeps its logits exactly (its query absorbs the key's shrink).
A group with no head over tau is left untouched, bit for bit. With K = H (plain MHA) this is
the paper's rule: sqrt(gamma_h) on each of q_h and k_h.

The max logit is taken from the step's own forward pass, i.e. the weights before the update;
as in the paper, the clip bounds the logits that were seen, and the next step's forward
measures again.
"""

from __future__ import annotations

import torch

from training.model import Transformer


@torch.no_grad()
def clip_scales(max_logit: torch.Tensor, tau: float, n_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(query scale [H], key scale [K]) for per-head max logits [H] (see the module docstring)."""
    H = max_logit.numel()
    m = max_logit.float()
    gamma = torch.where(m > tau, tau / m, torch.ones_like(m))  # [H], in (0, 1]
    gamma = gamma.view(n_kv_heads, H // n_kv_heads)  # [K, G]
    key_scale = gamma.min(dim=1).values.sqrt()  # [K]
    query_scale = gamma / key_scale[:, None]  # [K, G]
    return query_scale.reshape(H), key_scale


@torch.no_grad()
def apply_qk_clip(model: Transformer, tau: float) -> int:
    """Rescale q/k projection weights of heads whose tracked max logit exceeds tau; returns how many
    query heads were clipped. Needs a forward pass with `model.track_max_logit = True` first."""
    if not tau > 0:
        raise ValueError(f"qk_clip tau must be positive, got {tau!r}")
    clipped = 0
    for i, layer in enumerate(model.layers):
        attn = layer.attn
        if attn.max_logit is None:
            raise RuntimeError(f"layer {i}: no max attention logit tracked; set model.track_max_logit = True")
        over = attn.max_logit > tau
        if not bool(over.any()):
            continue
        clipped += int(over.sum())
        H, K, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
        q_scale, k_scale = clip_scales(attn.max_logit, tau, K)
        wq, wk = attn.q_proj.weight, attn.k_proj.weight  # [H*D, C], [K*D, C]
        wq.view(H, D, -1).mul_(q_scale.to(wq.dtype)[:, None, None])
        wk.view(K, D, -1).mul_(k_scale.to(wk.dtype)[:, None, None])
    return clipped
