"""Execution knobs as a Dagster resource. None of these fields enters any hash."""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from . import settings
from .store import ArtifactStore


class FoundryResource(ConfigurableResource):
    store_root: str = Field(default_factory=lambda: str(settings.store_root()))
    data_root: str = Field(default_factory=lambda: str(settings.data_root()))
    workers: int = Field(default_factory=settings.workers, description="curation processes")
    train_threads: int = Field(default_factory=settings.workers, description="torch CPU threads")

    def store(self) -> ArtifactStore:
        return ArtifactStore(Path(self.store_root))

    def data_path(self) -> Path:
        return Path(self.data_root)
