"""Rephrasing styles: prompt templates kept as YAML files, each with a version.

A style file holds `version`, `description`, `system` and `user`; `user` contains `{text}`
exactly once, where the document chunk goes. The built-in styles live beside this module
(`styles/*.yaml`); a recipe may also name a style file of its own by path.

A style's identity is its name, version and the digest of its content: editing a template
rebuilds the rephrased corpus even if the version was not bumped, and the version is what
outputs and stats record for people to read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

BUILTIN_DIR = Path(__file__).resolve().parent / "styles"
PLACEHOLDER = "{text}"


class StyleError(ValueError):
    pass


@dataclass(frozen=True)
class Style:
    name: str
    version: int
    description: str
    system: str
    user: str
    path: str

    @property
    def digest(self) -> str:
        canonical = json.dumps({"version": self.version, "system": self.system, "user": self.user}, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def identity(self) -> dict[str, object]:
        """What enters the rephrased asset's code version."""
        return {"name": self.name, "version": self.version, "digest": self.digest}

    def messages(self, text: str) -> list[dict[str, str]]:
        """OpenAI chat messages for one chunk (str.replace: documents are full of braces)."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages.append({"role": "user", "content": self.user.replace(PLACEHOLDER, text)})
        return messages


def builtin_styles() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def style_path(ref: str, base: Path | None = None) -> Path:
    """A built-in style name ("qa") or a path to a .yaml file (relative paths under `base`)."""
    if not ref.endswith((".yaml", ".yml")):
        path = BUILTIN_DIR / f"{ref}.yaml"
        if not path.is_file():
            raise StyleError(f"unknown style '{ref}': built-in styles are {builtin_styles()}, "
                             "or give a path to a .yaml style file")
        return path
    path = Path(ref)
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.is_file():
        raise StyleError(f"style file {path} does not exist")
    return path


def load_style(ref: str, base: Path | None = None) -> Style:
    path = style_path(ref, base)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise StyleError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise StyleError(f"{path}: a style file must be a YAML mapping with version, system and user")
    unknown = sorted(set(data) - {"version", "description", "system", "user"})
    if unknown:
        raise StyleError(f"{path}: unknown key(s) {unknown}")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise StyleError(f"{path}: 'version' must be a positive integer (got {version!r})")
    user = data.get("user")
    if not isinstance(user, str) or user.count(PLACEHOLDER) != 1:
        raise StyleError(f"{path}: 'user' must be a string containing {PLACEHOLDER} exactly once")
    system = data.get("system") or ""
    if not isinstance(system, str):
        raise StyleError(f"{path}: 'system' must be a string")
    return Style(name=path.stem, version=version, description=str(data.get("description") or ""),
                 system=system.strip(), user=user, path=str(path))
