"""Which datatrove executor runs a pipeline: local processes, a Slurm cluster or a Ray cluster.

The choice is an execution knob. It lives in `ExecutorSettings` (filled from the Dagster
resource or the environment), never in a recipe, and never enters a hash: the same recipe
gives the same output on one machine or on a cluster.

    settings = ExecutorSettings.from_env()
    first = make_executor(stage1, tasks=64, workers=2, logging_dir=logs / "signatures",
                          settings=settings, job_name="minhash_signatures")
    second = make_executor(stage2, tasks=16, workers=2, logging_dir=logs / "buckets",
                           settings=settings, job_name="minhash_buckets", depends=first)
    run_executor(second, settings)   # launches `first` too, then blocks until `second` is done

Environment scheme (read by `ExecutorSettings.from_env`)
--------------------------------------------------------
- `FOUNDRY_EXECUTOR`: `local` (default), `slurm` or `ray`.
- `FOUNDRY_EXECUTOR_<FIELD>`: any other field of `ExecutorSettings`, the field name in upper
  case: `FOUNDRY_EXECUTOR_PARTITION=cpu`, `FOUNDRY_EXECUTOR_TIME=04:00:00`,
  `FOUNDRY_EXECUTOR_CPUS_PER_TASK=2`, `FOUNDRY_EXECUTOR_ADDRESS=ray://head:10001`.
  Scalars are given as plain text (pydantic converts `2`, `1.5`, `true`); the mapping fields
  (`sbatch_args`, `runtime_env`, `ray_remote_kwargs`) take a JSON object, e.g.
  `FOUNDRY_EXECUTOR_SBATCH_ARGS='{"account": "proj42"}'`.
- An empty value counts as unset. An unknown `FOUNDRY_EXECUTOR_*` name is an error (a typo
  such as `FOUNDRY_EXECUTOR_PARTITON` must not silently fall back to a default).

Per kind
--------
- local: `LocalPipelineExecutor(tasks, workers=min(workers, tasks), skip_completed=False)`.
  Only `workers` (the caller's process count) matters; the cluster fields are ignored.
- slurm: `SlurmPipelineExecutor`; `partition` and `time` are required. `workers` passed to
  `make_executor` is ignored: the array throttle is `max_concurrent_tasks` (-1 = none).
  `venv_path` may be a venv folder or its `bin/activate` script (datatrove `source`s it).
  The logging dir, the pipeline's inputs and outputs must be on a filesystem the compute
  nodes share, and the project must be importable there (the pipeline is pickled with dill).
- ray: `RayPipelineExecutor`; `ray` is needed only to *run* (datatrove imports it in
  `run()`), not to construct. `run_executor` connects with `ray.init(address=...)` first.
  `time` (Slurm syntax) becomes the per-task timeout in seconds.

No field here is part of any hash.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time as _time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from datatrove.executor import (
    LocalPipelineExecutor,
    RayPipelineExecutor,
    SlurmPipelineExecutor,
)
from datatrove.executor.base import PipelineExecutor
from loguru import logger as loguru_logger
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

ENV_KIND = "FOUNDRY_EXECUTOR"
ENV_PREFIX = "FOUNDRY_EXECUTOR_"

ExecutorKind = Literal["local", "slurm", "ray"]

# [D-]HH:MM:SS, [D-]HH:MM, D-HH, MM:SS, MM (sbatch --time syntax)
_SLURM_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_UNLIMITED = {"unlimited", "infinite"}


def slurm_time_seconds(text: str) -> int | None:
    """Seconds in a Slurm time limit (`90`, `30:00`, `04:00:00`, `2-12`, `1-00:30:00`).

    `UNLIMITED`/`INFINITE` -> None. Raises ValueError on anything sbatch would reject.
    """
    value = text.strip()
    if value.lower() in _UNLIMITED:
        return None
    m = _SLURM_TIME.match(value)
    if not m:
        raise ValueError(f"not a Slurm time limit: {text!r} (use e.g. 04:00:00, 1-12:00:00 or minutes)")
    days, a, b, c = m.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = int(a), int(b or 0), int(c or 0)
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if c is not None:  # HH:MM:SS
        return (int(a) * 60 + int(b)) * 60 + int(c)
    if b is not None:  # MM:SS
        return int(a) * 60 + int(b)
    return int(a) * 60  # MM


class ExecutorSettings(BaseModel):
    """Where and how datatrove tasks run. Execution knobs only: never part of a hash."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: ExecutorKind = "local"

    # --- per task, slurm and ray ---------------------------------------------------------
    cpus_per_task: int = Field(1, ge=1, description="CPUs reserved per task")
    mem_per_cpu_gb: float = Field(2.0, gt=0, description="memory per CPU in GB (Slurm: whole GB)")
    gpus_per_task: int = Field(0, ge=0)
    time: str | None = Field(
        None, description="time limit per task in Slurm syntax (e.g. 04:00:00); Slurm requires it, Ray: a timeout"
    )
    max_concurrent_tasks: int = Field(-1, description="tasks running at once on the cluster; -1 = no limit")
    tasks_per_job: int = Field(1, ge=1, description="datatrove tasks per Slurm array job / Ray job")
    randomize_start_duration: int = Field(0, ge=0, description="max seconds to delay each task's start")

    # --- slurm ---------------------------------------------------------------------------
    partition: str | None = None
    qos: str | None = Field(None, description="None: the cluster's default QOS (datatrove would say 'normal')")
    job_name_prefix: str = Field("foundry", min_length=1)
    venv_path: str | None = Field(None, description="venv folder or its bin/activate, sourced by each job")
    env_command: str | None = Field(None, description="shell command that prepares the job's environment")
    sbatch_args: dict[str, str | int] = Field(default_factory=dict, description="extra #SBATCH options")
    max_array_size: int = Field(1001, description="the cluster's MaxArraySize; -1 = no limit")
    max_array_launch_parallel: bool = False
    stagger_max_array_jobs: int = Field(0, ge=0)
    run_on_dependency_fail: bool = False
    requeue: bool = True
    slurm_logs_folder: str | None = Field(None, description="default: <logging_dir>/slurm_logs")
    mail_user: str | None = None

    # --- ray -----------------------------------------------------------------------------
    address: str | None = Field(None, description="ray.init address: None/auto (RAY_ADDRESS, else local), ray://...")
    runtime_env: dict[str, Any] = Field(default_factory=dict, description="ray.init runtime_env")
    ray_remote_kwargs: dict[str, Any] = Field(default_factory=dict)

    # --- waiting for a cluster job (run_executor) ---------------------------------------
    poll_seconds: float = Field(30.0, gt=0, description="how often run_executor checks a Slurm job")
    wait_timeout_seconds: float | None = Field(None, gt=0, description="give up waiting after this long")

    @field_validator("time")
    @classmethod
    def _check_time(cls, value: str | None) -> str | None:
        if value is not None:
            slurm_time_seconds(value)
        return value

    @field_validator("max_concurrent_tasks", "max_array_size")
    @classmethod
    def _positive_or_unlimited(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError("must be a positive count or -1 (no limit)")
        return value

    @field_validator("sbatch_args")
    @classmethod
    def _strip_dashes(cls, value: dict[str, str | int]) -> dict[str, str | int]:
        return {k.lstrip("-"): v for k, v in value.items()}

    @model_validator(mode="after")
    def _check_kind(self) -> ExecutorSettings:
        if self.kind == "slurm":
            missing = [f for f in ("partition", "time") if not getattr(self, f)]
            if missing:
                names = ", ".join(f"`{f}` ({ENV_PREFIX}{f.upper()})" for f in missing)
                raise ValueError(f"executor 'slurm' requires {names}")
            if self.mem_per_cpu_gb != int(self.mem_per_cpu_gb):
                raise ValueError(
                    f"executor 'slurm' takes whole GB in `mem_per_cpu_gb` (got {self.mem_per_cpu_gb}); "
                    "use sbatch_args {'mem-per-cpu': '1536M'} for finer sizes"
                )
            if self.venv_path and self.env_command:
                raise ValueError("set either `venv_path` or `env_command`, not both")
        return self

    # -------------------------------------------------------------------------------------
    @property
    def time_seconds(self) -> int | None:
        return slurm_time_seconds(self.time) if self.time else None

    @property
    def activate_script(self) -> str | None:
        """`venv_path` as the script datatrove sources: a venv folder gets `/bin/activate`."""
        if not self.venv_path:
            return None
        if self.venv_path.rstrip("/").endswith("activate"):
            return self.venv_path
        return str(Path(self.venv_path) / "bin" / "activate")

    @classmethod
    def env_names(cls) -> dict[str, str]:
        """Environment variable -> field, for every field."""
        names = {ENV_KIND: "kind"}
        names.update({ENV_PREFIX + f.upper(): f for f in cls.model_fields if f != "kind"})
        return names

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ExecutorSettings:
        """Settings from FOUNDRY_EXECUTOR / FOUNDRY_EXECUTOR_* (see the module docstring).

        `overrides` (field=value) win over the environment; used by the Dagster resource.
        Raises ValueError naming the variable or field at fault.
        """
        env = os.environ if environ is None else environ
        names = cls.env_names()
        json_fields = {"sbatch_args", "runtime_env", "ray_remote_kwargs"}
        values: dict[str, Any] = {}
        for var, raw in env.items():
            if var != ENV_KIND and not var.startswith(ENV_PREFIX):
                continue
            if var not in names:
                known = ", ".join(sorted(names))
                raise ValueError(f"unknown executor variable {var}; known: {known}")
            if not raw.strip():
                continue
            field = names[var]
            if field in json_fields:
                try:
                    values[field] = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{var} must be a JSON object: {e}") from None
            else:
                values[field] = raw.strip()
        values.update(overrides)
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            raise ValueError(_explain(e, names)) from None


def _explain(error: ValidationError, names: Mapping[str, str]) -> str:
    env_of = {field: var for var, field in names.items()}
    lines = []
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"])
        field = str(err["loc"][0]) if err["loc"] else ""
        where = f"`{loc}` ({env_of[field]})" if field in env_of else (f"`{loc}`" if loc else "settings")
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {msg}")
    return "invalid executor settings: " + "; ".join(lines)


_EXECUTOR_CLASS: dict[str, type[PipelineExecutor]] = {
    "local": LocalPipelineExecutor,
    "slurm": SlurmPipelineExecutor,
    "ray": RayPipelineExecutor,
}


def _job_name(settings: ExecutorSettings, job_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{settings.job_name_prefix}-{job_name}")


def make_executor(
    pipeline: Sequence[Any],
    tasks: int,
    workers: int,
    logging_dir: str | os.PathLike,
    settings: ExecutorSettings | None = None,
    job_name: str = "pipeline",
    depends: PipelineExecutor | None = None,
) -> PipelineExecutor:
    """A datatrove executor for `pipeline` of the kind `settings.kind` (default: local).

    tasks: datatrove tasks (ranks); workers: local processes (local only, capped at tasks).
    depends: the executor of the previous stage (same kind); running this one first runs,
    launches or waits for it (Slurm chains the jobs with --dependency=afterok).
    Constructing writes nothing to disk and needs neither sbatch nor ray.
    """
    settings = settings or ExecutorSettings()
    if tasks < 1:
        raise ValueError(f"tasks must be >= 1 (got {tasks})")
    if workers < 1 and workers != -1:
        raise ValueError(f"workers must be >= 1 or -1 (got {workers})")
    cls = _EXECUTOR_CLASS[settings.kind]
    if depends is not None and not isinstance(depends, cls):
        raise TypeError(
            f"depends must be a {cls.__name__} for executor '{settings.kind}' "
            f"(got {type(depends).__name__}); build every stage with the same settings"
        )
    steps = list(pipeline)
    logs = str(logging_dir)
    if settings.kind == "local":
        return LocalPipelineExecutor(
            pipeline=steps,
            tasks=tasks,
            workers=tasks if workers == -1 else min(workers, tasks),
            logging_dir=logs,
            depends=depends,
            skip_completed=False,
            randomize_start_duration=settings.randomize_start_duration,
        )
    if settings.kind == "slurm":
        return SlurmPipelineExecutor(
            pipeline=steps,
            tasks=tasks,
            time=settings.time,
            partition=settings.partition,
            cpus_per_task=settings.cpus_per_task,
            mem_per_cpu_gb=int(settings.mem_per_cpu_gb),
            gpus_per_task=settings.gpus_per_task,
            workers=settings.max_concurrent_tasks,
            job_name=_job_name(settings, job_name),
            qos=settings.qos or "",  # datatrove omits --qos when falsy
            env_command=settings.env_command,
            venv_path=settings.activate_script,
            sbatch_args=dict(settings.sbatch_args),
            max_array_size=settings.max_array_size,
            depends=depends,
            logging_dir=logs,
            skip_completed=False,
            slurm_logs_folder=settings.slurm_logs_folder,
            max_array_launch_parallel=settings.max_array_launch_parallel,
            stagger_max_array_jobs=settings.stagger_max_array_jobs,
            run_on_dependency_fail=settings.run_on_dependency_fail,
            randomize_start_duration=settings.randomize_start_duration,
            mail_user=settings.mail_user,
            requeue=settings.requeue,
            tasks_per_job=settings.tasks_per_job,
        )
    return RayPipelineExecutor(
        pipeline=steps,
        tasks=tasks,
        workers=settings.max_concurrent_tasks,
        depends=depends,
        skip_completed=False,
        logging_dir=logs,
        randomize_start_duration=settings.randomize_start_duration,
        cpus_per_task=settings.cpus_per_task,
        mem_per_cpu_gb=settings.mem_per_cpu_gb,
        gpus_per_task=settings.gpus_per_task,
        ray_remote_kwargs=dict(settings.ray_remote_kwargs) or None,
        tasks_per_job=settings.tasks_per_job,
        time=settings.time_seconds,
    )


def connect_ray(settings: ExecutorSettings) -> None:
    """ray.init(address=settings.address, runtime_env=...) unless Ray is already connected."""
    try:
        import ray
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("executor 'ray' needs the `ray` package: pip install 'foundry[ray]'") from e
    if not ray.is_initialized():
        ray.init(address=settings.address, runtime_env=dict(settings.runtime_env) or None, ignore_reinit_error=True)


def slurm_job_state(job_id: str) -> str | None:
    """`STATE REASON` of a Slurm job from squeue; None once it has left the queue.

    Without an answer from squeue (not installed, timed out) it says "UNKNOWN": keep waiting.
    """
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", str(job_id), "-o", "%T %r"], capture_output=True, text=True, timeout=60, check=False
        )
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return "UNKNOWN"
    if out.returncode != 0 and "Invalid job id" not in out.stderr:
        return "UNKNOWN"
    lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return lines[0] if lines else None


def run_executor(
    executor: PipelineExecutor,
    settings: ExecutorSettings | None = None,
    *,
    job_state: Callable[[str], str | None] = slurm_job_state,
    sleep: Callable[[float], None] = _time.sleep,
) -> None:
    """Run `executor` (and the stages it depends on) and return only when every task is done.

    - local: `run()` blocks.
    - ray: connects (`connect_ray`), then `run()` blocks.
    - slurm: `run()` only submits the array job and returns at once; this launches the job
      (`launch_job`, also from inside a Slurm allocation) and then polls the completion
      markers every `poll_seconds`. It fails when the job has left the queue with tasks
      still incomplete, when a dependency can never be satisfied, or after
      `wait_timeout_seconds`.
    Every kind: raises RuntimeError if a task has no completion marker afterwards (datatrove's
    Ray executor only logs a warning when tasks fail).
    """
    settings = settings or ExecutorSettings()
    if isinstance(executor, LocalPipelineExecutor):
        with _task_logs_off_console(executor), _workers_obey_sigterm():
            executor.run()
    elif isinstance(executor, SlurmPipelineExecutor):
        executor.launch_job()
        if executor.job_id not in (None, -1):
            _wait_for_slurm(executor, settings, job_state, sleep)
    else:
        if isinstance(executor, RayPipelineExecutor):
            connect_ray(settings)
        executor.run()
    incomplete = executor.get_incomplete_ranks(skip_completed=True)
    if incomplete:
        raise RuntimeError(_incomplete_message(executor, incomplete))


@contextlib.contextmanager
def _workers_obey_sigterm() -> Iterator[None]:
    """Let datatrove's pool stop its workers: SIGTERM must not be ignored when they start.

    The pool's `terminate()` (on leaving `with Pool()`) stops workers with SIGTERM and then joins
    them. A process started in the background has SIGINT ignored, and Dagster's interrupt capture
    gives SIGTERM SIGINT's handler, so SIGTERM is ignored too; ignored signals survive exec and
    fork, so the forkserver and every worker ignore it, and `terminate()` can wait forever for a
    worker blocked on the task queue (seen with 20k documents on 2 workers under `nohup`). The
    default is restored for the run (the forkserver starts inside it) and put back after.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextlib.contextmanager
def _task_logs_off_console(executor: LocalPipelineExecutor) -> Iterator[None]:
    """Keep datatrove's per-task console log out of the caller's terminal.

    With one worker datatrove runs the tasks in this process and adds a stderr sink per task;
    the same lines go to logs/task_*.log, so here they go to logs/console.log instead.
    """
    if executor.workers != 1:
        yield  # worker processes log to their own stderr
        return
    console = Path(executor.logging_dir.path) / "console.log"
    console.parent.mkdir(parents=True, exist_ok=True)
    with open(console, "a") as sink, contextlib.redirect_stderr(sink):
        try:
            yield
        finally:
            loguru_logger.remove()  # the default sink datatrove re-added points at `sink`
    loguru_logger.add(sys.stderr, level="WARNING")


def _wait_for_slurm(
    executor: SlurmPipelineExecutor,
    settings: ExecutorSettings,
    job_state: Callable[[str], str | None],
    sleep: Callable[[float], None],
) -> None:
    started = _time.monotonic()
    gone = 0
    while executor.get_incomplete_ranks(skip_completed=True):
        state = job_state(str(executor.job_id))
        if state is not None and "DependencyNeverSatisfied" in state:
            raise RuntimeError(f"Slurm job {executor.job_id} ({executor.job_name}): a stage it depends on failed")
        # Left the queue with tasks incomplete: look twice, completion files may lag on NFS.
        gone = gone + 1 if state is None else 0
        if gone >= 2:
            return  # run_executor reports the incomplete ranks
        if settings.wait_timeout_seconds is not None and _time.monotonic() - started > settings.wait_timeout_seconds:
            raise TimeoutError(
                f"Slurm job {executor.job_id} ({executor.job_name}) not done after {settings.wait_timeout_seconds}s"
            )
        sleep(settings.poll_seconds)


def _incomplete_message(executor: PipelineExecutor, incomplete: list[int]) -> str:
    shown = ", ".join(map(str, incomplete[:10])) + (" ..." if len(incomplete) > 10 else "")
    logs = executor.logging_dir.resolve_paths("logs")
    return f"{len(incomplete)}/{executor.world_size} datatrove tasks did not complete (ranks {shown}); logs: {logs}"
