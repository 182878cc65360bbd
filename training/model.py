"""A small Llama/SmolLM-style decoder-only Transformer.

Pre-norm RMSNorm blocks, rotary position embeddings (RoPE), grouped-query attention (GQA)
through F.scaled_dot_product_attention, a SwiGLU MLP, a final RMSNorm and (by default) an
output head tied to the token embedding. `ModelConfig.kernels="triton"` routes RMSNorm, the SwiGLU
activation and RoPE through the Triton kernels in `kernels/` (imported only then).

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
    # Which implementation runs RMSNorm, SwiGLU's activation and RoPE: "reference" (plain PyTorch)
    # or "triton" (the fused kernels in `kernels/`, which fall back to the reference, with one
    # warning, where no GPU driver or interpreter can run them). A runtime choice, not part of the
    # model's identity: to_dict() leaves it out while it is the default.
    kernels: str = "reference"

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

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["kernels"] == "reference":
            del d["kernels"]  # configs (and checkpoints) that never chose kernels look as before
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
    # x: [B, heads, T, D]; cos/sin: [T, D]. Rotate-half pairs dimension i with i + D/2.
    x1, x2 = x.chunk(2, dim=-1)  # 2 x [B, heads, T, D/2]
    rotated = torch.cat([-x2, x1], dim=-1)  # [B, heads, T, D]
    return (x.float() * cos + rotated.float() * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ops=None):
        super().__init__()
        self.ops = ops
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, K, T, D]
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, K, T, D]
        if self.ops is not None:
            q, k = self.ops.rope(q, k, cos, sin)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # enable_gqa lets each group of H/K query heads share one k/v head without materialising copies.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)  # [B, H, T, D]
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # [B, T, C]
        return self.o_proj(y)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig, ops=None):
        super().__init__()
        self.ops = ops
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ops is not None:
            return self.down_proj(self.ops.swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # [B, T, F] -> [B, T, C]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ops=None):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, ops)
        self.attn = Attention(cfg, ops)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, ops)
        self.mlp = SwiGLU(cfg, ops)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        x = x + self.mlp(self.mlp_norm(x))
        return x


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # Triton ops or None (reference); decided once here, so a fallback warns once per model.
        ops = resolve_kernel_ops(config.kernels)
        self.uses_triton_kernels = ops is not None
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, ops) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps, ops)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight  # one tensor, two uses

        cos, sin = rope_cache(config.max_seq_len, config.head_dim, config.rope_theta)
        # Non-persistent: derived from the config, so they stay out of checkpoints.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

        self.apply(self._init_weights)
        # GPT-2 style: shrink projections that write into the residual stream so its variance
        # does not grow with depth.
        residual_std = 0.02 / math.sqrt(2 * config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith(("attn.o_proj.weight", "mlp.down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T = idx.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds ModelConfig.max_seq_len ({self.config.max_seq_len})")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # [T, D]
        x = self.embed(idx)  # [B, T, C]
        for layer in self.layers:
            x = layer(x, cos, sin)
        x = self.norm(x)
        logits = self.lm_head(x)  # [B, T, V]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().view(B * T, -1), targets.reshape(B * T), ignore_index=-100
            )
        return logits, loss

    def num_params(self, exclude_embeddings: bool = False) -> int:
        # parameters() yields a tied tensor once, so tied embeddings are not double counted.
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B style.

        6 * (matmul params) for the weight matmuls, plus 12 * L * C * T for attention scores and
        the weighted sum of values (query heads set the cost; GQA only shrinks k/v projections).
        The embedding lookup is free but the output head is a real matmul, so it is counted.
        """
        cfg = self.config
        n_matmul = self.num_params(exclude_embeddings=True) + cfg.vocab_size * cfg.d_model
        return 6.0 * n_matmul + 12.0 * cfg.n_layers * cfg.d_model * seq_len


def estimate_mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s as a fraction of the hardware peak."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be positive, got {peak_flops}")
    return flops_per_token * tokens_per_s / peak_flops
