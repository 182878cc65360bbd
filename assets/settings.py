"""Where things live: project root, data root, store, Dagster home, caches.

These are execution knobs. They are read from the environment (with defaults inside the
project) and never enter a hash, so moving the store or the data changes no asset's identity.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_vars(text: str) -> str:
    """Expand `${VAR}` and `${VAR:-default}` like a POSIX shell; unset without default -> ''."""

    def sub(m: re.Match) -> str:
        value = os.environ.get(m.group(1))
        if value:
            return value
        return m.group(2) if m.group(2) is not None else ""

    return _VAR.sub(sub, text)


def data_root() -> Path:
    """Sample data root: $FOUNDRY_DATA_ROOT, else ../shared/data beside the repository."""
    raw = os.environ.get("FOUNDRY_DATA_ROOT") or str(PROJECT_ROOT.parent / "shared" / "data")
    return Path(raw).expanduser().resolve()


def store_root() -> Path:
    """Content-addressed artifact store: $FOUNDRY_STORE, else .store/ in the project."""
    raw = os.environ.get("FOUNDRY_STORE") or str(PROJECT_ROOT / ".store")
    return Path(raw).expanduser().resolve()


def dagster_home() -> Path:
    raw = os.environ.get("DAGSTER_HOME") or str(PROJECT_ROOT / ".dagster_home")
    return Path(raw).expanduser().resolve()


def workers() -> int:
    return max(1, int(os.environ.get("FOUNDRY_WORKERS", min(2, os.cpu_count() or 1))))


def resolve_data_path(path: str, root: Path | None = None) -> Path:
    """Expand variables; a relative path is taken under the data root."""
    expanded = Path(expand_vars(path)).expanduser()
    if expanded.is_absolute():
        return expanded
    return ((root or data_root()) / expanded).resolve()


def configure_offline_environment() -> None:
    """Keep every cache inside the project and every library off the network."""
    cache = PROJECT_ROOT / ".cache"
    defaults = {
        "HF_HOME": str(cache / "hf"),
        "XDG_CACHE_HOME": str(cache / "xdg"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DAGSTER_HOME": str(dagster_home()),
        "TOKENIZERS_PARALLELISM": "false",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    Path(os.environ["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)
