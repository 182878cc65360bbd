"""Rephrased corpora: styles, chunking, selection, the request cache, the extractive backend,
recipe validation -- and, end to end on a real Dagster instance against a real local
OpenAI-compatible server, identity, mixing, stats, secrets and kill-then-resume."""

from __future__ import annotations

import copy
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.recipes import tiny_recipe
from tests.support.environ import restore_environ

PROJECT = Path(__file__).resolve().parent.parent
SECRET = "sk-foundry-test-7f3a9c1d-NEVER-LOG-ME"

PASSAGE = ("Paris is the capital and largest city of France. The Eiffel Tower was built in 1889 for the "
           "World Fair held in the city. A mitochondrion is an organelle found in most eukaryotic cells. "
           "It is 330 metres tall and attracts millions of visitors every year.")


# ------------------------------------------------------------------- units


def test_chunks_cover_the_text_in_order_within_the_limit():
    from dataprep.rephrase.chunks import split_chunks

    paragraphs = [" ".join(f"word{i}_{j}." for j in range(40)) for i in range(6)]
    text = "\n\n".join(paragraphs) + "\n\n" + "x" * 950
    for limit in (200, 333, 1000, 5000):
        chunks = split_chunks(text, limit)
        assert all(0 < len(c) <= limit for c in chunks)
        assert "".join(chunks).replace(" ", "").replace("\n", "") == text.replace(" ", "").replace("\n", "")
    assert split_chunks("short text", 100) == ["short text"]
    assert split_chunks("  \n ", 100) == []
    # paragraph ends are preferred over sentence ends
    assert split_chunks("a" * 50 + "\n\n" + "b" * 50, 80) == ["a" * 50, "b" * 50]


def test_builtin_styles_load_with_versions_and_render_braces_safely():
    from dataprep.rephrase.styles import builtin_styles, load_style

    assert {"qa", "conversation", "wikipedia", "tutorial", "cloze"} <= set(builtin_styles())
    qa = load_style("qa")
    assert qa.version >= 1 and len(qa.digest) == 16
    messages = qa.messages("a {weird} text with {text} inside")
    assert messages[0]["role"] == "system" and messages[-1]["role"] == "user"
    assert "a {weird} text with {text} inside" in messages[-1]["content"]


def test_style_file_errors_name_the_file(tmp_path):
    from dataprep.rephrase.styles import StyleError, load_style

    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 0\nuser: 'no placeholder'\n")
    with pytest.raises(StyleError, match="bad.yaml.*version"):
        load_style(str(bad))
    bad.write_text("version: 2\nuser: 'twice {text} {text}'\n")
    with pytest.raises(StyleError, match="exactly once"):
        load_style(str(bad))
    with pytest.raises(StyleError, match="unknown style 'poem'"):
        load_style("poem")
    good = tmp_path / "mine.yaml"
    good.write_text("version: 3\nsystem: be brief\nuser: 'Summarise: {text}'\n")
    style = load_style(str(good))
    assert (style.name, style.version) == ("mine", 3)
    edited = tmp_path / "edited" / "mine.yaml"
    edited.parent.mkdir()
    edited.write_text("version: 3\nsystem: be very brief\nuser: 'Summarise: {text}'\n")
    assert load_style(str(edited)).digest != style.digest  # an edit without a version bump still counts


def test_extractive_items_are_deterministic_and_grounded():
    from dataprep.rephrase.extractive import ExtractiveBackend, extract_items
    from dataprep.rephrase.types import Request

    qa = extract_items(PASSAGE, "qa", 8)
    assert qa[0] == "Question: What is Paris?\nAnswer: Paris is the capital and largest city of France."
    assert "Question: What is a mitochondrion?" in qa[1]
    assert not any("What was the Eiffel Tower" in item for item in qa)  # passive voice is no definition
    assert not any(item.startswith("Question: What is It") for item in qa)
    cloze = extract_items(PASSAGE, "cloze", 8)
    assert "Fill in the blank: The Eiffel Tower was built in ____ for the World Fair held in the city.\nAnswer: 1889" in cloze
    assert extract_items(PASSAGE, "cloze", 2) == cloze[:2]
    results = {}
    reqs = [Request("k1", [], "qa", PASSAGE), Request("k2", [], "qa", "too short."),
            Request("k3", [], "conversation", PASSAGE)]
    ExtractiveBackend().generate(reqs, lambda i, r: results.setdefault(i, r))
    assert results[0].status == "ok" and results[0].text.startswith("Question: What is Paris?")
    assert results[1].status == "empty" and "no sentence" in results[1].reason
    assert results[2].status == "failed" and "conversation" in results[2].reason


def _curated_dir(tmp_path: Path, docs: list[dict]) -> Path:
    out = tmp_path / "curated"
    (out / "docs").mkdir(parents=True)
    with open(out / "docs" / "00000.jsonl", "w") as f:
        for d in docs:
            if d["kept"]:
                f.write(json.dumps({"id": d["id"], "text": d["text"]}) + "\n")
    pq.write_table(pa.table({
        "doc_id": [d["id"] for d in docs], "kept": [d["kept"] for d in docs],
        "chars": [len(d["text"]) for d in docs], "language": ["en" if i % 3 else "fr" for i in range(len(docs))],
    }), out / "decisions.parquet")
    return out


def test_selection_filters_kept_documents_and_samples_stably(tmp_path):
    from dataprep.rephrase.select import select_documents

    docs = [{"id": f"d{i}", "text": "x" * (10 * i), "kept": i % 5 != 0} for i in range(1, 60)]
    curated = _curated_dir(tmp_path, docs)
    chosen = select_documents(curated, {"chars": [100, 400]}, None, 0)
    assert {d["id"] for d in chosen} == {f"d{i}" for i in range(10, 41) if i % 5}
    assert {d["id"] for d in select_documents(curated, {"language": ["fr"]}, None, 0)} == {
        f"d{i}" for i in range(1, 60) if i % 5 and (i - 1) % 3 == 0}
    small = [d["id"] for d in select_documents(curated, {}, 5, seed=1)]
    large = [d["id"] for d in select_documents(curated, {}, 12, seed=1)]
    assert large[:5] == small and len(set(large)) == 12  # growing the sample keeps earlier picks
    assert [d["id"] for d in select_documents(curated, {}, 5, seed=2)] != small
    with pytest.raises(ValueError, match="no column"):
        select_documents(curated, {"domain": ["a.com"]}, None, 0)


def test_request_cache_commits_each_result_and_skips_failures(tmp_path):
    from dataprep.rephrase.cache import RequestCache, request_key
    from dataprep.rephrase.types import Result

    key = request_key("openai", "m", {"name": "qa", "version": 1}, [{"role": "user", "content": "x"}], {"t": 0})
    assert key != request_key("openai", "m", {"name": "qa", "version": 2}, [{"role": "user", "content": "x"}],
                              {"t": 0})
    path = tmp_path / "c.sqlite"
    with RequestCache(path) as cache:
        cache.put(key, Result(status="ok", text="answer", tokens_in=3, tokens_out=1, latency_s=0.5))
        cache.put("other", Result(status="failed", reason="http 500 after 4 attempts"))
    # a second connection (another process would be the same) sees the committed row at once
    with RequestCache(path) as again:
        found = again.get_many([key, "other", "missing"])
    assert list(found) == [key] and found[key].text == "answer" and found[key].extra["cached"]


def test_recipe_validation_names_the_field():
    from assets.recipe import RecipeError, parse_recipe

    def recipe(**rephrase) -> dict:
        r = tiny_recipe("v")
        r["rephrase"] = {"qa1": {"source": "fineweb", "styles": ["qa"], "backend": {"kind": "extractive"},
                                 **rephrase}}
        return r

    parse_recipe(recipe())
    cases = [
        (recipe(styles=["conversation"]), "extractive backend writes only"),
        (recipe(styles=["poem"]), "unknown style 'poem'"),
        (recipe(source="nope"), "rephrase.qa1.source: unknown source 'nope'"),
        (recipe(where={"chars": [10]}), "rephrase.qa1.where"),
        (recipe(where={"quality": [0, 1]}), "unknown column 'quality'"),
        (recipe(backend={"kind": "openai"}), "needs 'model'"),
        (recipe(backend={"kind": "openai", "model": "m", "api_key": SECRET}), "backend.api_key: unknown key"),
        (recipe(backend={"kind": "openai", "model": "m", "api_key_env": SECRET}), "name of an environment"),
    ]
    for data, message in cases:
        with pytest.raises(RecipeError, match=message) as err:
            parse_recipe(data)
        assert SECRET not in str(err.value)  # a key pasted into a recipe is never echoed back
    clash = recipe()
    clash["rephrase"]["fineweb"] = clash["rephrase"].pop("qa1")
    with pytest.raises(RecipeError, match="has the name of a source"):
        parse_recipe(clash)
    mixed = recipe()
    mixed["mixture"]["weights"]["qa1"] = 0.1
    assert "qa1" in parse_recipe(mixed).mixed_sources()


def test_knobs_do_not_change_identity_but_sampling_and_templates_do():
    from assets.factory import recipe_plans
    from assets.recipe import parse_recipe

    def version(**backend) -> str:
        r = tiny_recipe("v")
        r["rephrase"] = {"x": {"source": "fineweb", "styles": ["qa"],
                               "backend": {"kind": "openai", "model": "m", **backend}}}
        plans = {p.name: p for p in recipe_plans(parse_recipe(r))}
        return plans["rephrased_x"].code_version

    base = version()
    assert version(base_url="http://10.0.0.1:9000/v1", concurrency=64, timeout_s=5, max_retries=0,
                   api_key_env="OTHER_KEY") == base
    assert version(temperature=0.2) != base
    assert version(model="other") != base


# -------------------------------------------------------- end to end (slow)


def _workspace_recipe(name: str, base_url: str, style_file: Path, model_dir: Path) -> dict:
    recipe = tiny_recipe(name)
    del recipe["sources"]["commoncrawl"]
    recipe["sources"]["fineweb"]["limit"] = 80
    recipe["rephrase"] = {
        "fw_qa": {"source": "fineweb", "where": {"chars": [300, 20000]}, "sample": 20, "styles": ["qa", "cloze"],
                  "backend": {"kind": "extractive"}},
        "fw_llm": {"source": "fineweb", "sample": 6, "styles": [str(style_file), "qa"], "max_chunk_chars": 1500,
                   "backend": {"kind": "openai", "model": "stub-model", "base_url": base_url, "concurrency": 3,
                               "backoff_s": 0.01, "timeout_s": 10, "api_key_env": "FOUNDRY_TEST_REPHRASE_KEY"}},
        "fw_local": {"source": "fineweb", "sample": 2, "styles": ["qa"], "max_chunk_chars": 400,  # not mixed
                     "backend": {"kind": "transformers", "model": str(model_dir), "max_tokens": 8,
                                 "temperature": 0, "batch_size": 8, "device": "cpu"}},
    }
    recipe["mixture"] = {"weights": {"fineweb": 0.8, "fw_qa": 0.1, "fw_llm": 0.1}, "total_tokens": 30000}
    return recipe


class Workspace:
    def __init__(self, root: Path, server):
        from dagster import DagsterInstance

        self.root, self.server = root, server
        self.store = root / "store"
        self.home = root / "dagster_home"
        self.home.mkdir()
        self.instance = DagsterInstance.local_temp(str(self.home))
        self.style = root / "styles" / "summary.yaml"
        self.style.parent.mkdir()
        self.write_style(1)
        from tests.support.tiny_llm import build_tiny_llama

        self.model_dir = build_tiny_llama(root / "tiny-llama", max_positions=4096)
        self.recipe = _workspace_recipe("rp", server.base_url, self.style, self.model_dir)
        self.path = self.write(self.recipe)

    def write_style(self, version: int, wording: str = "Summarise the passage in two sentences.") -> None:
        self.style.write_text(yaml.safe_dump({"version": version, "system": "You are concise.",
                                              "user": wording + "\n\n{text}"}))

    def write(self, recipe: dict) -> Path:
        path = self.root / f"{recipe['name']}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return path

    def loaded(self):
        from assets.definitions import load_all

        return load_all([self.path])

    def sync(self) -> dict:
        from assets.definitions import build_definitions
        from assets.sync import sync

        loaded = self.loaded()
        report = sync(build_definitions(loaded), loaded, self.instance)
        assert report.error is None, report.error
        return report.as_json()

    def not_fresh(self) -> set[str]:
        from assets.sync import compute_states

        return {s.plan.name for s in compute_states(self.instance, self.loaded()).values() if s.status != "fresh"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tests.support.openai_server import StubOpenAIServer

    saved = {k: os.environ.get(k) for k in ("FOUNDRY_STORE", "FOUNDRY_WORKERS", "FOUNDRY_TEST_REPHRASE_KEY")}
    server = StubOpenAIServer(latency_s=0.02).start()
    root = tmp_path_factory.mktemp("rephrase")
    os.environ.update(FOUNDRY_STORE=str(root / "store"), FOUNDRY_WORKERS="1", FOUNDRY_TEST_REPHRASE_KEY=SECRET)
    ws = Workspace(root, server)
    ws.first = ws.sync()
    ws.first_requests = server.requests
    yield ws
    ws.instance.dispose()
    server.stop()
    restore_environ(saved)


@pytest.mark.slow
def test_rephrased_corpora_build_and_join_the_mixture(workspace):
    ran = {label.split("/", 1)[1].split("[")[0] for label in workspace.first["ran"]}
    assert {"rephrased_fw_qa", "rephrased_fw_llm", "tokenized_fw_qa", "tokenized_fw_llm", "mixture"} <= ran
    from assets.stats import query

    cols, rows = query(workspace.store, "select name, style, status, count(*), sum(tokens_out) > 0 from rephrase "
                                        "group by all order by all")
    by = {(r[0], r[1], r[2]): r[3] for r in rows}
    assert by[("fw_llm", "summary", "ok")] == 6 and by[("fw_llm", "qa", "ok")] == 6
    assert by[("fw_qa", "qa", "ok")] + by.get(("fw_qa", "qa", "empty"), 0) == 20
    # the eval items were checked against every mixed corpus (hellaswag + arc_easy, 6 items each)
    _, contamination = query(workspace.store, "select task, count(*), count(*) filter (where ngrams > 0) "
                                              "from contamination group by 1 order by 1")
    assert [(r[0], r[1]) for r in contamination] == [("arc_easy", 6), ("hellaswag", 6)]
    assert all(r[2] > 0 for r in contamination)
    _, mixed = query(workspace.store, "select source, tokens from mixture where tokens > 0 order by source")
    assert {r[0] for r in mixed} == {"fineweb", "fw_llm", "fw_qa"}
    # every request went to the model once, with the key in the header only
    prompts = [r.prompt for r in workspace.first_requests]
    assert len(prompts) == len(set(prompts)) >= 12
    assert all(r.authorization == f"Bearer {SECRET}" for r in workspace.first_requests)
    assert {r.body["model"] for r in workspace.first_requests} == {"stub-model"}
    docs = [json.loads(line) for line in next((workspace.store / "rephrased").glob("*/docs/00000.jsonl"))
            .read_text().splitlines()]
    assert set(docs[0]) == {"id", "source_id", "style", "text", "backend", "model", "template_version"}
    # the local model: its folder's content hash is part of the model id
    _, local = query(workspace.store, "select status, model, count(*) from rephrase where name = 'fw_local' "
                                      "group by all")
    assert len(local) == 1 and local[0][0] == "ok" and local[0][2] == 2
    assert local[0][1].startswith("tiny-llama@") and len(local[0][1]) == len("tiny-llama@") + 12


@pytest.mark.slow
def test_a_changed_model_file_marks_its_corpus_stale(workspace):
    weights = workspace.model_dir / "model.safetensors"
    original = weights.read_bytes()
    try:
        weights.write_bytes(original[:-4] + bytes(4))  # other weights, same name
        assert workspace.not_fresh() == {"rephrased_fw_local", "tokenized_fw_local", "data_stats"}
    finally:
        weights.write_bytes(original)
    assert workspace.not_fresh() == set()


@pytest.mark.slow
def test_the_api_key_is_nowhere_but_the_request_header(workspace):
    needle = SECRET.encode()
    leaks = []
    for folder in (workspace.store, workspace.home, workspace.root):
        for path in folder.rglob("*"):
            if path.is_file() and needle in path.read_bytes():
                leaks.append(str(path))
    assert leaks == []


@pytest.mark.slow
def test_a_template_edit_marks_exactly_its_corpus_and_downstream(workspace):
    assert workspace.not_fresh() == set()
    downstream = {"rephrased_fw_llm", "tokenized_fw_llm", "mixture", "checkpoint", "eval_report", "contamination",
                  "data_stats"}
    workspace.write_style(2)  # version bump
    assert workspace.not_fresh() == downstream
    workspace.write_style(1, "Summarise the passage in three sentences.")  # same version, new wording
    assert workspace.not_fresh() == downstream
    workspace.write_style(1)  # reverting costs nothing
    assert workspace.not_fresh() == set()


@pytest.mark.slow
def test_faults_are_recorded_with_reasons_not_dropped(workspace):
    """A persistent 500 and a malformed reply become failed rows; the corpus still builds."""
    from assets.stats import query
    from tests.support.openai_server import Reply

    doomed: dict[str, str] = {}  # the first new summary prompt always gets 500, the second garbage

    def faults(seen: int, body) -> Reply | None:
        prompt = body["messages"][-1]["content"]
        if "Summarise" in prompt and prompt not in doomed and len(doomed) < 2:
            doomed[prompt] = "500" if not doomed else "malformed"
        if doomed.get(prompt) == "500":
            return Reply(status=500, body={"error": "overloaded"})
        if doomed.get(prompt) == "malformed":
            return Reply(status=200, body="this is not json")
        return None

    edited = copy.deepcopy(workspace.recipe)
    edited["rephrase"]["fw_llm"]["sample"] = 14  # 8 new documents; the first 6 come from the cache
    edited["rephrase"]["fw_llm"]["backend"]["max_retries"] = 1
    workspace.path = workspace.write(edited)
    workspace.server.reset()
    workspace.server.script(faults)
    try:
        workspace.sync()
    finally:
        workspace.server.script(None)
    new_prompts = workspace.server.prompts()
    assert not set(new_prompts) & {r.prompt for r in workspace.first_requests}  # no finished request re-asked
    _, rows = query(workspace.store, "select status, reason, count(*) from rephrase where name = 'fw_llm' "
                                     "group by all order by all")
    got = {(r[0], r[1]): r[2] for r in rows}
    failed = {reason: n for (status, reason), n in got.items() if status == "failed"}
    assert sum(n for (status, _), n in got.items() if status == "ok") + sum(failed.values()) == 28
    assert sum(failed.values()) in (1, 2)  # the two doomed chunks may belong to one document
    reasons = " | ".join(failed)
    assert "http 500 after 2 attempts" in reasons and "malformed" in reasons
    # the 500 was retried once (max_retries 1), the malformed reply was not retried
    counts = {p: new_prompts.count(p) for p in set(new_prompts)}
    assert sorted(counts[p] for p in doomed) == [1, 2]
    assert all(n == 1 for p, n in counts.items() if p not in doomed)


@pytest.mark.slow
def test_killed_materialization_resumes_without_re_asking(workspace, tmp_path):
    """SIGKILL `foundry sync` while it rephrases; the rerun asks only for what was not answered."""
    edited = copy.deepcopy(workspace.recipe)
    edited["name"] = "rpkill"
    edited["rephrase"]["fw_conv"] = {
        "source": "fineweb", "sample": 16, "styles": ["conversation"], "max_chunk_chars": 100000,
        "backend": {"kind": "openai", "model": "stub-model", "base_url": workspace.server.base_url,
                    "concurrency": 2, "backoff_s": 0.01},
    }
    path = workspace.write(edited)
    cache_db = workspace.store / "cache" / "rephrase.sqlite"

    def cached_rows() -> int:
        with sqlite3.connect(cache_db) as con:
            return con.execute("select count(*) from responses").fetchone()[0]

    rows_before = cached_rows()
    workspace.server.reset()
    workspace.server.latency_s = 0.3
    env = dict(os.environ, DAGSTER_HOME=str(tmp_path / "home"), FOUNDRY_STORE=str(workspace.store))
    cmd = [sys.executable, "-m", "assets.cli", "sync", "--recipe", str(path), "--json"]
    proc = subprocess.Popen(cmd, cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and workspace.server.received < 6 and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "sync ended before rephrasing got going"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    committed = cached_rows() - rows_before
    asked_before = set(workspace.server.prompts())
    assert 1 <= committed < 16 and committed <= len(asked_before) < 16

    workspace.server.reset()
    workspace.server.latency_s = 0.02
    done = subprocess.run(cmd, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rpkill/rephrased_fw_conv" in json.loads(done.stdout)["ran"]
    asked_again = workspace.server.prompts()
    # exactly the unanswered requests, each once; in-flight ones at the kill are asked again
    assert len(asked_again) == len(set(asked_again)) == 16 - committed
    assert len(set(asked_again) | asked_before) == 16
    assert cached_rows() - rows_before == 16


@pytest.mark.slow
def test_foundry_export_feeds_the_transformers_backend(workspace, tmp_path):
    """`foundry export` turns the trained checkpoint into a Hugging Face folder that the
    transformers rephrasing backend (and any transformers user) loads offline."""
    from dataprep.rephrase.hf_backend import TransformersBackend
    from dataprep.rephrase.styles import load_style
    from dataprep.rephrase.types import Request

    env = dict(os.environ, DAGSTER_HOME=str(workspace.home), FOUNDRY_STORE=str(workspace.store))
    out = tmp_path / "hf"
    cmd = [sys.executable, "-m", "assets.cli", "export", str(out), "--recipe", str(workspace.path)]
    done = subprocess.run(cmd, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    again = subprocess.run(cmd, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "overwrite" in again.stderr
    results = {}
    messages = load_style("qa").messages(PASSAGE)
    TransformersBackend(out, params={"max_tokens": 6, "temperature": 0}, device="cpu").generate(
        [Request("k", messages, "qa", PASSAGE)], lambda i, r: results.setdefault(i, r))
    assert results[0].status == "ok" and 0 < results[0].tokens_out <= 6
