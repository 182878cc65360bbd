"""Instance profiles (dagster.yaml, profiles/): each passes Dagster's own instance-config
validation, the pools the assets name have the limits the profiles promise, a gpu slot left by a
killed run cannot block `foundry sync`, run monitoring frees the slots of ended runs, and the
Postgres profile round-trips a materialization through a real PostgreSQL server.

Executor and launcher settings: profiles/slurm.env and ray.env go through Foundry's
ExecutorSettings (the checks `FOUNDRY_EXECUTOR_*` get) and build datatrove's executors;
profiles/torchrun_multinode.sh's torchrun flags go through torchrun's own argument parser.
"""

from __future__ import annotations

import glob
import logging
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from dagster import AssetKey, DagsterInstance, asset, materialize
from dagster._config import process_config
from dagster._config.field_utils import convert_potential_field
from dagster._core.instance.config import PoolGranularity, dagster_instance_config
from dagster._core.instance.ref import InstanceRef
from dagster._core.run_coordinator import QueuedRunCoordinator
from dagster._daemon.monitoring.concurrency import execute_concurrency_slots_iteration
from dagster._serdes.config_class import class_from_code_pointer

from tests.recipes import tiny_recipe
from tests.support.network import free_port

PROJECT = Path(__file__).resolve().parent.parent
PROFILES = PROJECT / "profiles"
INSTANCE_PROFILES = ["local.yaml", "postgres.yaml", "docker.yaml", "k8s.yaml"]
PG_ENV = {"DAGSTER_PG_HOST": "db.example", "DAGSTER_PG_PORT": "5432", "DAGSTER_PG_USER": "foundry",
          "DAGSTER_PG_PASSWORD": "not-a-secret", "DAGSTER_PG_DB": "foundry", "FOUNDRY_IMAGE": "foundry:test"}


def _home(tmp_path: Path, profile: str) -> Path:
    home = tmp_path / f"home-{profile.removesuffix('.yaml')}"
    home.mkdir()
    shutil.copyfile(PROFILES / profile, home / "dagster.yaml")
    return home


def _instance(home: Path, overrides: dict | None = None) -> DagsterInstance:
    return DagsterInstance.from_ref(InstanceRef.from_dir(str(home), overrides=overrides))


def test_local_profile_is_the_default_dagster_yaml():
    assert (PROFILES / "local.yaml").read_bytes() == (PROJECT / "dagster.yaml").read_bytes()


@pytest.mark.parametrize("profile", INSTANCE_PROFILES)
def test_profile_passes_dagster_instance_validation(tmp_path, monkeypatch, profile):
    for name, value in PG_ENV.items():
        monkeypatch.setenv(name, value)
    config, custom_class = dagster_instance_config(str(_home(tmp_path, profile)))
    assert custom_class is None
    pools = config["concurrency"]["pools"]
    assert pools["default_limit"] == 1  # gpu and duckdb: one at a time unless raised in the instance
    assert pools["granularity"] in ("run", "op")
    monitoring = config["run_monitoring"]
    assert monitoring["enabled"] and monitoring["free_slots_after_run_end_seconds"] > 0
    assert config["run_retries"]["enabled"]
    if profile != "local.yaml":
        # credentials come from the environment, never from the file
        assert config["storage"]["postgres"]["postgres_db"] == {
            "hostname": {"env": "DAGSTER_PG_HOST"}, "port": {"env": "DAGSTER_PG_PORT"},
            "username": {"env": "DAGSTER_PG_USER"}, "password": {"env": "DAGSTER_PG_PASSWORD"},
            "db_name": {"env": "DAGSTER_PG_DB"}, "scheme": "postgresql+psycopg2"}
    if profile in ("docker.yaml", "k8s.yaml"):
        # launchers that check their run workers' health can afford op-level slots
        assert pools["granularity"] == "op"
        assert set(config["run_launcher"]) == {"module", "class", "config"}


def test_profile_with_a_misspelt_key_is_rejected(tmp_path):
    """The validation above is real: Dagster names the key it does not know."""
    from dagster._core.errors import DagsterInvalidConfigError

    home = tmp_path / "bad"
    home.mkdir()
    config = yaml.safe_load((PROFILES / "local.yaml").read_text())
    config["run_monitoring"]["free_slot_after_run_end_seconds"] = 60
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(DagsterInvalidConfigError, match="free_slot_after_run_end_seconds"):
        dagster_instance_config(str(home))


@pytest.mark.parametrize("profile", ["docker.yaml", "k8s.yaml"])
def test_cluster_launcher_config_matches_its_class(monkeypatch, profile):
    """The run_launcher's own config against the launcher class's schema (dagster-docker /
    dagster-k8s). Not checked here: that the image, network, ConfigMap or volumes exist."""
    entry = yaml.safe_load((PROFILES / profile).read_text())["run_launcher"]
    pytest.importorskip(entry["module"], reason=f"{entry['module']} not installed (pip install -e '.[test]')")
    for name, value in PG_ENV.items():
        monkeypatch.setenv(name, value)
    launcher = class_from_code_pointer(entry["module"], entry["class"])
    schema = convert_potential_field(launcher.config_type()).config_type
    result = process_config(schema, entry["config"])
    assert result.success, [e.message for e in result.errors]
    bad = process_config(schema, {**entry["config"], "imagee": "x"})
    assert not bad.success


def test_local_instance_queues_runs_and_monitors_them(tmp_path):
    with _instance(_home(tmp_path, "local.yaml")) as instance:
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        concurrency = instance.get_concurrency_config()
        assert concurrency.run_queue_config.max_concurrent_runs == 2
        assert concurrency.pool_config.pool_granularity == PoolGranularity.RUN
        assert instance.global_op_concurrency_default_limit == 1
        assert instance.run_monitoring_enabled and instance.run_retries_enabled
        assert instance.event_log_storage.supports_global_concurrency_limits


def test_assets_name_their_pools():
    from assets.factory import recipe_assets
    from assets.recipe import parse_recipe

    ra = recipe_assets(parse_recipe(tiny_recipe("p"), "p.yaml"), "p.yaml")
    pools = {a.key.path[-1]: a.node_def.pool for a in ra.assets}
    assert {k: v for k, v in pools.items() if v} == {"checkpoint": "gpu", "eval_report": "gpu", "data_stats": "duckdb"}


@asset(pool="gpu")
def gpu_step() -> int:
    return 1


def _materialize_in_thread(instance: DagsterInstance) -> threading.Thread:
    thread = threading.Thread(target=lambda: materialize([gpu_step], instance=instance), daemon=True)
    thread.start()
    return thread


# The threaded runs below would capture their step's logs through `tail -F` children that outlive a
# run still finishing when the test ends; log capture is not what these tests are about.
NO_LOG_CAPTURE = {"compute_logs": {"module": "dagster._core.storage.noop_compute_log_manager",
                                   "class": "NoOpComputeLogManager"}}


def _materialized_within(instance: DagsterInstance, seconds: float) -> bool:
    """Whether gpu_step's materialization is recorded within `seconds`: the step ran, so it did not
    wait on a slot (what the run does after its step is not the question here)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if instance.get_latest_materialization_event(AssetKey("gpu_step")) is not None:
            return True
        time.sleep(0.2)
    return False


def test_a_killed_runs_gpu_slot_cannot_block_the_next_sync(tmp_path):
    """A SIGKILLed `foundry sync` never frees its slot, and Dagster cannot see that a local
    process died. With the local profile's run granularity, in-process runs (sync) claim no slot;
    with op granularity (the control) the next run would wait on that slot forever."""
    with _instance(_home(tmp_path, "local.yaml"), NO_LOG_CAPTURE) as instance:
        storage = instance.event_log_storage
        storage.set_concurrency_slots("gpu", 1)
        assert storage.claim_concurrency_slot("gpu", "killed-run", "checkpoint").is_claimed
        thread = _materialize_in_thread(instance)
        assert _materialized_within(instance, 60), "an in-process run waited on a dead run's gpu slot"
        thread.join(timeout=60)

    (tmp_path / "op").mkdir()
    with _instance(_home(tmp_path / "op", "local.yaml"), {"concurrency": {"pools": {"default_limit": 1, "granularity": "op"}}, **NO_LOG_CAPTURE}) as instance:
        storage = instance.event_log_storage
        storage.set_concurrency_slots("gpu", 1)
        assert storage.claim_concurrency_slot("gpu", "killed-run", "checkpoint").is_claimed
        thread = _materialize_in_thread(instance)
        assert not _materialized_within(instance, 3), "control: with op granularity the run should wait for the slot"
        storage.free_concurrency_slots_for_run("killed-run")  # what run monitoring does for ended runs
        assert _materialized_within(instance, 60)
        thread.join(timeout=60)


def test_run_monitoring_frees_slots_an_ended_run_kept(tmp_path):
    """The daemon's slot sweep reads the profile's free_slots_after_run_end_seconds (1 s here)."""
    local = yaml.safe_load((PROFILES / "local.yaml").read_text())["run_monitoring"]
    with _instance(_home(tmp_path, "local.yaml"),
                   {"run_monitoring": {**local, "free_slots_after_run_end_seconds": 1}}) as instance:
        run_id = materialize([gpu_step], instance=instance).run_id  # an ended run
        storage = instance.event_log_storage
        storage.set_concurrency_slots("gpu", 1)
        assert storage.claim_concurrency_slot("gpu", run_id, "gpu_step").is_claimed  # left behind
        time.sleep(2.1)
        list(execute_concurrency_slots_iteration(SimpleNamespace(instance=instance), logging.getLogger("test")))
        assert run_id not in storage.get_concurrency_run_ids()
        assert storage.get_concurrency_info("gpu").active_slot_count == 0


# --------------------------------------------------------------- executors and torchrun


def _env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as a shell would read them (comments, quotes)."""
    env = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words:
            assert len(words) == 1 and "=" in words[0], f"{path.name}: not KEY=VALUE: {line!r}"
            key, value = words[0].split("=", 1)
            env[key] = value
    return env


@pytest.mark.parametrize("name,kind", [("slurm.env", "slurm"), ("ray.env", "ray")])
def test_executor_profile_builds_its_datatrove_executor(tmp_path, name, kind):
    from dataprep.executors import ExecutorSettings, make_executor

    settings = ExecutorSettings.from_env(_env_file(PROFILES / name))
    assert settings.kind == kind
    executor = make_executor(["step"], tasks=4, workers=2, logging_dir=tmp_path / "logs", settings=settings,
                             job_name="curated_web")
    assert type(executor).__name__ == {"slurm": "SlurmPipelineExecutor", "ray": "RayPipelineExecutor"}[kind]
    with pytest.raises(ValueError, match="FOUNDRY_EXECUTOR_PARTITON"):  # a typo is named, not ignored
        ExecutorSettings.from_env({**_env_file(PROFILES / name), "FOUNDRY_EXECUTOR_PARTITON": "x"})


def test_torchrun_example_parses_with_torchrun():
    from torch.distributed.run import get_args_parser

    script = PROFILES / "torchrun_multinode.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.startswith("exec .venv/bin/torchrun "))
    env = {"NNODES": "2", "GPUS_PER_NODE": "8", "MASTER_ADDR": "node0", "MASTER_PORT": "29500",
           "RUN_JSON": "/srv/foundry/run.json", "JOB_ID": "7"}
    words = shlex.split(line)[2:]
    for name, value in env.items():
        words = [w.replace(f"${name}", value) for w in words]
    args = get_args_parser().parse_args(words)
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend, args.rdzv_endpoint) == ("2", "8", "c10d", "node0:29500")
    assert args.module and args.training_script == "training.train"
    assert args.training_script_args == ["--config", "/srv/foundry/run.json"]


# --------------------------------------------------------------- a real PostgreSQL server


def _pg_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[-3]))
    return versions[-1] if versions else None


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL on 127.0.0.1 (password auth), as the `postgres` user when we are root."""
    initdb, pg_ctl = _pg_tool("initdb"), _pg_tool("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    pytest.importorskip("dagster_postgres", reason="dagster-postgres not installed (pip install -e '.[test]')")
    import psycopg2

    as_user: list[str] = []
    owner = None
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run the server")
        as_user = ["setpriv", f"--reuid={owner.pw_uid}", f"--regid={owner.pw_gid}", "--clear-groups"]
    root = Path(tempfile.mkdtemp(prefix="foundry-pg-"))  # pytest's tmp_path is closed to other users
    password = "pw-" + os.urandom(6).hex()
    (root / "pw").write_text(password + "\n")
    if owner:
        for p in (root, root / "pw"):
            os.chown(p, owner.pw_uid, owner.pw_gid)
    port = free_port()
    data, log = root / "data", root / "server.log"

    def run(*cmd: str) -> None:
        out = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"{' '.join(cmd)}:\n{out.stdout}\n{out.stderr}\n" + (
            log.read_text() if log.exists() else "")

    try:
        run(initdb, "-D", str(data), "-U", "foundry", "--pwfile", str(root / "pw"), "--auth", "scram-sha-256",
            "-E", "UTF8", "--no-sync")
        run(pg_ctl, "-D", str(data), "-l", str(log), "-w", "-t", "60", "start", "-o",
            f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off")
        con = psycopg2.connect(host="127.0.0.1", port=port, user="foundry", password=password, dbname="postgres")
        con.autocommit = True
        con.cursor().execute("create database foundry_test")
        con.close()
        yield {"DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": str(port), "DAGSTER_PG_USER": "foundry",
               "DAGSTER_PG_PASSWORD": password, "DAGSTER_PG_DB": "foundry_test"}
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def test_postgres_profile_round_trips_a_materialization(tmp_path, monkeypatch, postgres):
    from assets import lineage
    from assets.factory import recipe_assets
    from assets.recipe import parse_recipe
    from assets.resources import FoundryResource

    for name, value in postgres.items():
        monkeypatch.setenv(name, value)
    home = _home(tmp_path, "postgres.yaml")
    recipe_file = tmp_path / "pg.yaml"
    recipe_file.write_text(yaml.safe_dump(tiny_recipe("pg")))
    ra = recipe_assets(parse_recipe(tiny_recipe("pg"), str(recipe_file)), recipe_file)
    raw = next(a for a in ra.assets if a.key == AssetKey(["pg", "raw_fineweb"]))
    store = tmp_path / "store"
    with _instance(home) as instance:
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        result = materialize([raw], instance=instance, resources={"foundry": FoundryResource(store_root=str(store))})
        assert result.success
        written = lineage.latest(instance, raw.key)
    with _instance(home) as fresh:  # a new process would see the same: nothing is kept in memory
        read = lineage.latest(fresh, raw.key)
        assert read is not None and read.run_id == result.run_id
        assert read.store_key == written.store_key and read.data_version == written.data_version
        assert (store / "raw" / read.store_key / "_manifest.json").is_file()
        assert fresh.event_log_storage.supports_global_concurrency_limits  # pools work on Postgres too
    # the CLI reads the same instance: the materialized asset is fresh, the rest missing
    env = dict(os.environ, DAGSTER_HOME=str(home), FOUNDRY_STORE=str(store))
    out = subprocess.run([sys.executable, "-m", "assets.cli", "status", "--recipe", str(recipe_file)], cwd=PROJECT,
                         env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    status = {line.split()[1]: line.split()[2] for line in out.stdout.splitlines()[:-1]}
    assert status["pg/raw_fineweb"] == "fresh" and status["pg/raw_commoncrawl"] == "missing"
