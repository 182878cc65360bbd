"""Fault drills: `foundry sync` killed with SIGKILL mid-curation and mid-tokenization, a store
path that cannot be written, two syncs of one recipe at once and a corrupt stats database —
each followed by checks that nothing is lost, duplicated or half visible.

Everything runs as a user runs it: `foundry sync` subprocesses (killed as a whole process
group) on a real Dagster instance (sqlite in a temp DAGSTER_HOME) and a tiny recipe. To fit
the test-time budget the drills share two workspaces and build on each other in file order
(run the file, not one drill alone; ~90 s on 2 idle cores, marked slow):

    together   two syncs started at once on a fresh store and instance; their store is also
               the reference build the interrupted workspace must equal, key for key, and byte
               for byte up to the mixture (a store key hashes spec + inputs, so outputs compare)
    drills     one store and instance, interrupted and resumed in turn

FOUNDRY_TEST_PUBLISH_DELAY (see assets/store.py) holds a finished build unpublished for a
while, so each kill lands before publication however fast the machine is.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.recipes import tiny_recipe

PROJECT = Path(__file__).resolve().parent.parent
# secret-looking variables in every drill's environment: none may surface in the store or the instance
SECRETS = {"OPENAI_API_KEY": "sk-drill-5f0c2a9e1b7d4c36", "HF_TOKEN": "hf_drillToken8e41c0d2b9a7"}
NOT_OUTPUTS = {"logs", "locks", "stats", "cache"}  # store folders that hold no published outputs
# outputs rebuilt byte for byte; a checkpoint's config.json and summary.json record its store path and
# timings, so from the checkpoint on only keys (and the weights) are comparable
DATA_KINDS = ("raw", "filtered", "curated", "tokenizer", "tokenized", "mixture")


def drill_recipe() -> dict:
    """The smallest whole pipeline: one source of 60 documents, 2 training steps, no eval tasks."""
    r = tiny_recipe("drill")
    del r["sources"]["commoncrawl"]
    r["sources"]["fineweb"]["limit"] = 60
    r["mixture"] = {"weights": {"fineweb": 1.0}, "total_tokens": 5000}
    r["training"] = {"steps": 2, "batch_size": 2, "warmup_steps": 1, "log_every": 1}
    r["evals"] = {"tasks": [], "heldout": None}
    r["contamination"] = None
    return r


class Workspace:
    def __init__(self, root: Path, recipe: Path):
        self.root, self.recipe = root, recipe
        self.store, self.home = root / "store", root / "home"

    def env(self, **extra: str) -> dict:
        return dict(os.environ, FOUNDRY_STORE=str(self.store), DAGSTER_HOME=str(self.home), FOUNDRY_WORKERS="1",
                    HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", FOUNDRY_PROGRESS_EVERY_S="1", **SECRETS, **extra)

    def start(self, **extra: str) -> subprocess.Popen:
        # own session: SIGKILL reaches the whole group (datatrove workers, the trainer)
        return subprocess.Popen([sys.executable, "-m", "assets.cli", "sync", "--recipe", str(self.recipe), "--json"],
                                cwd=PROJECT, env=self.env(**extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)

    def sync(self, **extra: str) -> tuple[int, dict | None, str]:
        proc = self.start(**extra)
        out, err = proc.communicate(timeout=300)
        return proc.returncode, (json.loads(out) if out.strip() else None), err

    def kill_when_building(self, kind: str, settle_s: float, **extra: str) -> tuple[Path, str]:
        """Start a sync, SIGKILL its process group once a `kind` build is under way; returns that
        build's temp dir and what the sync had printed."""
        proc = self.start(**extra)
        kind_dir = self.store / kind
        deadline = time.time() + 120
        tmp = None
        while time.time() < deadline and proc.poll() is None and tmp is None:
            tmp = next((p for p in kind_dir.glob(".tmp-*") if p.is_dir()), None) if kind_dir.is_dir() else None
            time.sleep(0.05)
        assert tmp is not None, f"no {kind} build started: {proc.communicate()[1][-3000:]}"
        time.sleep(settle_s)
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        return tmp, err


def published(store: Path) -> dict[str, dict]:
    """kind/key -> manifest of every visible output."""
    out = {}
    for kind_dir in sorted(p for p in store.iterdir() if p.is_dir() and p.name not in NOT_OUTPUTS):
        for d in sorted(kind_dir.iterdir()):
            if not d.name.startswith("."):
                out[f"{kind_dir.name}/{d.name}"] = json.loads((d / "_manifest.json").read_text())
    return out


def assert_consistent(store: Path) -> dict[str, dict]:
    """Every visible output is complete (manifest lists exactly its files, hashes match) and no
    temp dir of a build is left anywhere."""
    leftovers = [str(p.relative_to(store)) for p in store.rglob(".tmp-*")]
    assert leftovers == [], f"partial builds left in the store: {leftovers}"
    outputs = published(store)
    for name, manifest in outputs.items():
        d = store / name
        on_disk = {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()} - {"_manifest.json"}
        assert on_disk == set(manifest["files"]), f"{name}: files differ from its manifest"
        for rel, meta in manifest["files"].items():
            data = (d / rel).read_bytes()
            assert len(data) == meta["bytes"] and hashlib.sha256(data).hexdigest() == meta["sha256"], f"{name}/{rel}"
    return outputs


def only(outputs: dict[str, dict], kind: str) -> str:
    keys = [k for k in outputs if k.startswith(kind + "/")]
    assert len(keys) == 1, (kind, keys)
    return keys[0]


def build_events(store: Path, kind: str, key: str) -> list[str]:
    path = store / "logs" / kind / f"{key}.jsonl"
    return [json.loads(line)["event"] for line in path.read_text().splitlines()]


def attempts(store: Path, kind: str, key: str) -> list[str]:
    """How each build attempt of a key ended, from its JSON-lines log: 'end', 'error' or 'killed'."""
    outcome = []
    for event in build_events(store, kind, key):
        if event == "start":
            outcome.append("killed")  # until a later line says otherwise
        elif event in ("end", "error"):
            outcome[-1] = event
    return outcome


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "drill.yaml"
    path.write_text(yaml.safe_dump(drill_recipe()))
    return path


@pytest.fixture(scope="module")
def together(tmp_path_factory, recipe_file) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("together"), recipe_file)


@pytest.fixture(scope="module")
def drills(tmp_path_factory, recipe_file) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("drills"), recipe_file)


# --------------------------------------------------------------------- the store's claims and clean-up

HOLDER = r"""
import sys, time
from pathlib import Path
from assets.store import ArtifactStore
store = ArtifactStore(Path(sys.argv[1]))
with store.claim("tokenized", "00aa"):
    print("claimed", flush=True)
    time.sleep(1.0)
    with store.build("tokenized", "00aa") as b:
        (b.dir / "tokens.npy").write_bytes(b"first")
"""


def test_a_claimed_key_makes_the_next_builder_wait_then_find_the_output(tmp_path):
    from assets.store import ArtifactStore

    store = ArtifactStore(tmp_path / "store")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(store.root)], cwd=PROJECT, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "claimed"
    waited = []
    with store.claim("tokenized", "00aa", on_wait=lambda: waited.append(time.monotonic())):
        manifest = store.lookup("tokenized", "00aa")  # what a builder does once it holds the claim
    assert holder.wait(timeout=30) == 0
    assert waited and manifest is not None and manifest.files["tokens.npy"]["bytes"] == 5
    with store.claim("tokenized", "00aa"), store.claim("tokenized", "00aa"):  # re-entrant in one process
        pass


def test_leftovers_of_dead_builders_are_removed_and_live_ones_kept(tmp_path):
    from assets.store import ArtifactStore, StoreWriteError

    store = ArtifactStore(tmp_path / "store")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, live_pid = int(dead.stdout), os.getpid()
    kind = store.root / "curated"
    kind.mkdir(parents=True)
    gone = [kind / f".tmp-00aa-{dead_pid}-abc123", kind / f".tmp-00aa-{dead_pid}-abc123.run.json",
            store.root / f".tmp-stats.duckdb.{dead_pid}"]
    kept = [kind / f".tmp-00bb-{live_pid}-def456", kind / "00cc"]
    for path in gone[:1] + kept:
        path.mkdir()
    for path in gone[1:]:
        path.write_text("{}")
    assert sorted(store.remove_abandoned()) == sorted(gone)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in gone)
    # a path in the way is named in the error, and nothing is published
    (store.root / "tokenized").write_text("not a folder")
    with pytest.raises(StoreWriteError, match=f"{store.root / 'tokenized'} is a file, not a directory"):
        with store.build("tokenized", "00dd"):
            pass
    assert store.lookup("tokenized", "00dd") is None


# --------------------------------------------------------------------- two syncs at once


@pytest.mark.slow
def test_two_syncs_at_once_build_each_output_once(together):
    first, second = together.start(), together.start()
    results = []
    for proc in (first, second):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results.append((json.loads(out), err))
    together.terminal = "".join(err for _, err in results)  # what the users saw; checked for progress below
    outputs = assert_consistent(together.store)
    assert {k.split("/")[0] for k in outputs} == {"raw", "filtered", "curated", "tokenizer", "tokenized", "mixture",
                                                 "checkpoint", "eval_report", "data_stats"}
    # every asset ran in exactly one of the two; the other recorded a cache hit or found it fresh
    ran = [set(report["ran"]) for report, _ in results]
    assert not ran[0] & ran[1], f"built twice: {ran[0] & ran[1]}"
    assert len(ran[0] | ran[1]) == 9
    for name in outputs:  # one build per output key, never a second attempt
        assert attempts(together.store, *name.split("/")) == ["end"], name
    # the two really overlapped: one waited for (or reused) what the other was building
    assert results[0][0]["cache_hit"] or results[1][0]["cache_hit"]


# --------------------------------------------------------------------- SIGKILL, write failure, resume


@pytest.mark.slow
def test_sigkill_during_curation_publishes_nothing(drills):
    tmp, _ = drills.kill_when_building("filtered", settle_s=1.0, FOUNDRY_TEST_PUBLISH_DELAY="filtered=60")
    assert tmp.is_dir() and not (tmp / "_manifest.json").exists()  # killed mid-build
    assert [p.name for p in (drills.store / "filtered").iterdir() if not p.name.startswith(".")] == []
    assert not (drills.store / "curated").exists()
    assert attempts(drills.store, "filtered", tmp.name.split("-")[1]) == ["killed"]


@pytest.mark.slow
def test_sigkill_during_tokenization_publishes_nothing(drills):
    tmp, err = drills.kill_when_building("tokenized", settle_s=0.5, FOUNDRY_TEST_PUBLISH_DELAY="tokenized=60")
    assert "temp folder(s) of interrupted builds" in err  # the killed curation's leftovers went first
    assert tmp.is_dir() and not (tmp / "_manifest.json").exists()
    assert [p.name for p in (drills.store / "tokenized").iterdir() if not p.name.startswith(".")] == []
    curated = drills.store / "curated"
    assert len([p for p in curated.iterdir() if not p.name.startswith(".")]) == 1  # finished before the kill
    # the interrupted curation shows in its build log as an attempt that never ended
    filtered_key = next(p.name for p in (drills.store / "filtered").iterdir() if not p.name.startswith("."))
    assert attempts(drills.store, "filtered", filtered_key) == ["killed", "end"]


@pytest.mark.slow
def test_unwritable_store_path_fails_clearly_and_leaves_the_store_consistent(drills):
    blocker = drills.store / "mixture"
    blocker.write_text("a regular file where the store expects a folder\n")
    code, report, err = drills.sync()
    assert code == 1
    assert report["failed"] == ["drill/mixture"]
    assert f"cannot write to the store at {blocker}: {blocker} is a file, not a directory" in err
    assert "drill/tokenized_fineweb" in report["ran"]  # finished the interrupted tokenization first
    (mixture_log,) = (drills.store / "logs" / "mixture").glob("*.jsonl")
    assert attempts(drills.store, "mixture", mixture_log.stem) == ["error"]
    blocker.unlink()
    assert_consistent(drills.store)


@pytest.mark.slow
def test_sync_after_the_faults_completes_and_equals_a_clean_build(drills, together):
    code, report, err = drills.sync()
    assert code == 0, err[-3000:]
    assert set(report["ran"]) == {"drill/mixture", "drill/checkpoint", "drill/eval_report", "drill/data_stats"}
    outputs = assert_consistent(drills.store)
    reference = published(together.store)
    data = {name for name in outputs if name.startswith(DATA_KINDS)}
    assert data == {name for name in reference if name.startswith(DATA_KINDS)} and len(data) == 6
    for name in data:  # the same store keys (same specs, same input data) and the same bytes
        assert outputs[name]["files"] == reference[name]["files"], f"{name} differs from the clean build"
    checkpoint = only(outputs, "checkpoint")
    assert checkpoint == only(reference, "checkpoint")
    assert outputs[checkpoint]["files"]["model.safetensors"] == reference[checkpoint]["files"]["model.safetensors"]
    curated = drills.store / only(outputs, "curated")
    ids = [json.loads(line)["id"] for f in sorted((curated / "docs").glob("*.jsonl"))
           for line in f.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == outputs[only(outputs, "curated")]["counts"]["kept"] > 0
    tokenized = outputs[only(outputs, "tokenized")]["counts"]
    assert tokenized == reference[only(reference, "tokenized")]["counts"]
    assert tokenized["documents"] == len(ids)
    # the killed attempts are on record: a start with no end, then the build that finished
    assert attempts(drills.store, *only(outputs, "tokenized").split("/")) == ["killed", "end"]


# --------------------------------------------------------------------- corrupt stats database


@pytest.mark.slow
def test_corrupt_stats_database_is_rebuilt_by_sql_and_by_sync(together):
    db = together.store / "stats.duckdb"
    good = db.read_bytes()
    expected = "count_star()\n60\n"

    def sql() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "assets.cli", "sql", "select count(*) from curation", "--csv"],
                              cwd=PROJECT, env=together.env(), capture_output=True, text=True, timeout=120)

    db.write_bytes(os.urandom(len(good)))  # garbage
    out = sql()
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected and "rebuilt it from the Parquet statistics" in out.stderr
    db.write_bytes(good[: len(good) // 3])  # truncated
    code, report, err = together.sync()
    assert code == 0 and report["ran"] == [] and "rebuilt it from the Parquet statistics" in err
    out = sql()
    assert out.returncode == 0 and out.stdout == expected and "rebuilt" not in out.stderr


# --------------------------------------------------------------------- progress and structured logs


@pytest.mark.slow
def test_progress_reaches_the_terminal_the_run_log_and_json_lines(together):
    from dagster import DagsterInstance

    assert "drill/filtered_fineweb: curating: done, 60 documents in" in together.terminal
    for what in ("curating", "tokenizing"):  # the terminal: `  drill/x │ drill/x: curating: ... documents/s ...`
        assert any(f": {what}: " in line and "documents/s" in line for line in together.terminal.splitlines())
    instance = DagsterInstance.from_config(str(together.home))
    try:
        messages = [entry.user_message for run in instance.get_runs() for entry in instance.all_logs(run.run_id)]
    finally:
        instance.dispose()
    for what in ("curating", "tokenizing"):
        lines = [m for m in messages if f": {what}: " in m and "documents/s" in m]
        assert lines, f"no {what} progress in the Dagster run log"
    assert any("drill/tokenized_fineweb: tokenizing: done, 53 documents in" in m for m in messages)
    records = []
    for path in sorted((together.store / "logs").rglob("*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines()]  # every line parses
    progress = [r for r in records if r["event"] == "progress"]
    assert {r["what"] for r in progress} == {"curating", "tokenizing"}
    assert all(r["rate"] > 0 and r["done"] > 0 and r["run_id"] and r["key"] for r in progress)
    ends = [r for r in records if r["event"] == "end"]
    assert len(ends) == 9 and all(r["seconds"] >= 0 and r["bytes"] > 0 for r in ends)


@pytest.mark.slow
def test_secret_environment_reaches_no_metadata_log_or_stats(drills, together):
    """Secrets come only from the environment and go nowhere else (rephrase's API key has its
    own test in test_rephrase.py)."""
    needles = [v.encode() for v in SECRETS.values()]
    leaks = [str(p) for ws in (drills, together) for folder in (ws.store, ws.home) for p in folder.rglob("*")
             if p.is_file() and any(n in p.read_bytes() for n in needles)]
    assert leaks == []
