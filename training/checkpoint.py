"""Save/load a Transformer as `model.safetensors` + `config.json` in one directory.

The full training state for resuming (optimizer, RNG, data position) lives in `training.resume`,
which writes its model weights through this module.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from training.atomic import atomic_path, write_json_atomic
from training.model import ModelConfig, Transformer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# With tied embeddings lm_head.weight *is* embed.weight; safetensors refuses shared storage,
# so the head is saved once (as embed.weight) and re-tied by the constructor on load.
TIED_KEY = "lm_head.weight"


def save_checkpoint(out_dir: Path, model: Transformer, extra: dict | None = None) -> None:
    out_dir = Path(out_dir)
    extra = dict(extra or {})
    if "model" in extra:
        raise ValueError("save_checkpoint: extra must not contain the key 'model' (reserved for the model config)")

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop(TIED_KEY, None)

    # Weights first, config last: a directory with config.json is a complete checkpoint.
    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_json_atomic(out_dir / CONFIG_FILE, {"model": model.config.to_dict(), **extra})


def read_model_config(ckpt_dir: Path) -> tuple[ModelConfig, dict]:
    """The model config of a checkpoint directory and its whole config.json."""
    ckpt_dir = Path(ckpt_dir)
    config_path, weights_path = ckpt_dir / CONFIG_FILE, ckpt_dir / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file missing: {path}")

    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: invalid JSON: {e}") from e
    if not isinstance(meta, dict) or "model" not in meta:
        raise ValueError(f"{config_path}: expected a JSON object with a 'model' key")
    try:
        config = ModelConfig.from_dict(meta["model"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: bad 'model' section: {e}") from e
    return config, meta


def load_weights_into(model: Transformer, ckpt_dir: Path) -> None:
    """Copy a checkpoint's weights into `model` (same architecture), in place, exactly."""
    ckpt_dir = Path(ckpt_dir)
    config_path, weights_path = ckpt_dir / CONFIG_FILE, ckpt_dir / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"checkpoint file missing: {weights_path}")
    try:
        state = load_file(str(weights_path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise ValueError(f"{weights_path}: not a readable safetensors file (corrupt or truncated?): {e}") from e
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches are raised even with strict=False
        raise ValueError(f"{weights_path}: weights do not match the config in {config_path}: {e}") from e
    allowed_missing = {TIED_KEY} if model.config.tie_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise ValueError(
            f"{weights_path}: weights do not match the config in {config_path}: "
            f"missing={sorted(set(missing) - allowed_missing)} unexpected={sorted(unexpected)}"
        )


def load_checkpoint(ckpt_dir: Path, device: str = "cpu") -> Transformer:
    config, _ = read_model_config(ckpt_dir)
    model = Transformer(config)
    load_weights_into(model, ckpt_dir)
    return model.to(device).eval()
