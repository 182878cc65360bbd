"""Identity: canonical JSON, code versions and store keys are stable and only move when they must."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from assets.factory import recipe_plans
from assets.identity import LOGIC_VERSIONS, canonical_json, code_version, short_hash, store_key
from assets.recipe import load_recipe, parse_recipe
from assets.settings import PROJECT_ROOT, data_root

DEMO = PROJECT_ROOT / "recipes" / "demo.yaml"

# Prints {label: code_version} for the demo recipe and the canonical JSON of a dict whose
# insertion order comes from a set of strings (so it depends on PYTHONHASHSEED).
CHILD = r"""
import json, sys
from assets.factory import recipe_plans
from assets.identity import canonical_json
from assets.recipe import load_recipe
from assets.settings import data_root, store_root, workers
recipe = load_recipe(sys.argv[1])
words = {"gamma", "alpha", "beta", "delta", "epsilon", "zeta", "eta", "theta"}
obj = {w: {"n": len(w), "t": (1.0, 2)} for w in words}
print(json.dumps({
    "versions": {p.label: p.code_version for p in recipe_plans(recipe)},
    "canonical": canonical_json(obj),
    "order": list(obj),
    "data_root": str(data_root()),
    "store_root": str(store_root()),
    "workers": workers(),
}))
"""


def demo_versions(recipe) -> dict[str, str]:
    return {p.label: p.code_version for p in recipe_plans(recipe)}


def recipe_dict() -> dict:
    return yaml.safe_load(DEMO.read_text())


# --------------------------------------------------------------------- canonical_json


def test_canonical_json_exact_form():
    assert canonical_json({"b": 1, "a": [1.0, 2.5, (3, 4.0)], 2: {"z": None, "y": True}}) == (
        '{"2":{"y":true,"z":null},"a":[1,2.5,[3,4]],"b":1}'
    )
    assert canonical_json("é") == '"\\u00e9"'


def test_int_and_integral_float_hash_equal():
    assert canonical_json({"x": 1}) == canonical_json({"x": 1.0})
    assert short_hash({"x": 1}) == short_hash({"x": 1.0})
    assert code_version("curated", {"t": 0}) == code_version("curated", {"t": 0.0})
    assert code_version("curated", {"t": 1}) != code_version("curated", {"t": 1.5})
    # bool is not a number here
    assert canonical_json({"x": True}) != canonical_json({"x": 1})


def test_int_vs_float_in_recipe_yaml():
    a, b = recipe_dict(), recipe_dict()
    a["mixture"]["max_epochs"] = {"fineweb": 1, "commoncrawl": 3}
    b["mixture"]["max_epochs"] = {"fineweb": 1.0, "commoncrawl": 3.0}
    a["sources"]["fineweb"]["curation"]["fineweb_quality"] = {"char_duplicates_ratio": 1}
    b["sources"]["fineweb"]["curation"]["fineweb_quality"] = {"char_duplicates_ratio": 1.0}
    assert demo_versions(parse_recipe(a)) == demo_versions(parse_recipe(b))


def test_code_version_is_logic_version_plus_spec():
    spec = {"shards": 2}
    assert code_version("curated", spec) == short_hash(LOGIC_VERSIONS["curated"], spec)
    assert code_version("curated", spec) != code_version("tokenized", spec)
    assert len(code_version("curated", spec)) == 16
    with pytest.raises(KeyError):
        code_version("no_such_kind", spec)


# --------------------------------------------------------------------- across processes


def test_code_versions_stable_across_processes_and_settings(tmp_path):
    recipe = load_recipe(DEMO)
    expected = demo_versions(recipe)
    assert len(expected) == 25
    assert len(set(expected.values())) >= 8  # real, distinct hashes

    alias = tmp_path / "data_alias"
    alias.symlink_to(data_root(), target_is_directory=True)
    procs = []
    for seed, store, n in [("1", "store_a", "7"), ("98765", "store_b", "1")]:
        env = dict(os.environ)
        env.update(
            PYTHONHASHSEED=seed,
            FOUNDRY_DATA_ROOT=str(alias),
            FOUNDRY_STORE=str(tmp_path / store),
            FOUNDRY_WORKERS=n,
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", CHILD, str(DEMO)],
                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
        )
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))

    for out, store, n in zip(outs, ["store_a", "store_b"], [7, 1]):
        # the settings really differed in the child ...
        assert out["store_root"] == str((tmp_path / store).resolve())
        assert out["workers"] == n
        assert out["data_root"] == str(data_root())  # the alias resolves to the same data
        # ... and no code version moved
        assert out["versions"] == expected

    words = {"gamma", "alpha", "beta", "delta", "epsilon", "zeta", "eta", "theta"}
    canonical = canonical_json({w: {"n": len(w), "t": (1.0, 2)} for w in words})
    assert outs[0]["canonical"] == outs[1]["canonical"] == canonical
    assert canonical.startswith('{"alpha":{"n":5,"t":[1,2]},"beta":')
    # the hash seed really changed iteration order between the two children
    assert outs[0]["order"] != outs[1]["order"]


# --------------------------------------------------------------------- what moves a hash


def test_yaml_key_order_does_not_change_hashes(tmp_path):
    original = recipe_dict()

    def reverse(obj):
        if isinstance(obj, dict):
            return {k: reverse(obj[k]) for k in reversed(list(obj))}
        return obj

    shuffled = reverse(original)
    # sources order is meaningful for nothing hashed; keep their order so labels line up
    shuffled["sources"] = {k: shuffled["sources"][k] for k in original["sources"]}
    assert list(shuffled["mixture"]["weights"]) == ["fineweb_qa", "pdf", "warc", "commoncrawl", "fineweb"]
    assert list(shuffled["sources"]["fineweb"]["curation"]) == [
        "fineweb_quality", "c4_quality", "gopher_quality", "gopher_repetition",
    ]
    p1, p2 = tmp_path / "a.yaml", tmp_path / "b.yaml"
    p1.write_text(yaml.safe_dump(original, sort_keys=False))
    p2.write_text(yaml.safe_dump(shuffled, sort_keys=False))
    assert p1.read_text() != p2.read_text()
    assert demo_versions(load_recipe(p1)) == demo_versions(load_recipe(p2)) == demo_versions(load_recipe(DEMO))


def test_one_threshold_changes_only_that_sources_curated_version():
    base = demo_versions(parse_recipe(recipe_dict()))
    # identical curation and reading: identical code versions (the demo's fineweb has a limit
    # and a shorter filter chain)
    same = recipe_dict()
    same["sources"]["fineweb"].pop("limit")
    same["sources"]["fineweb"]["curation"] = same["sources"]["commoncrawl"]["curation"]
    same_versions = demo_versions(parse_recipe(same))
    assert same_versions["demo/curated_fineweb"] == same_versions["demo/curated_commoncrawl"]

    d = recipe_dict()
    d["sources"]["fineweb"]["curation"]["gopher_quality"]["min_doc_words"] = 60
    changed = demo_versions(parse_recipe(d))
    diff = {k for k in base if base[k] != changed[k]}
    assert diff == {"demo/filtered_fineweb", "demo/curated_fineweb"}

    # a nested repetition threshold of the other source: only its versions
    d = recipe_dict()
    d["sources"]["commoncrawl"]["curation"]["gopher_repetition"] = {"top_n_grams": {2: 0.25, 3: 0.18, 4: 0.16}}
    changed = demo_versions(parse_recipe(d))
    assert {k for k in base if base[k] != changed[k]} == {"demo/filtered_commoncrawl", "demo/curated_commoncrawl"}

    # dedup settings: the per-file partitions keep their outputs, only the gathering step reruns
    d = recipe_dict()
    d["sources"]["fineweb"]["curation"]["minhash"] = {"num_buckets": 20}
    changed = demo_versions(parse_recipe(d))
    assert {k for k in base if base[k] != changed[k]} == {"demo/curated_fineweb"}

    # check bounds guard the output but never change it
    d = recipe_dict()
    d["sources"]["fineweb"]["curation"]["checks"] = {"keep_rate": {"min": 0.5, "blocking": True}}
    assert demo_versions(parse_recipe(d)) == base


def test_execution_knobs_are_not_hashed_but_shards_and_limit_are():
    base = demo_versions(parse_recipe(recipe_dict()))
    d = recipe_dict()
    d["automation"] = {"training": "eager", "evaluation": "manual"}
    d["description"] = "something else"
    assert demo_versions(parse_recipe(d)) == base

    d = recipe_dict()
    d["sources"]["fineweb"]["shards"] = 4
    changed = demo_versions(parse_recipe(d))
    assert {k for k in base if base[k] != changed[k]} == {"demo/filtered_fineweb", "demo/curated_fineweb"}

    d = recipe_dict()
    d["sources"]["fineweb"]["limit"] = 999
    changed = demo_versions(parse_recipe(d))
    assert {k for k in base if base[k] != changed[k]} == {"demo/raw_fineweb", "demo/filtered_fineweb",
                                                          "demo/curated_fineweb"}


def test_store_key_moves_with_inputs():
    cv = code_version("tokenized", {})
    k = store_key(cv, {"curated": "aaaa", "tokenizer": "bbbb"})
    assert len(k) == 16
    assert k == store_key(cv, {"tokenizer": "bbbb", "curated": "aaaa"})  # role order irrelevant
    assert k == short_hash(cv, {"curated": "aaaa", "tokenizer": "bbbb"})
    assert k != store_key(cv, {"curated": "aaab", "tokenizer": "bbbb"})
    assert k != store_key(cv, {"curated": "aaaa", "tokenizer": "bbbc"})
    assert k != store_key(cv, {"curated": "bbbb", "tokenizer": "aaaa"})  # roles matter
    assert k != store_key(cv, {"curated": "aaaa"})
    assert k != store_key(code_version("tokenized", {"x": 1}), {"curated": "aaaa", "tokenizer": "bbbb"})


def _raw_then_curated_key(src, store) -> tuple[str, str]:
    """Mirror engine.materialize for raw_<s> -> curated_<s>: returns (raw key, curated key)."""
    from types import SimpleNamespace

    from assets.curation import curated_spec
    from assets.recipe import source_files
    from assets.sources import build_raw, content_hash, file_table, raw_spec

    table = file_table(source_files(src, data_root()))
    raw_key = store_key(code_version("raw", raw_spec(src)), {"content": content_hash(table)})
    if store.lookup("raw", raw_key) is None:
        with store.build("raw", raw_key) as b:
            build_raw(SimpleNamespace(out_dir=b.dir, plan=SimpleNamespace(context={"source": src})), table)
    raw_version = store.lookup("raw", raw_key).data_version
    return raw_key, store_key(code_version("curated", curated_spec(src)), {"raw": raw_version})


def test_changing_limit_changes_curated_store_key(tmp_path):
    from assets.store import ArtifactStore

    store = ArtifactStore(tmp_path / "store")
    a, b = recipe_dict(), recipe_dict()
    b["sources"]["fineweb"]["limit"] = 10  # curated output would hold <= 10 docs instead of <= 1000
    raw_a, cur_a = _raw_then_curated_key(parse_recipe(a).sources["fineweb"], store)
    raw_b, cur_b = _raw_then_curated_key(parse_recipe(b).sources["fineweb"], store)
    assert raw_a != raw_b  # raw is rebuilt ...
    assert cur_a != cur_b  # ... and curated too: raw's data version carries the reader spec


def test_file_inputs_follow_file_content(tmp_path):
    """A given tokenizer.json is an identity input: sync and the asset body hash the same digest."""
    from assets.factory import recipe_plans
    from assets.file_inputs import file_inputs
    from assets.recipe import parse_recipe
    from tests.recipes import tiny_recipe

    tok = tmp_path / "tokenizer.json"
    tok.write_text('{"version": 1}')
    recipe = tiny_recipe("f")
    recipe["tokenizer"] = {"path": str(tok)}
    plan = next(p for p in recipe_plans(parse_recipe(recipe)) if p.kind == "tokenizer")
    first = file_inputs(plan, tmp_path)
    assert set(first) == {"file"} and file_inputs(plan, tmp_path) == first
    tok.write_text('{"version": 2}')
    assert file_inputs(plan, tmp_path) != first
    tok.unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        file_inputs(plan, tmp_path)
