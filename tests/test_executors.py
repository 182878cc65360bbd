"""datatrove executor chosen by configuration: local runs for real, Slurm/Ray are constructed."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
from datatrove.executor import (
    LocalPipelineExecutor,
    RayPipelineExecutor,
    SlurmPipelineExecutor,
)
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter

from assets.resources import FoundryResource
from dataprep.executors import (
    ExecutorSettings,
    make_executor,
    run_executor,
    slurm_time_seconds,
)

HAS_RAY = importlib.util.find_spec("ray") is not None

SLURM_ENV = {
    "FOUNDRY_EXECUTOR": "slurm",
    "FOUNDRY_EXECUTOR_PARTITION": "cpu",
    "FOUNDRY_EXECUTOR_TIME": "04:00:00",
    "FOUNDRY_EXECUTOR_CPUS_PER_TASK": "4",
    "FOUNDRY_EXECUTOR_MEM_PER_CPU_GB": "3",
    "FOUNDRY_EXECUTOR_QOS": "high",
    "FOUNDRY_EXECUTOR_VENV_PATH": "/shared/foundry/.venv",
    "FOUNDRY_EXECUTOR_JOB_NAME_PREFIX": "fdry",
    "FOUNDRY_EXECUTOR_MAX_CONCURRENT_TASKS": "50",
    "FOUNDRY_EXECUTOR_MAX_ARRAY_LAUNCH_PARALLEL": "true",
    "FOUNDRY_EXECUTOR_SBATCH_ARGS": '{"account": "proj42", "--constraint": "intel"}',
    "FOUNDRY_EXECUTOR_RUNTIME_ENV": "",  # empty = unset
    "UNRELATED": "x",
}


def _write_inputs(folder: Path, files: int, docs: int) -> None:
    folder.mkdir(parents=True)
    for f in range(files):
        lines = [json.dumps({"id": f"{f}-{i}", "text": f"file {f} document {i}"}) for i in range(docs)]
        (folder / f"part{f}.jsonl").write_text("\n".join(lines) + "\n")


def _copy_pipeline(src: Path, dst: Path) -> list:
    return [JsonlReader(str(src)), JsonlWriter(str(dst), output_filename="${rank}.jsonl", compression=None)]


def _ids(folder: Path) -> list[str]:
    return sorted(json.loads(line)["id"] for p in folder.glob("*.jsonl") for line in p.read_text().splitlines())


# --- local ---------------------------------------------------------------------------------


def test_local_runs_two_tasks_end_to_end(tmp_path):
    _write_inputs(tmp_path / "in", files=2, docs=3)
    ex = make_executor(
        _copy_pipeline(tmp_path / "in", tmp_path / "out"), tasks=2, workers=2, logging_dir=tmp_path / "logs"
    )
    assert isinstance(ex, LocalPipelineExecutor)
    assert (ex.tasks, ex.workers, ex.skip_completed) == (2, 2, False)
    run_executor(ex)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.jsonl")) == ["00000.jsonl", "00001.jsonl"]
    assert _ids(tmp_path / "out") == [f"{f}-{i}" for f in range(2) for i in range(3)]
    assert sorted(p.name for p in (tmp_path / "logs" / "completions").iterdir()) == ["00000", "00001"]
    assert (tmp_path / "logs" / "stats.json").is_file()


def test_local_chained_stages_run_in_order(tmp_path):
    _write_inputs(tmp_path / "in", files=2, docs=2)
    first = make_executor(_copy_pipeline(tmp_path / "in", tmp_path / "mid"), 2, 2, tmp_path / "logs1", job_name="a")
    second = make_executor(
        _copy_pipeline(tmp_path / "mid", tmp_path / "out"), 1, 2, tmp_path / "logs2", job_name="b", depends=first
    )
    assert second.depends is first and second.workers == 1  # workers never exceed tasks
    run_executor(second)  # runs `first` before itself
    assert _ids(tmp_path / "out") == ["0-0", "0-1", "1-0", "1-1"]


_SIGTERM_DRILL = """
import json, os, signal, sys
from pathlib import Path
from dataprep.executors import make_executor, run_executor

def record_signals(data, rank, world_size):
    ignored = int(Path("/proc/self/status").read_text().split("SigIgn:")[1].split()[0], 16)
    Path(sys.argv[1], f"{rank}.json").write_text(json.dumps({"pid": os.getpid(), "ignored": ignored}))
    yield from data or ()

if __name__ == "__main__":
    # a background shell ignores SIGINT; Dagster's interrupt capture then gives SIGTERM that disposition
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGINT))
    run_executor(make_executor([record_signals], tasks=2, workers=2, logging_dir=Path(sys.argv[1]) / "logs"))
    print(signal.getsignal(signal.SIGTERM) == signal.SIG_IGN)
"""


def test_local_workers_obey_sigterm_when_the_caller_ignores_it(tmp_path):
    """Pool.terminate() stops workers with SIGTERM; workers that inherited SIG_IGN can hang it forever."""
    import os
    import signal
    import subprocess
    import sys

    script = tmp_path / "drill.py"
    script.write_text(_SIGTERM_DRILL)
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True"  # the caller's own disposition is put back
    workers = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    assert all(w["pid"] != 0 for w in workers)
    sigterm_bit = 1 << (signal.SIGTERM - 1)
    assert [w["ignored"] & sigterm_bit for w in workers] == [0, 0]


# --- slurm ---------------------------------------------------------------------------------


def test_slurm_constructed_from_env(tmp_path):
    settings = ExecutorSettings.from_env(SLURM_ENV)
    assert settings.kind == "slurm" and settings.runtime_env == {}
    assert settings.sbatch_args == {"account": "proj42", "constraint": "intel"}
    logs = tmp_path / "logs"
    ex = make_executor(["step"], tasks=10, workers=2, logging_dir=logs, settings=settings, job_name="curated web")
    assert isinstance(ex, SlurmPipelineExecutor)
    assert list(tmp_path.iterdir()) == []  # constructing writes nothing (and needs no sbatch)
    assert (ex.tasks, ex.partition, ex.time, ex.qos) == (10, "cpu", "04:00:00", "high")
    assert (ex.cpus_per_task, ex.mem_per_cpu_gb, ex.workers) == (4, 3, 50)  # workers: the array throttle
    assert ex.job_name == "fdry-curated_web"
    assert ex.venv_path == "/shared/foundry/.venv/bin/activate"
    assert ex.max_array_launch_parallel is True and ex.skip_completed is False
    assert ex.slurm_logs_folder == str(logs / "slurm_logs")

    sbatch = ex.get_sbatch_args(10)  # creates the slurm log folder, nothing else
    assert sbatch["partition"] == "cpu" and sbatch["time"] == "04:00:00" and sbatch["qos"] == "high"
    assert sbatch["cpus-per-task"] == 4 and sbatch["mem-per-cpu"] == "3G"
    assert sbatch["array"] == "0-9%50" and sbatch["account"] == "proj42" and sbatch["constraint"] == "intel"
    script = ex.get_launch_file_contents(sbatch, "echo run")
    assert "#SBATCH --partition=cpu" in script and "source /shared/foundry/.venv/bin/activate" in script


def test_slurm_defaults_leave_qos_to_cluster_and_chain(tmp_path):
    settings = ExecutorSettings(kind="slurm", partition="p", time="30")
    first = make_executor(["a"], 4, 1, tmp_path / "l1", settings, job_name="signatures")
    second = make_executor(["b"], 2, 1, tmp_path / "l2", settings, job_name="buckets", depends=first)
    assert second.depends is first
    assert "qos" not in first.get_sbatch_args()
    assert settings.time_seconds == 30 * 60


def _slurm(tmp_path, **kw) -> SlurmPipelineExecutor:
    settings = ExecutorSettings(kind="slurm", partition="p", time="01:00:00", poll_seconds=0.01, **kw)
    return make_executor(["step"], 2, 1, tmp_path / "logs", settings)


def _complete(ex, rank: int) -> None:
    ex.mark_rank_as_completed(rank)


def test_run_executor_waits_for_slurm_completions(tmp_path, monkeypatch):
    ex = _slurm(tmp_path)

    def fake_launch():  # stands in for sbatch: the job is queued, rank 0 finishes at once
        ex.job_id = "123"
        _complete(ex, 0)

    monkeypatch.setattr(ex, "launch_job", fake_launch)
    sleeps = []

    def fake_sleep(seconds):
        sleeps.append(seconds)
        _complete(ex, 1)  # rank 1 finishes while we wait

    run_executor(ex, ExecutorSettings(kind="slurm", partition="p", time="1", poll_seconds=0.01),
                 job_state=lambda job: "RUNNING None", sleep=fake_sleep)
    assert sleeps == [0.01]


def test_run_executor_fails_when_slurm_job_left_queue_incomplete(tmp_path, monkeypatch):
    ex = _slurm(tmp_path)
    monkeypatch.setattr(ex, "launch_job", lambda: setattr(ex, "job_id", "7"))
    with pytest.raises(RuntimeError, match=r"2/2 datatrove tasks did not complete \(ranks 0, 1\)"):
        run_executor(ex, job_state=lambda job: None, sleep=lambda s: None)


def test_run_executor_fails_on_broken_dependency_and_times_out(tmp_path, monkeypatch):
    ex = _slurm(tmp_path)
    monkeypatch.setattr(ex, "launch_job", lambda: setattr(ex, "job_id", "8"))
    with pytest.raises(RuntimeError, match="depends on failed"):
        run_executor(ex, job_state=lambda job: "PENDING DependencyNeverSatisfied", sleep=lambda s: None)
    slow = ExecutorSettings(kind="slurm", partition="p", time="1", wait_timeout_seconds=0.05)
    with pytest.raises(TimeoutError, match="not done after"):
        run_executor(ex, slow, job_state=lambda job: "PENDING Priority", sleep=lambda s: time.sleep(0.01))


# --- ray -----------------------------------------------------------------------------------


def test_ray_constructed_without_running(tmp_path):
    # datatrove imports ray only inside run(): construction works with or without ray installed.
    settings = ExecutorSettings(
        kind="ray", cpus_per_task=2, mem_per_cpu_gb=1.5, time="1-00:00:00", max_concurrent_tasks=8,
        ray_remote_kwargs={"max_retries": 2},
    )
    ex = make_executor(["step"], tasks=16, workers=2, logging_dir=tmp_path / "logs", settings=settings)
    assert isinstance(ex, RayPipelineExecutor)
    assert (ex.tasks, ex.workers, ex.cpus_per_task, ex.mem_per_cpu_gb) == (16, 8, 2, 1.5)
    assert ex.time == 24 * 3600 and ex.ray_remote_kwargs == {"max_retries": 2} and ex.skip_completed is False
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.skipif(not HAS_RAY, reason="ray is not installed (optional extra foundry[ray]); only run() needs it")
def test_ray_runs_two_tasks_on_a_local_cluster(tmp_path):
    import ray

    _write_inputs(tmp_path / "in", files=2, docs=2)
    settings = ExecutorSettings(kind="ray", mem_per_cpu_gb=0.25)
    ex = make_executor(_copy_pipeline(tmp_path / "in", tmp_path / "out"), 2, 2, tmp_path / "logs", settings)
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        run_executor(ex, settings)  # already connected: connect_ray leaves it as is
    finally:
        ray.shutdown()
    assert _ids(tmp_path / "out") == ["0-0", "0-1", "1-0", "1-1"]


# --- configuration errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"FOUNDRY_EXECUTOR": "slurm", "FOUNDRY_EXECUTOR_TIME": "1:00:00"},
         "requires `partition` (FOUNDRY_EXECUTOR_PARTITION)"),
        ({"FOUNDRY_EXECUTOR": "slurm"}, "`partition` (FOUNDRY_EXECUTOR_PARTITION), `time` (FOUNDRY_EXECUTOR_TIME)"),
        ({"FOUNDRY_EXECUTOR": "kubernetes"}, "`kind` (FOUNDRY_EXECUTOR): Input should be 'local', 'slurm' or 'ray'"),
        ({"FOUNDRY_EXECUTOR_TIME": "four hours"}, "`time` (FOUNDRY_EXECUTOR_TIME): not a Slurm time limit"),
        ({"FOUNDRY_EXECUTOR_CPUS_PER_TASK": "two"}, "`cpus_per_task` (FOUNDRY_EXECUTOR_CPUS_PER_TASK)"),
        ({"FOUNDRY_EXECUTOR_CPUS_PER_TASK": "0"}, "`cpus_per_task` (FOUNDRY_EXECUTOR_CPUS_PER_TASK)"),
        ({"FOUNDRY_EXECUTOR_MAX_CONCURRENT_TASKS": "0"}, "must be a positive count or -1"),
        ({"FOUNDRY_EXECUTOR_PARTITON": "cpu"}, "unknown executor variable FOUNDRY_EXECUTOR_PARTITON"),
        ({"FOUNDRY_EXECUTOR_SBATCH_ARGS": "account=x"}, "FOUNDRY_EXECUTOR_SBATCH_ARGS must be a JSON object"),
        ({"FOUNDRY_EXECUTOR": "slurm", "FOUNDRY_EXECUTOR_PARTITION": "p", "FOUNDRY_EXECUTOR_TIME": "5",
          "FOUNDRY_EXECUTOR_MEM_PER_CPU_GB": "1.5"}, "whole GB in `mem_per_cpu_gb`"),
        ({"FOUNDRY_EXECUTOR": "slurm", "FOUNDRY_EXECUTOR_PARTITION": "p", "FOUNDRY_EXECUTOR_TIME": "5",
          "FOUNDRY_EXECUTOR_VENV_PATH": "/v", "FOUNDRY_EXECUTOR_ENV_COMMAND": "module load x"},
         "either `venv_path` or `env_command`"),
    ],
)
def test_bad_config_errors_name_the_field(environ, message):
    with pytest.raises(ValueError) as info:
        ExecutorSettings.from_env(environ)
    assert message in str(info.value)


def test_settings_are_frozen_and_strict():
    with pytest.raises(ValueError, match="frozen"):
        ExecutorSettings().kind = "slurm"  # type: ignore[misc]
    with pytest.raises(ValueError, match="partiton"):
        ExecutorSettings(partiton="cpu")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="partition"):
        ExecutorSettings(kind="slurm", time="1")


def test_make_executor_rejects_mismatched_depends_and_counts(tmp_path):
    local = make_executor(["a"], 1, 1, tmp_path / "l")
    with pytest.raises(TypeError, match="depends must be a SlurmPipelineExecutor"):
        make_executor(["b"], 1, 1, tmp_path / "s", ExecutorSettings(kind="slurm", partition="p", time="1"),
                      depends=local)
    with pytest.raises(ValueError, match="tasks must be >= 1"):
        make_executor(["a"], 0, 1, tmp_path / "l")


def test_slurm_time_syntax():
    assert slurm_time_seconds("90") == 5400
    assert slurm_time_seconds("30:15") == 1815
    assert slurm_time_seconds("04:00:00") == 14400
    assert slurm_time_seconds("2-12") == 216000
    assert slurm_time_seconds("1-00:30:00") == 88200
    assert slurm_time_seconds("UNLIMITED") is None


# --- the Dagster resource ------------------------------------------------------------------


def test_resource_executor_settings(monkeypatch):
    for var in list(ExecutorSettings.env_names()):
        monkeypatch.delenv(var, raising=False)
    assert FoundryResource().executor == "local"
    assert FoundryResource().executor_settings() == ExecutorSettings()
    monkeypatch.setenv("FOUNDRY_EXECUTOR", "slurm")
    monkeypatch.setenv("FOUNDRY_EXECUTOR_PARTITION", "cpu")
    res = FoundryResource(executor_options={"time": "02:00:00", "sbatch_args": {"account": "a"}})
    assert res.executor == "slurm"
    got = res.executor_settings()
    assert (got.kind, got.partition, got.time, got.sbatch_args) == ("slurm", "cpu", "02:00:00", {"account": "a"})
    # the resource's `executor` wins over the environment; options win over FOUNDRY_EXECUTOR_*
    assert FoundryResource(executor="local").executor_settings().kind == "local"
    with pytest.raises(ValueError, match="requires `time`"):
        FoundryResource(executor="slurm").executor_settings()
    with pytest.raises(ValueError, match="`kind` \\(FOUNDRY_EXECUTOR\\)"):
        FoundryResource(executor="k8s").executor_settings()
    with pytest.raises(ValueError, match="not executor_options.kind"):
        FoundryResource(executor_options={"kind": "ray"}).executor_settings()
