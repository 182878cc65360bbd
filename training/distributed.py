"""Data parallelism for `training.train` under torchrun: the process group, DDP, cross-rank sums.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; one process (no torchrun) is world size 1, where
every helper here is a no-op, so the trainer has one code path. CPU runs use the gloo backend,
CUDA runs NCCL with one device per local rank.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1


def world_from_env() -> World:
    """The process's place in the job, from torchrun's environment (a single process without it)."""
    values = {}
    for name, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        raw = os.environ.get(name, default)
        try:
            values[name] = int(raw)
        except ValueError:
            raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None
    world = World(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
    if world.world_size < 1 or not 0 <= world.rank < world.world_size:
        raise ValueError(f"RANK={world.rank} must lie in [0, WORLD_SIZE={world.world_size})")
    return world


def start(world: World, device: str) -> str:
    """Join the process group (when there is more than one process); returns this rank's device."""
    if device.startswith("cuda") and world.parallel:
        device = f"cuda:{world.local_rank}"
        torch.cuda.set_device(device)
    if world.parallel and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return device


def stop() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, world: World, device: str, *, moe: bool) -> nn.Module:
    """The module the training forward goes through: DDP on several processes, the model itself
    on one. MoE layers may leave an expert without tokens on a rank, hence find_unused_parameters."""
    if not world.parallel:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [torch.device(device).index] if device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=moe)


def maybe_no_sync(module: nn.Module, skip_sync: bool):
    """DDP's no_sync (gradients stay local) for all but a step's last micro-batch; otherwise nothing."""
    if skip_sync and hasattr(module, "no_sync"):
        return module.no_sync()
    return contextlib.nullcontext()


def mean_over_ranks(values: list[float], world: World, device: str = "cpu") -> list[float]:
    """Each value averaged over ranks (equal batch sizes, so the mean of means is the global mean).
    `device` is where the collective runs: NCCL reduces CUDA tensors only."""
    if not world.parallel:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world.world_size).tolist()


def max_over_ranks_(tensors: list[torch.Tensor], world: World) -> None:
    """In place: each tensor becomes its elementwise max over ranks (e.g. per-head max logits, so
    QK-clip rescales the same heads on every rank and the replicas stay identical)."""
    if not world.parallel:
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)


def sum_over_ranks_(tensor: torch.Tensor, world: World) -> None:
    if world.parallel:
        dist.all_reduce(tensor)


def barrier(world: World) -> None:
    if world.parallel:
        dist.barrier()
