"""Execution knobs as a Dagster resource. None of these fields enters any hash."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dagster import ConfigurableResource
from pydantic import Field

from dataprep.executors import ExecutorSettings

from . import settings
from .launch import TrainLaunch
from .store import ArtifactStore


class FoundryResource(ConfigurableResource):
    store_root: str = Field(default_factory=lambda: str(settings.store_root()))
    data_root: str = Field(default_factory=lambda: str(settings.data_root()))
    workers: int = Field(default_factory=settings.workers, description="curation processes")
    train_threads: int = Field(default_factory=settings.workers, description="torch CPU threads")
    checkpoint_every: int = Field(
        default_factory=lambda: int(os.environ.get("FOUNDRY_CHECKPOINT_EVERY") or 50),
        description="training saves a resumable checkpoint every N steps (0 = never); a killed build resumes "
                    "from it (default: $FOUNDRY_CHECKPOINT_EVERY, else 50)",
    )
    train_nproc: int = Field(
        default_factory=lambda: int(os.environ.get("FOUNDRY_TRAIN_NPROC") or 1),
        description="training processes (torchrun, data parallel; the recipe's batch is split over them); "
                    "default: $FOUNDRY_TRAIN_NPROC, else 1",
    )
    train_nnodes: int = Field(
        default_factory=lambda: int(os.environ.get("FOUNDRY_TRAIN_NNODES") or 1),
        description="nodes training runs on, train_nproc processes each (torchrun, c10d rendezvous; needs "
                    "train_rdzv_endpoint and train_launcher); default: $FOUNDRY_TRAIN_NNODES, else 1",
    )
    train_rdzv_endpoint: str = Field(
        default_factory=lambda: os.environ.get("FOUNDRY_TRAIN_RDZV_ENDPOINT") or "",
        description="host:port of the rendezvous across nodes (one of them); default: $FOUNDRY_TRAIN_RDZV_ENDPOINT",
    )
    train_launcher: str = Field(
        default_factory=lambda: os.environ.get("FOUNDRY_TRAIN_LAUNCHER") or "",
        description="command prefix that runs the training command once per node and waits for all, e.g. "
                    "'srun --nodes=2 --ntasks-per-node=1'; default: $FOUNDRY_TRAIN_LAUNCHER",
    )
    kernels: str = Field(
        default_factory=lambda: os.environ.get("FOUNDRY_KERNELS") or "reference",
        description="training ops: reference (PyTorch) or triton (the fused kernels of kernels/, on a GPU; "
                    "the reference runs where they cannot); default: $FOUNDRY_KERNELS, else reference",
    )
    executor: str = Field(
        default_factory=lambda: os.environ.get("FOUNDRY_EXECUTOR") or "local",
        description="datatrove executor: local, slurm or ray (default: $FOUNDRY_EXECUTOR, else local)",
    )
    executor_options: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "ExecutorSettings fields over the FOUNDRY_EXECUTOR_* environment, e.g. "
            "{partition: cpu, time: '04:00:00', cpus_per_task: 2, venv_path: /shared/foundry/.venv} "
            "for slurm or {address: 'ray://head:10001'} for ray"
        ),
    )

    def train_launch(self) -> TrainLaunch:
        return TrainLaunch.of(self.train_nproc, self.train_nnodes, self.train_rdzv_endpoint, self.train_launcher)

    def store(self) -> ArtifactStore:
        return ArtifactStore(Path(self.store_root))

    def data_path(self) -> Path:
        return Path(self.data_root)

    def executor_settings(self) -> ExecutorSettings:
        """The FOUNDRY_EXECUTOR_* environment, then `executor` and `executor_options` over it."""
        if "kind" in self.executor_options:
            raise ValueError("set the executor kind with `executor`, not executor_options.kind")
        return ExecutorSettings.from_env(**{**self.executor_options, "kind": self.executor})
