"""Export a Foundry checkpoint to the Hugging Face format, loadable offline by `transformers`.

    python -m training.export CKPT_DIR OUT_DIR [--tokenizer tokenizer.json] [--dtype float32]

The dense model is a Llama exactly (pre-norm RMSNorm, rotate-half RoPE, GQA, SwiGLU, tied or
untied head), so it becomes a `LlamaForCausalLM`; a model with NoPE layers (`nope_every`)
becomes a `SmolLM3ForCausalLM`, whose `no_rope_layers` follow the same rule. Weights are
renamed, not changed. `intra_doc_mask` and `z_loss` only matter when training on packed
documents, so they have nothing to export. The folder appears by atomic rename when complete.

A Mixture-of-Experts model (`moe_experts`) becomes a `Qwen2MoeForCausalLM`, which routes exactly as
`training.moe` does: softmax over all experts, top-k, optional renormalisation of the k weights
(`norm_topk_prob`), a shared expert gated by sigmoid(Linear(C, 1)), MoE layers where
(layer + 1) % decoder_sparse_step == 0 and dense SwiGLU layers of width intermediate_size
elsewhere, no qkv bias. Experts are written one matrix per expert (the Hub layout, which
transformers fuses on load). Without a shared expert, the Qwen2-MoE shared expert is given width
0, so it adds exactly nothing. MoE with NoPE layers has no matching family and is refused. The
auxiliary-loss settings only matter in training.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from training.checkpoint import load_checkpoint
from training.model import ModelConfig, Transformer

EOS = "<|endoftext|>"  # the document separator Foundry's tokenizer trains with (dataprep.tokenize.EOS)

# Foundry parameter name (per layer) -> Hugging Face name
LAYER_NAMES = {
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
}


# MoE layers: Foundry name -> Qwen2-MoE name, replacing the dense mlp.* entries of LAYER_NAMES
MOE_NAMES = {"mlp.router.weight": "mlp.gate.weight"}
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")


def _moe_layer_state(state: dict, i: int, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The Qwen2-MoE tensors of MoE layer i."""
    out = {f"model.layers.{i}.mlp.gate.weight": state[f"layers.{i}.mlp.router.weight"]}
    for e in range(cfg.moe_experts):
        for proj in EXPERT_PROJS:
            out[f"model.layers.{i}.mlp.experts.{e}.{proj}.weight"] = state[f"layers.{i}.mlp.experts.{e}.{proj}.weight"]
    shared = f"model.layers.{i}.mlp.shared_expert"
    if cfg.moe_shared_expert:
        for proj in EXPERT_PROJS:
            out[f"{shared}.{proj}.weight"] = state[f"layers.{i}.mlp.shared_expert.{proj}.weight"]
        out[f"{shared}_gate.weight"] = state[f"layers.{i}.mlp.shared_expert_gate.weight"]
    else:  # a width-0 shared expert: its output is exactly zero
        C = cfg.d_model
        out |= {f"{shared}.gate_proj.weight": torch.zeros(0, C), f"{shared}.up_proj.weight": torch.zeros(0, C),
                f"{shared}.down_proj.weight": torch.zeros(C, 0), f"{shared}_gate.weight": torch.zeros(1, C)}
    return out


def hf_state_dict(model: Transformer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    cfg = model.config
    out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"]}
    for i in range(cfg.n_layers):
        moe = cfg.is_moe_layer(i)
        for ours, theirs in LAYER_NAMES.items():
            if not (moe and ours.startswith("mlp.")):
                out[f"model.layers.{i}.{theirs}"] = state[f"layers.{i}.{ours}"]
        if moe:
            out |= _moe_layer_state(state, i, cfg)
    if not model.config.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in out.items()}


def hf_config(cfg: ModelConfig, eos_token_id: int | None, dtype: torch.dtype):
    """A transformers config object for `cfg` (Llama, SmolLM3 with NoPE layers, or Qwen2-MoE)."""
    if cfg.moe_experts and cfg.nope_every:
        raise ValueError(
            "cannot export an MoE model with NoPE layers (nope_every): no transformers family has both "
            "(Qwen2-MoE, the MoE family matching Foundry's routing, applies RoPE in every layer)"
        )
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu", attention_bias=False, mlp_bias=False,
        bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=None, dtype=dtype,
    )
    if cfg.moe_experts:
        from transformers import Qwen2MoeConfig

        config = Qwen2MoeConfig(
            num_experts=cfg.moe_experts, num_experts_per_tok=cfg.moe_top_k, norm_topk_prob=cfg.moe_norm_topk,
            moe_intermediate_size=cfg.expert_hidden, decoder_sparse_step=cfg.moe_every, mlp_only_layers=[],
            shared_expert_intermediate_size=cfg.expert_hidden if cfg.moe_shared_expert else 0,
            qkv_bias=False, use_sliding_window=False,
            **{k: v for k, v in common.items() if k not in ("attention_bias", "mlp_bias")},
        )
        config.architectures = ["Qwen2MoeForCausalLM"]
        return config
    if cfg.nope_every:
        from transformers import SmolLM3Config

        config = SmolLM3Config(no_rope_layers=[int(cfg.uses_rope(i)) for i in range(cfg.n_layers)],
                               use_sliding_window=False, **common)
        config.architectures = ["SmolLM3ForCausalLM"]
        return config
    from transformers import LlamaConfig

    config = LlamaConfig(**common)
    config.architectures = ["LlamaForCausalLM"]
    return config


def _save_tokenizer(tokenizer_json: Path, folder: Path) -> int | None:
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_file(str(tokenizer_json))
    eos_id = raw.token_to_id(EOS)
    if eos_id is not None:
        # Every document was trained on after the EOS separator: encoding puts it in front, as a BOS
        # (so `tokenizer(text)` and lighteval's transformers backend see what training saw).
        raw.post_processor = processors.TemplateProcessing(
            single=f"{EOS} $A", pair=f"{EOS} $A $B", special_tokens=[(EOS, eos_id)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw)
    if eos_id is not None:
        tok.eos_token = EOS
        tok.bos_token = EOS
    tok.save_pretrained(str(folder))
    return tok.eos_token_id


def export_hf(ckpt_dir: Path, out_dir: Path, tokenizer_json: Path | None = None, dtype: str = "float32",
              overwrite: bool = False) -> Path:
    """Write the Hugging Face folder for `ckpt_dir` at `out_dir` (atomically)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype like float32 or bfloat16, got {dtype!r}")
    if tokenizer_json is not None and not Path(tokenizer_json).is_file():
        raise FileNotFoundError(f"tokenizer file not found: {tokenizer_json}")
    model = load_checkpoint(Path(ckpt_dir))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        eos_id = model.config.eos_token_id
        if tokenizer_json is not None:
            eos_id = _save_tokenizer(Path(tokenizer_json), tmp)
        config = hf_config(model.config, eos_id, torch_dtype)
        config.save_pretrained(str(tmp))
        save_file(hf_state_dict(model, torch_dtype), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "foundry_export.json").write_text(json.dumps(
            {"source_checkpoint": str(Path(ckpt_dir).resolve()), "architecture": config.architectures[0],
             "dtype": dtype}, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a Foundry checkpoint folder (model.safetensors + config.json)")
    p.add_argument("out", type=Path, help="the Hugging Face folder to write")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.json to ship with the model")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    out = export_hf(args.checkpoint, args.out, args.tokenizer, args.dtype, args.overwrite)
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
