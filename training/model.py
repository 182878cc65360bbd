"""A small Llama/SmolLM-style decoder-only Transformer.

Pre-norm RMSNorm blocks, rotary position embeddings (RoPE), grouped-query attention (GQA)
through F.scaled_dot_product_attention, a SwiGLU MLP, a final RMSNorm and (by default) an
output head tied to the token embedding. `ModelConfig.kernels="triton"` routes RMSNorm, the SwiGLU
activation, RoPE and the output head + loss (fused linear + cross-entropy: with targets, the forward
then returns logits=None) through the Triton kernels in `kernels/` (imported only then).

Optional, all off by default (a config that does not set them trains exactly as before):

* ``nope_every = N``: every Nth layer (1-based: layers N, 2N, ...) skips RoPE (SmolLM3-style NoPE).
* ``intra_doc_mask``: documents packed into one sequence do not attend across their boundary.
  A document ends with (and includes) ``eos_token_id``; the token after an EOS starts a new
  document. Positions restart at 0 in every document, so a document's logits are those it gets
  when run alone (up to float rounding). Attention then runs SDPA with an explicit boolean mask.
* ``z_loss = coef``: adds ``coef * mean(logsumexp(logits)**2)`` over the scored tokens.
* ``moe_experts = E``: Mixture-of-Experts feed-forward (`training.moe`) in every ``moe_every``-th
  layer (1-based, as nope_every: layers N, 2N, ...; 1 = all): top-``moe_top_k`` of E SwiGLU
  experts of width ``moe_ffn_hidden`` (default ffn_hidden), optionally a gated shared expert, and
  two auxiliary losses averaged over the MoE layers and added to the loss: load balancing
  (``moe_lb_coef``, over the micro-batch or the global batch: ``moe_lb_scope``) and router z-loss
  (``moe_z_coef``). Other layers keep the dense SwiGLU of width ffn_hidden.
* Max attention logit tracking (``Transformer.track_max_logit = True``, a runtime switch, not
  config): each attention layer records the max pre-softmax logit per query head, computed under
  no_grad, for QK-clip (`training.qk_clip`) and for logging.

Shape legend: B batch, T sequence length, C d_model, H query heads, K key/value heads,
D head dim (C // H), F ffn hidden width, V vocab size.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from training.moe import LB_SCOPES, MoE, global_counts, load_balancing_loss

KERNEL_CHOICES = ("reference", "triton")


@dataclass
class ModelConfig:
    vocab_size: int
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2  # GQA; must divide n_heads
    ffn_hidden: int = 384  # SwiGLU hidden width
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    # Which implementation runs RMSNorm, SwiGLU's activation, RoPE and the head + loss (and Muon's
    # Newton-Schulz products): "reference" (plain PyTorch) or "triton" (the kernels in `kernels/`,
    # which fall back to the reference, with one warning, where no GPU driver or interpreter can
    # run them). A runtime choice, not part of the model's identity: to_dict() leaves it out
    # while it is the default.
    kernels: str = "reference"
    # Added after the first checkpoints: to_dict() leaves each out while it is at its default
    # (OPTIONAL_DEFAULTS), so configs and checkpoints that never set them look as before.
    nope_every: int = 0  # every Nth layer skips RoPE; 0 = RoPE in every layer
    intra_doc_mask: bool = False  # no attention across EOS boundaries (needs eos_token_id)
    eos_token_id: int | None = None  # the document separator token
    z_loss: float = 0.0  # coefficient on mean(logsumexp(logits)^2); 0 = off
    # Mixture of Experts (training.moe); the other moe_* fields may differ from their defaults
    # only when moe_experts > 0.
    moe_experts: int = 0  # experts per MoE layer; 0 = dense model
    moe_top_k: int = 2  # experts per token
    moe_every: int = 1  # every Nth layer (1-based) is MoE; 1 = all layers
    moe_ffn_hidden: int | None = None  # expert (and shared expert) SwiGLU width; None = ffn_hidden
    moe_shared_expert: bool = False  # add a gated shared expert (Qwen2-MoE style)
    moe_norm_topk: bool = True  # renormalise the top-k probabilities (= softmax over the chosen logits)
    moe_lb_coef: float = 0.01  # load-balancing loss coefficient
    moe_lb_scope: str = "micro_batch"  # "micro_batch" or "global_batch": where expert loads are counted
    moe_z_coef: float = 0.001  # router z-loss coefficient

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len"):
            value = getattr(self, name)
            # bool is an int subclass; reject it so `n_layers: true` in JSON is not read as 1.
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive number, got {value!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"ModelConfig.tie_embeddings must be true or false, got {self.tie_embeddings!r}")
        if not isinstance(self.nope_every, int) or isinstance(self.nope_every, bool) or self.nope_every < 0:
            raise ValueError(f"ModelConfig.nope_every must be an integer >= 0 (0 = off), got {self.nope_every!r}")
        if not isinstance(self.intra_doc_mask, bool):
            raise ValueError(f"ModelConfig.intra_doc_mask must be true or false, got {self.intra_doc_mask!r}")
        if self.eos_token_id is not None and (
            not isinstance(self.eos_token_id, int) or isinstance(self.eos_token_id, bool)
            or not 0 <= self.eos_token_id < self.vocab_size
        ):
            raise ValueError(
                f"ModelConfig.eos_token_id must be a token id in [0, vocab_size={self.vocab_size}), got {self.eos_token_id!r}"
            )
        if self.intra_doc_mask and self.eos_token_id is None:
            raise ValueError("ModelConfig.intra_doc_mask needs eos_token_id (the document separator)")
        if not isinstance(self.z_loss, (int, float)) or isinstance(self.z_loss, bool) or not self.z_loss >= 0:
            raise ValueError(f"ModelConfig.z_loss must be a number >= 0 (0 = off), got {self.z_loss!r}")
        self._check_moe()
        if self.kernels not in KERNEL_CHOICES:
            raise ValueError(f"ModelConfig.kernels must be one of {list(KERNEL_CHOICES)}, got {self.kernels!r}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"ModelConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"ModelConfig.n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"ModelConfig head_dim = d_model // n_heads = {self.head_dim} must be even for RoPE"
            )

    def _check_moe(self) -> None:
        def positive_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v > 0

        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0

        e = self.moe_experts
        if not isinstance(e, int) or isinstance(e, bool) or e < 0:
            raise ValueError(f"ModelConfig.moe_experts must be an integer >= 0 (0 = dense), got {e!r}")
        if e == 0:
            changed = [k for k, v in OPTIONAL_DEFAULTS.items() if k.startswith("moe_") and getattr(self, k) != v]
            if changed:
                raise ValueError(f"ModelConfig {changed} only apply with moe_experts > 0 (it is 0: a dense model)")
            return
        if not positive_int(self.moe_top_k) or self.moe_top_k > e:
            raise ValueError(f"ModelConfig.moe_top_k must be an integer in [1, moe_experts={e}], got {self.moe_top_k!r}")
        if not positive_int(self.moe_every) or self.moe_every > self.n_layers:
            raise ValueError(
                f"ModelConfig.moe_every must be an integer in [1, n_layers={self.n_layers}], got {self.moe_every!r}"
            )
        if self.moe_ffn_hidden is not None and not positive_int(self.moe_ffn_hidden):
            raise ValueError(f"ModelConfig.moe_ffn_hidden must be a positive integer or null, got {self.moe_ffn_hidden!r}")
        for name in ("moe_shared_expert", "moe_norm_topk"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("moe_lb_coef", "moe_z_coef"):
            if not number(getattr(self, name)):
                raise ValueError(f"ModelConfig.{name} must be a number >= 0, got {getattr(self, name)!r}")
        if self.moe_lb_scope not in LB_SCOPES:
            raise ValueError(f"ModelConfig.moe_lb_scope must be one of {list(LB_SCOPES)}, got {self.moe_lb_scope!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def expert_hidden(self) -> int:
        """SwiGLU width of each expert (and of the shared expert)."""
        return self.moe_ffn_hidden or self.ffn_hidden

    def is_moe_layer(self, layer: int) -> bool:
        """Whether 0-based `layer` has the MoE feed-forward; with moe_every = N, layers N-1, 2N-1, ...."""
        return self.moe_experts > 0 and (layer + 1) % self.moe_every == 0

    def uses_rope(self, layer: int) -> bool:
        """Whether 0-based `layer` applies RoPE; with nope_every = N, layers N-1, 2N-1, ... do not."""
        return self.nope_every == 0 or (layer + 1) % self.nope_every != 0

    def to_dict(self) -> dict:
        d = asdict(self)
        # Fields left out at their default, so configs (and checkpoints) that never chose them
        # look as before.
        for name, default in OPTIONAL_DEFAULTS.items():
            if d[name] == default:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        if not isinstance(d, dict):
            raise ValueError(f"model config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}; known fields: {sorted(known)}")
        if "vocab_size" not in d:
            raise ValueError("ModelConfig.vocab_size is required")
        return cls(**d)


OPTIONAL_DEFAULTS = {
    "kernels": "reference", "nope_every": 0, "intra_doc_mask": False, "eos_token_id": None, "z_loss": 0.0,
    "moe_experts": 0, "moe_top_k": 2, "moe_every": 1, "moe_ffn_hidden": None, "moe_shared_expert": False,
    "moe_norm_topk": True, "moe_lb_coef": 0.01, "moe_lb_scope": "micro_batch", "moe_z_coef": 0.001,
}


def document_ids(idx: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """[B, T] index of the packed document each token belongs to; an EOS ends (and belongs to) its document."""
    is_eos = (idx == eos_token_id).long()  # [B, T]
    return torch.cumsum(is_eos, dim=1) - is_eos  # EOS tokens strictly before t


def document_positions(doc: torch.Tensor) -> torch.Tensor:
    """[B, T] position of each token within its document (0 at each document's first token)."""
    B, T = doc.shape
    t = torch.arange(T, device=doc.device).expand(B, T)  # [B, T]
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    start_pos = torch.where(starts, t, torch.zeros_like(t))
    return t - torch.cummax(start_pos, dim=1).values  # distance to the latest document start


def document_mask(doc: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] boolean attention mask (True = may attend): causal and within one document."""
    T = doc.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()  # [T, T]
    same_doc = doc[:, :, None] == doc[:, None, :]  # [B, T, T]
    return (same_doc & causal)[:, None]  # [B, 1, T, T]


def resolve_kernel_ops(choice: str):
    """The Triton ops for ModelConfig.kernels, or None for the PyTorch reference.

    Triton is imported only here, and only for "triton". Where the kernels cannot run (no GPU
    driver and no TRITON_INTERPRET=1, or triton missing), warns once and returns None.
    """
    if choice == "reference":
        return None
    import kernels

    reason = kernels.triton_unavailable_reason()
    if reason is not None:
        warnings.warn(
            f"ModelConfig.kernels='triton' but {reason}; the model runs the PyTorch reference ops instead",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return kernels.load_ops()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.ops = ops  # Triton ops (kernels.load_ops()) or None for the reference below

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ops is not None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        # Normalise in float32 so bf16/fp16 activations do not lose precision in the mean square.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_cache(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape [seq_len, head_dim] for the rotate-half RoPE convention."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # [D/2]
    t = torch.arange(seq_len, dtype=torch.float32)  # [T]
    freqs = torch.outer(t, inv_freq)  # [T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [T, D]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, heads, T, D]; cos/sin: [T, D] (or [B, 1, T, D] for per-document positions).
    # Rotate-half pairs dimension i with i + D/2.
    x1, x2 = x.chunk(2, dim=-1)  # 2 x [B, heads, T, D/2]
    rotated = torch.cat([-x2, x1], dim=-1)  # [B, heads, T, D]
    return (x.float() * cos + rotated.float() * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ops=None, use_rope: bool = True):
        super().__init__()
        self.ops = ops
        self.use_rope = use_rope  # False in NoPE layers
        self.track_max_logit = False  # set by Transformer.track_max_logit
        self.max_logit: torch.Tensor | None = None  # [H] float32, from the last tracked forward
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        # mask: None = causal; else [B, 1, T, T] boolean (True = may attend), cos/sin then [B, 1, T, D].
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, K, T, D]
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, K, T, D]
        if not self.use_rope:
            pass  # NoPE layer: position comes only from the causal mask
        elif self.ops is not None and cos.dim() == 2:
            q, k = self.ops.rope(q, k, cos, sin)
        else:  # the reference also serves per-document positions, which the kernel does not take
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.track_max_logit:
            self.max_logit = self._max_logit(q, k, mask)
        # enable_gqa lets each group of H/K query heads share one k/v head without materialising copies.
        gqa = self.n_kv_heads != self.n_heads
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)  # [B, H, T, D]
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)  # [B, H, T, D]
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # [B, T, C]
        return self.o_proj(y)

    @torch.no_grad()
    def _max_logit(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """[H] max over batch and allowed (query, key) pairs of the pre-softmax logit q.k / sqrt(D)."""
        B, H, T, D = q.shape
        qg = q.float().view(B, self.n_kv_heads, H // self.n_kv_heads, T, D)  # [B, K, G, T, D]
        scores = torch.einsum("bkgtd,bksd->bkgts", qg, k.float()) / math.sqrt(D)  # [B, K, G, T, T]
        allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril() if mask is None else mask[:, :, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
        return scores.amax(dim=(0, 3, 4)).reshape(H)  # query head h = kv head h // G, member h % G


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig, ops=None, hidden: int | None = None):
        super().__init__()
        self.ops = ops
        hidden = hidden or cfg.ffn_hidden  # F
        self.gate_proj = nn.Linear(cfg.d_model, hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ops is not None:
            return self.down_proj(self.ops.swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # [B, T, F] -> [B, T, C]


def moe_ffn(cfg: ModelConfig, ops=None) -> MoE:
    """The MoE feed-forward of an MoE layer: routed SwiGLU experts (+ the shared expert)."""
    shared = SwiGLU(cfg, ops, cfg.expert_hidden) if cfg.moe_shared_expert else None
    return MoE(cfg.d_model, cfg.moe_experts, cfg.moe_top_k, lambda: SwiGLU(cfg, ops, cfg.expert_hidden),
               shared, cfg.moe_norm_topk)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ops=None, use_rope: bool = True, moe: bool = False):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, ops)
        self.attn = Attention(cfg, ops, use_rope)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, ops)
        self.mlp = moe_ffn(cfg, ops) if moe else SwiGLU(cfg, ops)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        x = x + self.mlp(self.mlp_norm(x))
        return x


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # Triton ops or None (reference); decided once here, so a fallback warns once per model.
        ops = resolve_kernel_ops(config.kernels)
        self.uses_triton_kernels = ops is not None
        self.kernel_ops = ops  # the fused head + loss; a Muon built for this model takes sym_matmul
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(
            Block(config, ops, config.uses_rope(i), config.is_moe_layer(i)) for i in range(config.n_layers)
        )
        self.norm = RMSNorm(config.d_model, config.norm_eps, ops)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight  # one tensor, two uses

        cos, sin = rope_cache(config.max_seq_len, config.head_dim, config.rope_theta)
        # Non-persistent: derived from the config, so they stay out of checkpoints.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # MoE: (layer index, MoE module) of each MoE layer; after a forward with targets, the
        # auxiliary losses it added (detached): {"lb", "z", "weighted"} (see moe_aux_losses).
        self.moe_layers = [(i, layer.mlp) for i, layer in enumerate(self.layers) if isinstance(layer.mlp, MoE)]
        self.moe_losses: dict[str, torch.Tensor] | None = None

        self.apply(self._init_weights)
        # GPT-2 style: shrink projections that write into the residual stream so its variance
        # does not grow with depth.
        residual_std = 0.02 / math.sqrt(2 * config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith(("attn.o_proj.weight", "down_proj.weight")):  # MoE experts' too
                nn.init.normal_(p, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, moe_counts: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """logits [B, T, V] and, with targets, the training loss (cross-entropy + enabled auxiliary losses).

        With Triton kernels and targets, the head and loss run fused and logits is None: the
        [B, T, V] logits are never materialised (they are the memory peak at large vocabularies).

        moe_counts: [n MoE layers, E] routing counts of the whole optimizer step, for the
        global-batch load-balancing loss over several micro-batches (`route_counts`); None = this
        forward's own counts (summed over data-parallel ranks for the global scope).
        """
        B, T = idx.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds ModelConfig.max_seq_len ({self.config.max_seq_len})")
        mask = None  # causal (SDPA's is_causal path)
        if self.config.intra_doc_mask:
            doc = document_ids(idx, self.config.eos_token_id)  # [B, T]
            mask = document_mask(doc)  # [B, 1, T, T]
            pos = document_positions(doc)  # [B, T]
            cos, sin = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]  # [B, 1, T, D]
        else:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # [T, D]
        x = self.embed(idx)  # [B, T, C]
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        x = self.norm(x)
        fused = targets is not None and self.kernel_ops is not None
        logits = None if fused else self.lm_head(x)  # [B, T, V]
        loss = None
        if fused:  # same loss as below (z-loss included), chunk by chunk
            loss = self.kernel_ops.linear_cross_entropy(x, self.lm_head.weight, targets, z_loss=self.config.z_loss)
        elif targets is not None:
            flat = logits.float().view(B * T, -1)  # [B*T, V]
            loss = F.cross_entropy(flat, targets.reshape(B * T), ignore_index=-100)
            if self.config.z_loss > 0:
                loss = loss + self.config.z_loss * z_loss_term(flat, targets.reshape(B * T))
        if targets is not None:
            if self.moe_layers:
                aux = self.moe_aux_losses(moe_counts)
                loss = loss + aux["weighted"]
                self.moe_losses = {k: v.detach() for k, v in aux.items()}
        elif moe_counts is not None:
            raise ValueError("moe_counts only matters for the loss; pass targets too")
        return logits, loss

    def moe_aux_losses(self, counts: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The MoE auxiliary losses of the last forward, each the mean over MoE layers.

        "lb": load balancing, "z": router z-loss, "weighted": moe_lb_coef * lb + moe_z_coef * z
        (what the loss adds). counts: see forward's moe_counts.
        """
        cfg = self.config
        stats = [moe.stats for _, moe in self.moe_layers]
        if counts is None:
            counts = torch.stack([s.counts for s in stats])  # [L_moe, E]
            if cfg.moe_lb_scope == "global_batch":
                counts = global_counts(counts)  # over data-parallel ranks (a no-op on one process)
        elif cfg.moe_lb_scope != "global_batch":
            raise ValueError("moe_counts is for moe_lb_scope='global_batch'; this model balances per micro-batch")
        lb = torch.stack([load_balancing_loss(s.prob_mean, c) for s, c in zip(stats, counts, strict=True)]).mean()
        z = torch.stack([s.z for s in stats]).mean()
        return {"lb": lb, "z": z, "weighted": cfg.moe_lb_coef * lb + cfg.moe_z_coef * z}

    @torch.no_grad()
    def route_counts(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        """[L_moe, E] routing counts over all `micro_batches` (inputs [B, T]) and data-parallel ranks.

        A forward of each under no_grad, only to count where its tokens go: the global-batch
        load-balancing loss needs the whole step's counts before any micro-batch forms its loss.
        """
        total = torch.zeros(len(self.moe_layers), self.config.moe_experts, device=self.embed.weight.device)
        for idx in micro_batches:
            self(idx)
            total += torch.stack([moe.stats.counts for _, moe in self.moe_layers])
        return global_counts(total)

    def expert_choices(self) -> list[torch.Tensor]:
        """Per MoE layer, the [B*T, k] experts each token of the last forward was routed to."""
        return [moe.stats.top_idx for _, moe in self.moe_layers]

    @property
    def track_max_logit(self) -> bool:
        return any(layer.attn.track_max_logit for layer in self.layers)

    @track_max_logit.setter
    def track_max_logit(self, on: bool) -> None:
        for layer in self.layers:
            layer.attn.track_max_logit = bool(on)
            layer.attn.max_logit = None

    def max_attn_logits(self) -> list[float] | None:
        """Per layer, the max attention logit (over heads) of the last tracked forward; None if untracked."""
        values = [layer.attn.max_logit for layer in self.layers]
        if any(v is None for v in values):
            return None
        return [float(v.max()) for v in values]

    def num_params(self, exclude_embeddings: bool = False, active: bool = False) -> int:
        """Parameter count; active=True counts what one token uses (top_k of each MoE layer's experts)."""
        # parameters() yields a tied tensor once, so tied embeddings are not double counted.
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        if active:
            for _, moe in self.moe_layers:
                per_expert = sum(p.numel() for p in moe.experts[0].parameters())
                n -= (moe.n_experts - moe.top_k) * per_expert
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B style.

        6 * (matmul params) for the weight matmuls, plus 12 * L * C * T for attention scores and
        the weighted sum of values (query heads set the cost; GQA only shrinks k/v projections).
        The embedding lookup is free but the output head is a real matmul, so it is counted. With
        MoE only the active parameters count (router, shared expert and top_k experts per token).
        """
        cfg = self.config
        n_matmul = self.num_params(exclude_embeddings=True, active=True) + cfg.vocab_size * cfg.d_model
        return 6.0 * n_matmul + 12.0 * cfg.n_layers * cfg.d_model * seq_len


def z_loss_term(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean(logsumexp(logits)^2) over tokens whose target is not -100 (PaLM's z-loss, without its coefficient).

    logits: [N, V] float32, targets: [N].
    """
    lse = torch.logsumexp(logits, dim=-1)  # [N]
    keep = targets != -100
    return (lse[keep] ** 2).sum() / keep.sum().clamp(min=1)


def estimate_mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s as a fraction of the hardware peak."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be positive, got {peak_flops}")
    return flops_per_token * tokens_per_s / peak_flops
