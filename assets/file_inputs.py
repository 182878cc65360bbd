"""Identity inputs that are files but not assets: a given tokenizer.json, a local model folder.

The asset body hashes them into its store key and `foundry sync/status` recompute them to see
that a file changed on disk; both call `file_inputs`, so they cannot disagree. Digests are
memoised per process by (path, size, mtime) of every file, so `foundry status` does not re-read
a multi-GB model folder that has not changed.
"""

from __future__ import annotations

from pathlib import Path

from .plan import AssetPlan
from .settings import resolve_data_path
from .store import file_sha256

_MEMO: dict[tuple, str] = {}


def _signature(path: Path) -> tuple:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return (str(path), *((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


def _memoised(path: Path, digest) -> str:
    key = _signature(path)
    if key not in _MEMO:
        _MEMO[key] = digest(path)
    return _MEMO[key]


def file_inputs(plan: AssetPlan, data_root: Path) -> dict[str, str]:
    """role -> content digest of each file input of `plan` (empty for most assets)."""
    if plan.kind == "tokenizer" and plan.context["tokenizer"].path is not None:
        path = resolve_data_path(plan.context["tokenizer"].path, data_root)
        if not path.is_file():
            raise FileNotFoundError(f"{plan.label}: tokenizer file {path} does not exist")
        return {"file": _memoised(path, file_sha256)}
    if plan.kind == "rephrased" and plan.context["rephrase"].backend.kind == "transformers":
        from dataprep.rephrase.hf_backend import model_fingerprint

        folder = resolve_data_path(plan.context["rephrase"].backend.model, data_root)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{plan.label}: backend.model {folder} is not a model folder (no config.json)")
        return {"model": _memoised(folder, model_fingerprint)}
    return {}
