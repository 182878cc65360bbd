"""The Dagster UI in a real browser: `foundry ui` over a materialized tiny recipe, driven by
Playwright through Debian's chromium. The asset catalog and the lineage graph show every asset
of the recipe; the curated source's drop-reason table, the checkpoint's loss plot and the eval
report's score table render in their asset pages with the figures the store holds. One
screenshot per page goes to the test's tmp_path (screenshots/).

Needs `apt-get install chromium` and the `playwright` package (the `test` extra); Playwright's
own browser download is not used. .ci/run installs both.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.recipes import tiny_recipe
from tests.support.network import free_port

PROJECT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Without the background-networking switches chromium keeps calling Google services, which on a
# closed network means a stream of failing connections.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install -e '.[test]')")
pytestmark = [
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason="chromium not installed (apt-get install chromium)"),
    pytest.mark.slow,  # a tiny recipe built end to end, then the UI started: ~1.5 min on 2 cores
]


def _recipe() -> dict:
    """The smallest recipe with every page the test reads: curation with drops, training, evals."""
    r = tiny_recipe("ui")
    del r["sources"]["commoncrawl"]
    r["sources"]["fineweb"].update(limit=60, curation={"gopher_quality": {}, "c4_quality": {}})
    r["mixture"] = {"weights": {"fineweb": 1.0}, "total_tokens": 10000}
    r["tokenizer"]["sample_docs_per_source"] = 40
    r["training"].update(steps=4, log_every=1)
    r["evals"].update(tasks=["arc_easy"], max_items=4)
    r["contamination"] = None
    return r


def _manifest(store: Path, kind: str) -> tuple[Path, dict]:
    (out,) = [p for p in (store / kind).iterdir() if not p.name.startswith(".")]
    return out, json.loads((out / "_manifest.json").read_text())


def _wait_for_ui(port: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "foundry ui exited before serving"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"the UI did not answer on port {port} within {timeout:.0f}s")


def _tables(page) -> list[list[list[str]]]:
    """Every HTML table on the page as rows of cell texts (nested tables separately)."""
    return page.evaluate("""() => [...document.querySelectorAll('table')].map(
        t => [...t.rows].map(r => [...r.cells].map(c => c.innerText.trim())))""")


def _table_with_header(page, header: list[str], timeout: float = 60) -> list[list[str]]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for rows in _tables(page):
            if rows and rows[0] == header:
                return rows[1:]
        page.wait_for_timeout(500)
    raise AssertionError(f"no table with header {header} on {page.url}")


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """A materialized tiny recipe and `foundry ui` serving it; yields (base URL, store, out dir)."""
    root = tmp_path_factory.mktemp("ui")
    recipe = root / "ui.yaml"
    recipe.write_text(yaml.safe_dump(_recipe()))
    env = dict(os.environ, FOUNDRY_STORE=str(root / "store"), DAGSTER_HOME=str(root / "home"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    built = subprocess.run([sys.executable, "-m", "assets.cli", "sync", "--recipe", str(recipe), "--json"],
                           cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    ran = json.loads(built.stdout)["ran"]
    port = free_port()
    log = (root / "ui.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "assets.cli", "ui", "--recipe", str(recipe), "--port", str(port)],
                            cwd=PROJECT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_ui(port, proc)
        yield {"base": f"http://127.0.0.1:{port}", "store": root / "store", "ran": ran}
    finally:
        proc.send_signal(signal.SIGINT)  # foundry ui stops the dagster dev tree it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def browser(ui):
    profile = tempfile.mkdtemp(prefix="foundry-chromium-")  # a fresh user-data-dir per run
    with playwright_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1600, "height": 1000})
        context.set_default_timeout(60_000)
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser):
    page = browser.new_page()
    yield page
    page.close()


@pytest.fixture
def shot(page, tmp_path):
    """shot(name): a full-page screenshot under this test's tmp_path/screenshots/."""
    folder = tmp_path / "screenshots"
    folder.mkdir()
    yield lambda name: page.screenshot(path=str(folder / f"{name}.png"), full_page=True)
    assert list(folder.glob("*.png")), "every page test saves a screenshot"


def _names(ran: list[str]) -> set[str]:
    return {label.split("/", 1)[1].split("[")[0] for label in ran}


def test_catalog_and_lineage_graph_show_every_asset(ui, page, shot):
    names = _names(ui["ran"])
    assert names >= {"raw_fineweb", "filtered_fineweb", "curated_fineweb", "checkpoint", "eval_report", "data_stats"}
    page.goto(ui["base"] + "/assets", wait_until="networkidle")
    for name in names:
        page.get_by_text(f"ui / {name}", exact=True).first.wait_for()
    page.wait_for_function("() => !document.body.innerText.includes('Loading...')")
    body = page.inner_text("body")
    assert body.count("Materialized") >= len(names) - 1  # all but the partitioned one (it shows 1/1)
    shot("catalog")

    page.goto(ui["base"] + "/asset-groups", wait_until="networkidle")  # the global lineage graph
    page.wait_for_function(f"() => document.querySelectorAll('foreignObject').length >= {len(names)}")
    # one node per asset; a node's text starts with its name (then kinds, status); no name here
    # is a prefix of another
    nodes = page.evaluate("() => [...document.querySelectorAll('foreignObject')].map(n => n.textContent.trim())")
    assert len(nodes) == len(names), nodes
    assert all(sum(label.startswith(name) for label in nodes) == 1 for name in names), nodes
    shot("lineage")


def test_curated_page_renders_drop_reasons_and_histogram(ui, page, shot):
    _, manifest = _manifest(ui["store"], "curated")
    counts = manifest["counts"]
    assert counts["reasons"], "the test recipe must drop something"
    page.goto(ui["base"] + "/assets/ui/curated_fineweb", wait_until="networkidle")
    rows = _table_with_header(page, ["reason", "documents", "share"])
    shown = {r[0]: int(r[1].replace(",", "")) for r in rows}
    assert shown == counts["reasons"]
    steps = _table_with_header(page, ["step", "in", "kept", "dropped", "keep rate", "top drop reasons"])
    assert steps[0][1] == str(counts["documents"]) and steps[-1][0] == "minhash"
    shot("curated_fineweb")
    # the histogram is a PNG inside markdown: the metadata table puts it behind [Show Markdown]
    page.locator("tr", has_text="length_histogram").get_by_text("[Show Markdown]").click()
    image = page.locator(".bp5-dialog img").first
    image.wait_for()
    assert image.get_attribute("src").startswith("data:image/png")
    assert image.evaluate("img => img.complete && img.naturalWidth") > 100
    shot("curated_fineweb_histogram")


def test_checkpoint_page_renders_the_loss_plot(ui, page, shot):
    out, manifest = _manifest(ui["store"], "checkpoint")
    losses = pq.read_table(out / "metrics.parquet", columns=["loss"]).column("loss").to_pylist()
    page.goto(ui["base"] + "/assets/ui/checkpoint", wait_until="networkidle")
    plot = page.locator("pre", has_text="┤").first
    plot.wait_for()
    text = plot.inner_text()
    assert f"{max(losses):7.3f} ┤".strip() in text and f"{min(losses):7.3f} ┤".strip() in text
    assert f"step 1 … {manifest['counts']['steps']}" in text and text.count("•") == len(losses)
    page.get_by_text("training loss", exact=True).wait_for()
    shot("checkpoint")


def test_eval_report_page_renders_the_score_table(ui, page, shot):
    _, manifest = _manifest(ui["store"], "eval_report")
    page.goto(ui["base"] + "/assets/ui/eval_report", wait_until="networkidle")
    rows = _table_with_header(page, ["task", "form", "metric", "value", "stderr", "items"])
    expected = [[r["task"], r.get("form", ""), r["metric"], f"{r['value']:.4f}"] for r in manifest["counts"]["rows"]]
    assert [r[:4] for r in rows] == expected
    assert {r[0] for r in rows} == {"arc_easy", "wikitext2"}
    shot("eval_report")
