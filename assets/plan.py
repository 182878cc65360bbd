"""What an asset is, independent of Dagster's runtime: its spec, inputs and identity.

Both the asset bodies and `foundry sync/status` work from these plans, so "what would this
asset's store key be now" is answered by one piece of code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from dagster import AssetKey

from .identity import code_version


@dataclass(frozen=True)
class AssetPlan:
    recipe: str
    name: str  # e.g. "curated_fineweb"
    kind: str  # store folder and logic version: raw, curated, tokenizer, ...
    spec: Any  # JSON-able section of the recipe that defines this output
    inputs: dict[str, AssetKey] = field(default_factory=dict)  # role -> upstream asset
    description: str = ""
    context: dict[str, Any] = field(default_factory=dict, compare=False)  # not hashed
    # Upstream assets that must be built first but are not identity inputs: the per-file
    # partitions a manifest asset gathers (their outputs are found by their computed keys).
    after: tuple[AssetKey, ...] = ()
    # Name of the dynamic partitions definition (one partition per source file), if any.
    partitions: str | None = None

    @property
    def key(self) -> AssetKey:
        return AssetKey([self.recipe, self.name])

    @property
    def label(self) -> str:
        return f"{self.recipe}/{self.name}"

    @property
    def deps(self) -> list[AssetKey]:
        return list(dict.fromkeys([*self.inputs.values(), *self.after]))

    @cached_property
    def code_version(self) -> str:
        return code_version(self.kind, self.spec)
