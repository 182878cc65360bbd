"""Putting back environment variables a module-scoped fixture set (pytest's monkeypatch is per test)."""

from __future__ import annotations

import os


def restore_environ(saved: dict[str, str | None]) -> None:
    """saved: name -> the value before (None: it was unset)."""
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
