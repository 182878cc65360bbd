"""How the checkpoint asset starts `python -m training.train`: one process, torchrun on this node,
or torchrun on several nodes.

    nnodes = 1, nproc = 1   python -m training.train --config RUN.json
    nnodes = 1, nproc = N   torchrun --standalone --nproc_per_node=N ...
    nnodes = M              <launcher> torchrun --nnodes=M --nproc_per_node=N --rdzv_backend=c10d
                                       --rdzv_endpoint=HOST:PORT --rdzv_id=<store key> ...

Across nodes the launcher (e.g. `srun --nodes=2 --ntasks-per-node=1`) starts that same command
once on every node and returns when they all end; the c10d rendezvous at the endpoint assigns
the ranks, and the build's store key as rendezvous id keeps two builds from joining each other.
With a launcher (even on one node) rank 0 may run on another machine than Dagster, so nothing may
live on this one only: the Pipes context travels in the environment (srun passes it on), the
messages in a file beside the build's output on the store every node sees, and the trainer
watches its own parent, as Dagster's pid means nothing on another machine.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from dagster import (
    PipesEnvContextInjector,
    PipesFileMessageReader,
    PipesSubprocessClient,
)

ENDPOINT = re.compile(r"^\[?[A-Za-z0-9_.:-]+\]?:\d{1,5}$")  # host:port, an IPv6 host in brackets


@dataclass(frozen=True)
class TrainLaunch:
    nproc: int = 1  # processes per node
    nnodes: int = 1
    rdzv_endpoint: str = ""  # host:port of the c10d rendezvous (several nodes)
    launcher: tuple[str, ...] = ()  # command prefix that runs the torchrun command on every node

    @classmethod
    def of(cls, nproc: int, nnodes: int = 1, rdzv_endpoint: str = "", launcher: str = "") -> TrainLaunch:
        """From the resource's fields, checked; errors name the field and its environment variable."""
        if nproc < 1:
            raise ValueError(f"train_nproc (FOUNDRY_TRAIN_NPROC) must be >= 1, got {nproc}")
        if nnodes < 1:
            raise ValueError(f"train_nnodes (FOUNDRY_TRAIN_NNODES) must be >= 1, got {nnodes}")
        try:
            prefix = tuple(shlex.split(launcher))
        except ValueError as err:
            raise ValueError(f"train_launcher (FOUNDRY_TRAIN_LAUNCHER) {launcher!r}: {err}") from None
        if nnodes > 1:
            if not ENDPOINT.match(rdzv_endpoint):
                raise ValueError(f"train_nnodes = {nnodes} needs train_rdzv_endpoint (FOUNDRY_TRAIN_RDZV_ENDPOINT) "
                                 f"as host:port of the rendezvous (one of the nodes), got {rdzv_endpoint!r}")
            if not prefix:
                raise ValueError(f"train_nnodes = {nnodes} needs train_launcher (FOUNDRY_TRAIN_LAUNCHER): the "
                                 "command that starts training on every node, e.g. 'srun --nodes=2 "
                                 "--ntasks-per-node=1'; without it only this node would join the rendezvous")
        return cls(nproc, nnodes, rdzv_endpoint, prefix)

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    @property
    def multinode(self) -> bool:
        return self.nnodes > 1

    @property
    def remote(self) -> bool:
        """A launcher may start the ranks on other machines than this one."""
        return self.multinode or bool(self.launcher)

    def command(self, run_file: Path, rdzv_id: str) -> list[str]:
        train = ["-m", "training.train", "--config", str(run_file)]
        if self.world_size == 1:
            return [*self.launcher, sys.executable, *train]
        torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={self.nproc}"]
        if not self.multinode:
            return [*self.launcher, *torchrun[:3], "--standalone", *torchrun[3:], *train]
        return [*self.launcher, *torchrun, f"--nnodes={self.nnodes}", "--rdzv_backend=c10d",
                f"--rdzv_endpoint={self.rdzv_endpoint}", f"--rdzv_id={rdzv_id}", "--max_restarts=0", *train]

    def pipes_client(self, cwd: Path, messages: Path) -> PipesSubprocessClient:
        """Dagster's side of the channel; `messages` is a file every node sees (used across nodes)."""
        if not self.remote:  # temp files on this node: the default
            return PipesSubprocessClient(cwd=str(cwd))
        return PipesSubprocessClient(cwd=str(cwd), context_injector=PipesEnvContextInjector(),
                                     message_reader=PipesFileMessageReader(str(messages)))

    def env(self, orchestrator_pid: int) -> dict[str, str]:
        """The trainer stops when the orchestrator is gone; its pid is only meaningful on this node."""
        return {} if self.remote else {"FOUNDRY_PARENT_PID": str(orchestrator_pid)}
