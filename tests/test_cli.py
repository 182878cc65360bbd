"""The `foundry` command as a user runs it: status on a new instance, sql, ui start/stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import duckdb
import pytest
import yaml

from tests.recipes import tiny_recipe
from tests.support.network import free_port

PROJECT = Path(__file__).resolve().parent.parent


def foundry(*args: str, env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "assets.cli", *args], cwd=PROJECT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def env(tmp_path) -> dict:
    return dict(os.environ, FOUNDRY_STORE=str(tmp_path / "store"), DAGSTER_HOME=str(tmp_path / "home"),
                HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def test_status_on_new_instance_lists_every_asset_missing(tmp_path, env):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe("r")))
    out = foundry("status", "--recipe", str(recipe), env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "14 missing"
    assert any(line.split()[1] == "r/filtered_fineweb" and "waiting for the file listing" in line for line in lines)
    assert any(line.split()[1] == "r/curated_fineweb" and "never materialized" in line for line in lines)
    assert (tmp_path / "home" / "dagster.yaml").is_file()  # instance created on first use


def test_invalid_recipe_fails_before_any_work(tmp_path, env):
    bad = tiny_recipe("bad")
    bad["mixture"]["weights"]["nonexistent"] = 1.0
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(bad))
    out = foundry("sync", "--recipe", str(recipe), "--json", env=env)
    assert out.returncode == 2
    assert str(recipe) in out.stderr and "nonexistent" in out.stderr
    assert not (tmp_path / "store").exists()


def test_sql_reads_the_stats_database(tmp_path, env):
    out = foundry("sql", "select 1", env=env)
    assert out.returncode == 1 and "foundry sync" in out.stderr  # no database yet: say what to do
    store = tmp_path / "store"
    store.mkdir()
    con = duckdb.connect(str(store / "stats.duckdb"))
    con.execute("create view evals as select 'demo' as recipe, 'hellaswag' as task, 'acc' as metric, "
                "0.25 as value, 8 as n_items")
    con.close()
    out = foundry("sql", "select task, value from evals", "--csv", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["task,value", "hellaswag,0.25"]
    out = foundry("sql", "select nope from evals", env=env)
    assert out.returncode == 1 and "query failed" in out.stderr


def test_ui_serves_the_asset_graph_and_stops_on_ctrl_c(tmp_path, env):
    recipe = tmp_path / "u.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe("u")))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "assets.cli", "ui", "--recipe", str(recipe), "--port", str(port)],
                            cwd=PROJECT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        query = json.dumps({"query": "{ assetNodes { assetKey { path } } }"}).encode()
        keys = None
        deadline = time.time() + 90
        while time.time() < deadline and keys is None:
            time.sleep(1)
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=query,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=5) as resp:
                    keys = {"/".join(n["assetKey"]["path"]) for n in json.load(resp)["data"]["assetNodes"]}
            except OSError:
                continue
        assert keys is not None, "UI did not come up"
        assert "u/curated_commoncrawl" in keys and len(keys) == 14
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
