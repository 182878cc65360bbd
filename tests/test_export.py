"""Hugging Face export: transformers loads the folder offline and its logits match ours."""

from __future__ import annotations

import pytest
import torch

from training.checkpoint import save_checkpoint
from training.export import export_hf
from training.model import ModelConfig, Transformer


def _checkpoint(tmp_path, **overrides):
    cfg = ModelConfig(vocab_size=300, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=96,
                      max_seq_len=64, **overrides)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so a mixed-up norm weight would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            if name.endswith(("router.weight", "shared_expert_gate.weight")):
                p.normal_(0.0, 1.0)  # decisive routing and gates far from 0.5, so a mix-up would show
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, model, {"step": 1})
    return model, ckpt


def _tokenizer(tmp_path):
    from dataprep.tokenize import train_bpe

    tok = train_bpe(["the quick brown fox jumps over the lazy dog"] * 50 + ["a b c d e f g"] * 20, 300, 1)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.mark.parametrize("overrides,architecture", [
    ({}, "LlamaForCausalLM"),
    ({"tie_embeddings": False, "rope_theta": 50000.0}, "LlamaForCausalLM"),
    ({"nope_every": 2}, "SmolLM3ForCausalLM"),
    # MoE -> Qwen2-MoE: all layers MoE, renormalised top-2, no shared expert (a width-0 one there)
    ({"moe_experts": 4, "moe_top_k": 2, "moe_ffn_hidden": 32}, "Qwen2MoeForCausalLM"),
    # every 2nd layer MoE (dense SwiGLU elsewhere), raw top-k probabilities, gated shared expert, untied
    ({"moe_experts": 6, "moe_top_k": 3, "moe_every": 2, "moe_norm_topk": False, "moe_shared_expert": True,
      "tie_embeddings": False}, "Qwen2MoeForCausalLM"),
])
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # the width-0 shared expert
def test_exported_logits_match(tmp_path, overrides, architecture):
    from transformers import AutoModelForCausalLM

    ours, ckpt = _checkpoint(tmp_path, **overrides)
    out = export_hf(ckpt, tmp_path / "hf", _tokenizer(tmp_path))
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(hf).__name__ == architecture
    idx = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, _ = ours(idx)
        got = hf(idx).logits
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-4, rtol=0), (got - expected).abs().max()


def test_tokenizer_ships_with_eos(tmp_path):
    from transformers import AutoTokenizer

    _, ckpt = _checkpoint(tmp_path)
    out = export_hf(ckpt, tmp_path / "hf", _tokenizer(tmp_path))
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tok.eos_token == "<|endoftext|>"
    ids = tok("the quick brown fox")["input_ids"]
    assert ids[0] == tok.eos_token_id  # documents were trained on after EOS: it leads as a BOS
    assert tok.decode(ids, skip_special_tokens=True) == "the quick brown fox"
    assert tok("the quick brown fox", add_special_tokens=False)["input_ids"] == ids[1:]


def test_refuses_to_overwrite_and_leaves_nothing_half_written(tmp_path):
    _, ckpt = _checkpoint(tmp_path)
    out = export_hf(ckpt, tmp_path / "hf")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_hf(ckpt, out)
    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(Exception):  # noqa: B017 - safetensors' own error type
        export_hf(ckpt, tmp_path / "hf2")
    assert not (tmp_path / "hf2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf2.")]


def test_moe_with_nope_is_refused(tmp_path):
    _, ckpt = _checkpoint(tmp_path, moe_experts=4, nope_every=2)
    with pytest.raises(ValueError, match="MoE model with NoPE layers"):
        export_hf(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
