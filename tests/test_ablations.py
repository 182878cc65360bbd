"""Ablations: recipe inheritance, grid expansion, the comparison report, and on a real Dagster
instance the must-holds: runs that differ only in training share every data asset, an edit to one
variant rebuilds only its runs, and the report's numbers are what DuckDB says about the runs."""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from assets.ablation import is_ablation_file, load_ablation
from assets.ablation_report import (
    RunOutputs,
    compare,
    loss_curves_png,
    make_report,
    markdown,
    metric_direction,
    source_expert_mi,
    statement,
    summarize,
)
from assets.recipe import RecipeError, load_recipe, merge_overrides
from tests.recipes import tiny_recipe
from tests.support.environ import restore_environ

PROJECT = Path(__file__).resolve().parent.parent


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --- inheritance -------------------------------------------------------------------------------


def test_merge_overrides_mappings_merge_lists_replace_null_turns_off_or_removes():
    base = {"sources": {"a": {"kind": "jsonl", "curation": {"c4_quality": {}, "gopher_quality": {"min_doc_words": 50}}},
                        "b": {"kind": "jsonl"}},
            "mixture": {"weights": {"a": 0.5, "b": 0.5}, "total_tokens": 10},
            "evals": {"tasks": ["hellaswag", "arc_easy"]}}
    before = copy.deepcopy(base)
    override = {"sources": {"a": {"curation": {"c4_quality": None, "gopher_quality": {"max_doc_words": 9}}}, "b": None},
                "mixture": {"weights": {"b": None}}, "evals": {"tasks": ["piqa"]}}
    merged = merge_overrides(base, override)
    assert merged == {
        "sources": {"a": {"kind": "jsonl", "curation": {"c4_quality": None,  # a step turned off
                                                        "gopher_quality": {"min_doc_words": 50, "max_doc_words": 9}}}},
        "mixture": {"weights": {"a": 0.5}, "total_tokens": 10},  # a named entry removed
        "evals": {"tasks": ["piqa"]},  # lists replace
    }
    assert base == before  # inputs untouched
    merged["sources"]["a"]["kind"] = "parquet"
    assert base["sources"]["a"]["kind"] == "jsonl"  # no shared containers


def test_recipe_extends_a_chain_relative_to_each_file(tmp_path):
    root = tiny_recipe("root")
    write(tmp_path / "bases" / "root.yaml", root)
    write(tmp_path / "bases" / "mid.yaml", {"extends": "root.yaml", "name": "mid",
                                            "training": {"steps": 9},
                                            "sources": {"commoncrawl": None},
                                            "mixture": {"weights": {"commoncrawl": None, "fineweb": 1.0}}})
    child = write(tmp_path / "child.yaml", {"extends": "bases/mid.yaml", "name": "child",
                                            "optimizer": {"name": "muon"},
                                            "sources": {"fineweb": {"curation": {"fineweb_quality": None}}}})
    recipe = load_recipe(child)
    assert recipe.name == "child"
    assert recipe.training.steps == 9 and recipe.training.batch_size == root["training"]["batch_size"]
    assert list(recipe.sources) == ["fineweb"] and recipe.mixture.weights == {"fineweb": 1.0}
    assert recipe.sources["fineweb"].curation.fineweb_quality is None
    assert recipe.sources["fineweb"].curation.c4_quality is not None
    assert recipe.optimizer.name == "muon" and recipe.optimizer.momentum == 0.95  # muon defaults still apply
    assert recipe.model.d_model == root["model"]["d_model"]


def test_recipe_extends_errors_name_the_file_and_field(tmp_path):
    write(tmp_path / "a.yaml", {"extends": "b.yaml", "name": "a"})
    write(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(RecipeError, match=r"extends: cycle .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_recipe(tmp_path / "a.yaml")
    write(tmp_path / "c.yaml", {"extends": "missing.yaml", "name": "c"})
    with pytest.raises(RecipeError, match=r"c\.yaml: extends: file not found: .*missing\.yaml"):
        load_recipe(tmp_path / "c.yaml")
    write(tmp_path / "d.yaml", {"extends": ["x.yaml"], "name": "d"})
    with pytest.raises(RecipeError, match=r"d\.yaml: extends: give the path of one recipe file"):
        load_recipe(tmp_path / "d.yaml")
    write(tmp_path / "base.yaml", tiny_recipe("base"))
    write(tmp_path / "e.yaml", {"extends": "base.yaml", "name": "e", "training": {"stepz": 3}})
    with pytest.raises(RecipeError) as err:
        load_recipe(tmp_path / "e.yaml")
    assert "e.yaml (extends " in str(err.value) and "base.yaml)" in str(err.value)
    assert "training.stepz: unknown key" in str(err.value)
    (tmp_path / "f.yaml").write_text("extends: base.yaml\nname: [unclosed\n")
    with pytest.raises(RecipeError, match=r"f\.yaml: not valid YAML"):
        load_recipe(tmp_path / "f.yaml")


# --- ablation files ---------------------------------------------------------------------------------


def _ablation(tmp_path: Path, **fields) -> Path:
    if not (tmp_path / "bases" / "tiny.yaml").exists():
        write(tmp_path / "bases" / "tiny.yaml", tiny_recipe("tiny"))
    return write(tmp_path / "abl.yaml", {"name": "abl", "base": "bases/tiny.yaml", **fields})


def test_grid_expands_variants_times_axes_times_seeds(tmp_path):
    path = _ablation(
        tmp_path,
        overrides={"training": {"steps": 5}},
        variants=[{"name": "adamw", "overrides": {"optimizer": {"name": "adamw"}}},
                  {"name": "muon", "overrides": {"optimizer": {"name": "muon"}}}],
        grid={"lr": [{"name": "lo", "overrides": {"optimizer": {"lr": 0.001}}},
                     {"name": "hi", "overrides": {"optimizer": {"lr": 0.01}}}],
              "clip": [{"name": "noclip"}, {"name": "clip", "overrides": {"training": {"grad_clip": 0.5}}}]},
        seeds=[3, 7],
    )
    assert is_ablation_file(path) and not is_ablation_file(tmp_path / "bases" / "tiny.yaml")
    ablation = load_ablation(path)
    assert ablation.axes == ["variant", "lr", "clip"]
    assert len(ablation.runs) == 2 * 2 * 2 * 2
    assert ablation.runs[0].name == "abl__adamw_lo_noclip__s3"
    by_name = {r.name: r for r in ablation.runs}
    run = by_name["abl__muon_hi_clip__s7"]
    assert run.points == {"variant": "muon", "lr": "hi", "clip": "clip"}
    r = run.recipe
    assert (r.optimizer.name, r.optimizer.lr, r.training.grad_clip, r.training.seed, r.training.steps) == \
        ("muon", 0.01, 0.5, 7, 5)
    assert by_name["abl__adamw_lo_noclip__s3"].recipe.training.grad_clip == 1.0
    # runs differ only where their points do: the sources are the same spec
    assert len({x.recipe.sources["fineweb"].model_dump_json() for x in ablation.runs}) == 1


def test_an_axis_may_scale_what_another_axis_chose(tmp_path):
    path = _ablation(
        tmp_path,
        variants=[{"name": "adamw", "overrides": {"optimizer": {"name": "adamw", "lr": 0.001}}},
                  {"name": "muon", "overrides": {"optimizer": {"name": "muon", "lr": 0.006}}}],
        grid={"lr": [{"name": "x0_5", "scale": {"optimizer.lr": 0.5}}, {"name": "x1"},
                     {"name": "x3", "scale": {"optimizer.lr": 3, "training.steps": 2}}]},
    )
    runs = {r.variant: r.recipe for r in load_ablation(path).runs}
    assert {v: r.optimizer.lr for v, r in runs.items()} == {
        "adamw_x0_5": 0.0005, "adamw_x1": 0.001, "adamw_x3": 0.003, "muon_x0_5": 0.003, "muon_x1": 0.006, "muon_x3": 0.018}
    assert runs["muon_x3"].training.steps == 2 * runs["muon_x1"].training.steps  # an int stays an int
    # the same recipe as writing the value out: one identity, so an existing run is a cache hit
    written = _ablation(tmp_path / "w", variants=[{"name": "adamw_x3", "overrides": {"optimizer": {
        "name": "adamw", "lr": 0.003}, "training": {"steps": 2 * runs["muon_x1"].training.steps}}}])
    [same] = load_ablation(written).runs
    assert same.recipe.model_dump(exclude={"name"}) == runs["adamw_x3"].model_dump(exclude={"name"})


@pytest.mark.parametrize("fields, message", [
    ({"variants": [{"name": "a", "scale": {"optimizer.lr": -1}}]}, r"'optimizer\.lr': the factor must be a positive number"),
    ({"variants": [{"name": "a", "scale": {"optimizer..lr": 2}}]}, r"'optimizer\.\.lr': give a dotted field"),
    ({"variants": [{"name": "a", "scale": {"training.seed": 2}}]}, r"training\.seed cannot be scaled"),
    ({"variants": [{"name": "a", "overrides": {"optimizer": {"name": "adamw"}}, "scale": {"optimizer.name": 2}}]},
     r"abl\.yaml: variant 'a': variant 'a' scales 'optimizer\.name', which is 'adamw' in this run, not a number"),
    ({"variants": [{"name": "a"}], "grid": {"lr": [{"name": "x2", "scale": {"optimizer.lr": 2}}]}},
     r"variant 'a_x2': lr 'x2' scales 'optimizer\.lr', which this run does not set \(a default is not scaled"),
    ({"variants": [{"name": "a", "overrides": {"optimizer": {"lrr": 1}}}]},
     r"abl\.yaml: variant 'a' seed 0 \(base .*tiny\.yaml\): invalid recipe\n  optimizer\.lrr: unknown key"),
    ({"variants": [{"name": "a"}, {"name": "a"}]}, r"variants: name\(s\) \['a'\] used twice"),
    ({"variants": [{"name": "Bad-name"}]}, r"variants\.0\.name: 'Bad-name' must be lowercase"),
    ({"variants": [{"name": "a__b"}]}, r"must be lowercase letters and digits joined by single '_'"),
    ({}, r"give `variants` \(a list\) and/or `grid`"),
    ({"variants": [{"name": "a"}], "seeds": [1, 1]}, r"seeds: .*a seed is listed twice"),
    ({"variants": [{"name": "a"}], "seeds": []}, r"seeds: List should have at least 1 item"),
    ({"variants": [{"name": "a", "overrides": {"training": {"seed": 4}}}]}, r"list the seeds under `seeds:`"),
    ({"variants": [{"name": "a", "overrides": {"name": "x"}}]}, r"overrides cannot set 'name'"),
    ({"variants": [{"name": "a"}], "best_of": {"axis": "lr"}}, r"best_of\.axis 'lr' is not an axis"),
    ({"variants": [{"name": "a"}], "colour": 1}, r"colour: unknown key"),
    ({"variants": [{"name": "a"}], "grid": {"lr": [{"name": "x"}]}, "best_of": {"axis": "lr", "by": "moe/load_cv"}},
     r"best_of\.by: 'moe/load_cv' has no better direction"),
    ({"variants": [{"name": "a"}], "grid": {"lr": [{"name": "x"}]}, "best_of": {"axis": "lr", "by": "piqa/acc"}},
     r"best_of\.by: 'piqa/acc' is not measured by variant 'a_x'"),
    ({"variants": [{"name": "a", "overrides": {"optimizer": {"lr": 0.1}}}],
      "grid": {"lr": [{"name": "x", "overrides": {"optimizer": {"lr": 0.2}}}]}},
     r"variant 'a' and lr 'x' both set 'optimizer\.lr'"),
    ({"variants": [{"name": "a_b"}, {"name": "a"}], "grid": {"k": [{"name": "b"}, {"name": "b_x"}]}},
     None),  # a_b + b and a + b_x: distinct names
    ({"variants": [{"name": "a_b"}, {"name": "a"}], "grid": {"k": [{"name": "x"}, {"name": "b_x"}]}},
     r"both make variant name 'a_b_x'"),
    ({"grid": {"a": [{"name": str(i)} for i in range(20)], "b": [{"name": str(i)} for i in range(20)]}},
     r"expands to 400 runs"),
])
def test_bad_ablation_files_fail_with_the_file_and_field(tmp_path, fields, message):
    path = _ablation(tmp_path, **fields)
    if message is None:
        assert len(load_ablation(path).runs) == 4
        return
    with pytest.raises(RecipeError, match=message) as err:
        load_ablation(path)
    assert str(path) in str(err.value)


def test_best_of_may_rank_by_a_sources_held_out_split(tmp_path):
    grid = {"lr": [{"name": "lo", "overrides": {"optimizer": {"lr": 0.001}}},
                   {"name": "hi", "overrides": {"optimizer": {"lr": 0.01}}}]}
    held = {"evals": {"heldout_share": {"fineweb": 0.05}}}
    path = _ablation(tmp_path, overrides=held, variants=[{"name": "a"}], grid=grid,
                     best_of={"axis": "lr", "by": "heldout:fineweb/bits_per_byte"})
    assert len(load_ablation(path).runs) == 2
    path = _ablation(tmp_path, variants=[{"name": "a"}], grid=grid,  # commoncrawl holds nothing out
                     overrides=held, best_of={"axis": "lr", "by": "heldout:commoncrawl/bits_per_byte"})
    with pytest.raises(RecipeError, match=r"'heldout:commoncrawl/bits_per_byte' is not measured"):
        load_ablation(path)


def test_default_ranking_metric_prefers_the_shared_held_out_text():
    from assets.ablation_report import _default_by

    assert _default_by({"heldout:commoncrawl/bits_per_byte", "wikitext2/bits_per_byte", "train/final_loss"}) == \
        "wikitext2/bits_per_byte"
    assert _default_by({"heldout:fineweb/bits_per_byte", "heldout:commoncrawl/bits_per_byte"}) == \
        "heldout:commoncrawl/bits_per_byte"
    assert _default_by({"hellaswag/acc"}) == "train/final_loss"


def test_ablation_base_must_exist(tmp_path):
    path = write(tmp_path / "abl.yaml", {"name": "abl", "base": "nowhere.yaml", "variants": [{"name": "a"}]})
    with pytest.raises(RecipeError, match=r"abl\.yaml: base: recipe file not found: .*nowhere\.yaml"):
        load_ablation(path)


def test_shipped_grids_expand_and_share_their_data_specs():
    """The three example grids load, and every run of every grid has the same source specs."""
    from assets.factory import recipe_plans

    specs = set()
    sizes = {}
    for name in ("data", "optimizer", "moe_lb"):
        ablation = load_ablation(PROJECT / "ablations" / f"{name}.yaml")
        sizes[name] = (len(ablation.variants()), len(ablation.runs))
        for run in ablation.runs:
            plans = {p.name: p for p in recipe_plans(run.recipe)}
            specs.add((plans["curated_fineweb"].code_version, plans["curated_commoncrawl"].code_version,
                       plans["tokenizer"].code_version))
    assert sizes == {"data": (3, 6), "optimizer": (9, 18), "moe_lb": (2, 6)}
    assert len(specs) == 1  # curated sources and tokenizer: one identity across all 30 runs
    opt = load_ablation(PROJECT / "ablations" / "optimizer.yaml")
    assert {(r.recipe.optimizer.name, r.recipe.optimizer.qk_clip_tau) for r in opt.runs} == {
        ("adamw", None), ("muon", None), ("muon", 2.5)}
    lrs = {r.variant: r.recipe.optimizer.lr for r in opt.runs}  # each optimizer swept around its own centre
    assert (lrs["adamw_div3"], lrs["adamw_x1"], lrs["adamw_x3"]) == (pytest.approx(1e-4), 3e-4, pytest.approx(9e-4))
    assert (lrs["muon_div3"], lrs["muon_x1"], lrs["muon_x3"]) == (pytest.approx(1e-2 / 3), 1e-2, 3e-2)


def test_definitions_load_ablations_from_the_glob_beside_recipes(tmp_path, monkeypatch):
    from dagster import AssetKey

    from assets.ablation_assets import AblationAssets
    from assets.definitions import build_definitions, bundle_name, load_all

    recipe = write(tmp_path / "recipes" / "plain.yaml", tiny_recipe("plain"))
    _ablation(tmp_path, variants=[{"name": "a"}, {"name": "b", "overrides": {"training": {"steps": 3}}}], seeds=[0])
    monkeypatch.setenv("FOUNDRY_RECIPES", str(recipe))
    monkeypatch.setenv("FOUNDRY_ABLATIONS", str(tmp_path / "*.yaml"))
    loaded = load_all()
    assert [bundle_name(b) for b in loaded] == ["plain", "abl__a__s0", "abl__b__s0", "abl"]
    assert isinstance(loaded[-1], AblationAssets)
    graph = build_definitions(loaded).resolve_asset_graph()
    report = AssetKey(["abl", "ablation_report"])
    assert graph.get(report).parent_keys == {AssetKey([run, asset]) for run in ("abl__a__s0", "abl__b__s0")
                                             for asset in ("mixture", "checkpoint", "eval_report")}
    assert graph.get(AssetKey(["abl__b__s0", "checkpoint"])).group_name == "abl__b__s0"

    monkeypatch.setenv("FOUNDRY_ABLATIONS", "")
    assert [bundle_name(b) for b in load_all()] == ["plain"]  # none unless asked for
    clash = write(tmp_path / "recipes" / "abl.yaml", tiny_recipe("abl"))
    with pytest.raises(RecipeError, match=r"abl\.yaml: the name 'abl' is already used by .*abl\.yaml"):
        load_all([clash, tmp_path / "abl.yaml"])


# --- the report's statistics, on synthetic run outputs ------------------------------------------


def _run_dir(root: Path, variant: str, seed: int, losses: list[float], evals: list[tuple],
             expert_load: list[tuple] | None = None, points: dict | None = None) -> RunOutputs:
    ckpt, ev = root / f"{variant}_{seed}" / "ckpt", root / f"{variant}_{seed}" / "eval"
    ckpt.mkdir(parents=True)
    ev.mkdir(parents=True)
    pq.write_table(pa.table({"step": list(range(1, len(losses) + 1)), "loss": losses,
                             "max_attn_logit": [None if variant.startswith("adamw") else 4.0 + i for i in range(len(losses))]},
                            schema=pa.schema([("step", pa.int64()), ("loss", pa.float64()),
                                              ("max_attn_logit", pa.float64())])), ckpt / "metrics.parquet")
    pq.write_table(pa.table({"task": [e[0] for e in evals], "metric": [e[1] for e in evals],
                             "value": [e[2] for e in evals], "stderr": pa.array([e[3] for e in evals], pa.float64()),
                             "n_items": [100] * len(evals), "form": ["cloze"] * len(evals)}), ev / "evals.parquet")
    if expert_load:
        pq.write_table(pa.table({k: [row[i] for row in expert_load] for i, k in
                                 enumerate(["step", "layer", "expert", "source", "tokens"])}),
                       ckpt / "expert_load.parquet")
    return RunOutputs(variant, seed, points or {"variant": variant}, ckpt, ev)


def test_summary_combines_seed_and_item_errors():
    s = summarize([0.40, 0.50, 0.45], [0.03, 0.04, 0.05])
    assert s.n == 3 and s.mean == pytest.approx(0.45)
    assert s.se_seeds == pytest.approx(statistics.stdev([0.40, 0.50, 0.45]) / math.sqrt(3))
    assert s.se_items == pytest.approx(math.sqrt(0.03**2 + 0.04**2 + 0.05**2) / 3)
    assert s.se == pytest.approx(math.hypot(s.se_seeds, s.se_items))
    one = summarize([2.0], [None])
    assert one.se_seeds is None and one.se_items is None and one.se is None


def test_compare_names_a_winner_only_beyond_twice_the_standard_error():
    a, b = summarize([2.00, 2.02], [None, None]), summarize([2.30, 2.32], [None, None])
    c = compare("wikitext2/bits_per_byte", {"a": a, "b": b})
    assert c.ranked == ["a", "b"] and c.verdict == "winner" and c.winner == "a"
    assert c.diff == pytest.approx(-0.30) and c.se_diff == pytest.approx(math.hypot(a.se, b.se))
    close = compare("hellaswag/acc", {"a": summarize([0.30, 0.34], [0.03, 0.03]),
                                      "b": summarize([0.31, 0.35], [0.03, 0.03])})
    assert close.ranked == ["b", "a"] and close.verdict == "within_noise" and close.winner is None
    single_seed = compare("train/final_loss", {"a": summarize([3.0], [None]), "b": summarize([3.1], [None])})
    assert single_seed.verdict == "no_noise_estimate"
    assert compare("moe/load_cv", {"a": a, "b": b}).verdict == "descriptive"
    assert [metric_direction(m) for m in ("train/final_loss", "wikitext2/loss", "arc_easy:mc/acc_norm", "moe/load_cv")] \
        == ["lower", "lower", "higher", None]


def test_compare_tests_the_best_against_every_other_entity():
    # two tie at the top (a clip that never fires), both beyond noise ahead of the third
    muon, clip, adamw = (summarize([2.10, 2.12], [None, None]), summarize([2.10, 2.12], [None, None]),
                         summarize([2.30, 2.32], [None, None]))
    c = compare("wikitext2/bits_per_byte", {"adamw": adamw, "muon": muon, "muon_qkclip": clip})
    assert c.verdict == "leads" and c.winner is None
    assert c.leaders == ["muon", "muon_qkclip"] and c.beaten == ["adamw"]
    assert [(v.entity, v.beyond_noise) for v in c.versus] == [("muon_qkclip", False), ("adamw", True)]
    assert c.versus[1].diff == pytest.approx(-0.20) and c.versus[1].se_diff == pytest.approx(math.hypot(muon.se, adamw.se))
    text = statement(c, {"adamw": adamw, "muon": muon, "muon_qkclip": clip})
    assert "beats `adamw` 2.3100 by 0.2000" in text and "`muon_qkclip` 2.1100 by 0.0000" in text
    assert "`muon` and `muon_qkclip` lead, no single winner" in text
    # beating every other one is a winner; beating none is noise
    third = compare("wikitext2/bits_per_byte", {"a": muon, "b": adamw, "c": summarize([2.50, 2.52], [None, None])})
    assert third.verdict == "winner" and third.winner == "a" and third.beaten == ["b", "c"]
    assert compare("hellaswag/acc", {"a": muon, "b": clip}).verdict == "within_noise"


def test_mutual_information_of_expert_and_source():
    assert source_expert_mi({"web": {0: 50, 1: 0}, "code": {0: 0, 1: 50}}) == pytest.approx(1.0)  # one bit
    assert source_expert_mi({"web": {0: 25, 1: 25}, "code": {0: 25, 1: 25}}) == pytest.approx(0.0)


def test_report_picks_the_best_point_per_group_and_says_what_is_noise(tmp_path):
    runs = []
    # adamw is best at lr 'mid', muon at 'hi'; muon (best) beats adamw (best) on bpb beyond noise,
    # and their accuracies are within noise
    bpb = {("adamw", "lo"): 2.6, ("adamw", "mid"): 2.4, ("adamw", "hi"): 2.9,
           ("muon", "lo"): 2.5, ("muon", "mid"): 2.3, ("muon", "hi"): 2.1}
    for (opt, lr), value in bpb.items():
        for seed, jitter in ((0, -0.01), (1, 0.01)):
            runs.append(_run_dir(tmp_path, f"{opt}_{lr}", seed, [5.0, 4.0, value + 1 + jitter],
                                 [("wikitext2", "bits_per_byte", value + jitter, None),
                                  ("hellaswag", "acc", 0.30 + jitter + (0.01 if opt == "muon" else 0), 0.04)],
                                 points={"optimizer": opt, "lr": lr}))
    report = make_report("opt", runs, {"axis": "lr", "by": None})
    assert report.entities == {"adamw": "adamw_mid", "muon": "muon_hi"}
    assert report.best_of["by"] == "wikitext2/bits_per_byte" and report.best_of["points"] == ["lo", "mid", "hi"]
    bpb_c = report.comparisons["wikitext2/bits_per_byte"]
    assert bpb_c.winner == "muon" and bpb_c.diff == pytest.approx(2.1 - 2.4)
    assert report.comparisons["hellaswag/acc"].verdict == "within_noise"
    assert report.comparisons["train/final_loss"].winner == "muon"
    assert list(report.comparisons)[0] == "train/final_loss"
    assert len(report.rows()) == 12 * 3 + 6 and {r["grid"] for r in report.rows()} == {"opt"}
    # QK-clip tracking (muon runs here): the largest logit seen, a descriptive number
    assert report.summaries["train/max_attn_logit"]["muon_hi"].mean == 6.0
    assert report.comparisons["train/max_attn_logit"].verdict == "descriptive"
    text = markdown(report, runs, "two optimizers")
    assert "## Best `lr` per group (picked by wikitext2/bits_per_byte, lower is better)" in text
    assert "| adamw | mid | 2.6000 | **2.4000** | 2.9000 |" in text
    assert "`muon` wins" in text and "within noise" in text and "no winner at this scale" in text
    # three metrics with a verdict, one pair each: the chance of a false "beyond noise" is said
    assert "These are 3 pairwise tests at 2 standard errors: even if no variant differed, about 0.1 of them" in text
    assert "![loss curves](loss_curves.png)" in text
    assert report.curves["muon_hi"] == [(1, 5.0), (2, 4.0), (3, pytest.approx(3.1))]
    assert loss_curves_png(report).startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="best_of.by: no metric 'piqa/acc'"):
        make_report("opt", runs, {"axis": "lr", "by": "piqa/acc"})


def test_report_shows_expert_load_by_source(tmp_path):
    load = [(s, 1, e, src, n) for s in (2, 4) for e, src, n in
            ((0, "web", 90), (1, "web", 10), (0, "code", 10), (1, "code", 90))]
    runs = [_run_dir(tmp_path, "global_batch", 0, [3.0, 2.0], [("wikitext2", "loss", 2.0, None)], load)]
    report = make_report("moe", runs)
    shares = report.expert_shares["global_batch"]
    assert shares["web"] == {0: pytest.approx(0.9), 1: pytest.approx(0.1)}  # the second half only: step 4
    mi = next(m.value for m in report.measurements if m.metric == "moe/expert_source_mi")
    assert mi == pytest.approx(source_expert_mi({"web": {0: 90, 1: 10}, "code": {0: 10, 1: 90}}))
    assert "| web | 0.900 | 0.100 |" in markdown(report, runs)


def test_training_loss_gets_no_verdict_across_different_mixtures(tmp_path):
    def runs(root: Path, mixture_of) -> list[RunOutputs]:
        return [replace(_run_dir(root, v, s, [4.0, base + j], [("wikitext2", "bits_per_byte", base + j, None)]),
                        data_version=mixture_of(v))
                for v, base in (("curated", 2.0), ("raw", 3.0)) for s, j in ((0, -0.01), (1, 0.01))]

    same = make_report("data", runs(tmp_path / "same", lambda v: "m1"))
    assert same.comparisons["train/final_loss"].winner == "curated"
    different_runs = runs(tmp_path / "different", lambda v: f"m_{v}")
    different = make_report("data", different_runs)
    loss = different.comparisons["train/final_loss"]
    assert loss.verdict == "not_comparable" and loss.winner is None and loss.ranked == ["curated", "raw"]
    assert different.comparisons["wikitext2/bits_per_byte"].winner == "curated"  # the same text for every variant
    text = markdown(different, different_runs)
    assert "| train/final_loss | lower |" in text and "| not comparable |" in text
    assert "The curves are not comparable across variants: the variants train on different mixtures" in text


# --- end to end on a real instance -------------------------------------------------------------------


def _tiny_base() -> dict:
    base = tiny_recipe("tiny_base")
    del base["sources"]["commoncrawl"]
    base["sources"]["fineweb"]["limit"] = 60
    base["mixture"] = {"weights": {"fineweb": 1.0}, "total_tokens": 20000}
    base["training"] = {"steps": 4, "batch_size": 4, "warmup_steps": 1, "log_every": 2}
    base["evals"] = {"tasks": ["hellaswag"], "max_items": 4, "heldout_max_tokens": 500}
    base["contamination"] = None
    return base


def _variant(name: str, lr: float) -> dict:
    return {"name": name, "overrides": {"optimizer": {"lr": lr}}}


# curation, training and lighteval on a real instance: ~100 s of CPU for the five tests below
end_to_end = pytest.mark.slow
DATA_ASSETS = {"raw_fineweb", "filtered_fineweb", "curated_fineweb", "tokenizer", "tokenized_fineweb", "mixture"}
RUN_ASSETS = {"checkpoint", "eval_report", "data_stats"}


def names(labels: list[str], recipe: str) -> set[str]:
    return {label.split("/", 1)[1].split("[")[0] for label in labels if label.split("/", 1)[0] == recipe}


class Session:
    """An ablation file being edited, one Dagster instance, one store."""

    def __init__(self, root: Path):
        from dagster import DagsterInstance

        self.store = root / "store"
        self.home = root / "home"
        self.home.mkdir()
        (self.home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        self.instance = DagsterInstance.local_temp(str(self.home))
        self.path = root / "abl.yaml"
        write(root / "bases" / "tiny.yaml", _tiny_base())

    def write(self, variants: list[dict]) -> Path:
        return write(self.path, {"name": "abl", "base": "bases/tiny.yaml", "variants": variants, "seeds": [0, 1]})

    def sync(self) -> dict:
        from assets.definitions import build_definitions, load_all
        from assets.sync import sync

        loaded = load_all([self.path])
        report = sync(build_definitions(loaded), loaded, self.instance)
        assert report.error is None, report.error
        return report.as_json()


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    saved = {k: os.environ.get(k) for k in ("FOUNDRY_STORE", "FOUNDRY_WORKERS")}
    root = tmp_path_factory.mktemp("ablations")
    os.environ["FOUNDRY_STORE"] = str(root / "store")
    os.environ["FOUNDRY_WORKERS"] = "1"
    s = Session(root)
    s.write([_variant("a", 0.003)])
    s.first = s.sync()  # one variant, two seeds
    s.write([_variant("a", 0.003), _variant("b", 0.001)])
    s.second = s.sync()  # a second variant that differs only in its learning rate
    yield s
    s.instance.dispose()
    restore_environ(saved)


@end_to_end
def test_seeds_of_one_variant_build_the_data_once(session):
    first = session.first
    for asset in DATA_ASSETS:
        ran = [s for s in (0, 1) if asset in names(first["ran"], f"abl__a__s{s}")]
        hit = [s for s in (0, 1) if asset in names(first["cache_hit"], f"abl__a__s{s}")]
        assert len(ran) == 1 and len(hit) == 1, (asset, ran, hit)  # built by one seed's run, a hit for the other
    for s in (0, 1):
        assert RUN_ASSETS <= names(first["ran"], f"abl__a__s{s}")
    assert "abl/ablation_report" in first["ran"]


@end_to_end
def test_a_variant_differing_only_in_training_shares_every_data_asset(session):
    second = session.second
    for s in (0, 1):
        assert names(second["cache_hit"], f"abl__b__s{s}") == DATA_ASSETS
        assert names(second["ran"], f"abl__b__s{s}") == RUN_ASSETS
        assert names(second["untouched"], f"abl__a__s{s}") == DATA_ASSETS | RUN_ASSETS
    assert "abl/ablation_report" in second["ran"]  # a new variant: a new report


@end_to_end
def test_report_numbers_equal_duckdb_over_evals_and_train_metrics(session):
    from dagster import AssetKey

    from assets import lineage
    from assets.stats import query

    rec = lineage.latest(session.instance, AssetKey(["abl", "ablation_report"]))
    out = Path(rec.path)
    report = json.loads((out / "report.json").read_text())

    def duck(sql: str) -> list[tuple]:
        return query(session.store, sql)[1]

    table = {(v, s, m): x for v, s, m, x in duck("select variant, seed, metric, value from ablations where grid = 'abl'")}
    evals = duck("select recipe, task || '/' || metric, value from evals where recipe like 'abl__%'")
    losses = duck("select recipe, arg_max(loss, step) from train_metrics where recipe like 'abl__%' group by recipe")
    assert len(evals) == 4 * 5 and len(losses) == 4  # 3 hellaswag + 2 held-out metrics per run
    expected = {(r.split("__")[1], int(r.split("__s")[1]), m): v for r, m, v in evals}
    expected |= {(r.split("__")[1], int(r.split("__s")[1]), "train/final_loss"): v for r, v in losses}
    assert table == expected

    # means and standard errors over seeds (and items) as DuckDB computes them from the run tables
    stats = duck("select split_part(recipe, '__', 2), task || '/' || metric, avg(value), stddev_samp(value) / sqrt(count(*)), "
                 "sqrt(sum(stderr * stderr)) / count(*) from evals where recipe like 'abl__%' group by all")
    assert len(stats) == 2 * 5
    for variant, metric, mean, se_seeds, se_items in stats:
        got = report["metrics"][metric]["variants"][variant]
        assert got["mean"] == pytest.approx(mean, rel=1e-12)
        assert got["se_seeds"] == pytest.approx(se_seeds, rel=1e-9, abs=1e-15)
        assert got["se_items"] == (None if se_items is None else pytest.approx(se_items, rel=1e-9))
    loss_stats = duck("select split_part(recipe, '__', 2), avg(l), stddev_samp(l) / sqrt(count(*)) from "
                      "(select recipe, arg_max(loss, step) as l from train_metrics where recipe like 'abl__%' "
                      "group by recipe) group by 1")
    for variant, mean, se in loss_stats:
        got = report["metrics"]["train/final_loss"]["variants"][variant]
        assert (got["mean"], got["se"]) == (pytest.approx(mean, rel=1e-12), pytest.approx(se, rel=1e-9))
    # the winner named for held-out bits per byte is the lower mean, or none within noise
    bpb = report["metrics"]["wikitext2/bits_per_byte"]
    means = {v: x["mean"] for v, x in bpb["variants"].items()}
    assert bpb["ranked"][0] == min(means, key=means.get)
    se = math.hypot(*(bpb["variants"][v]["se"] for v in means))
    assert bpb["verdict"] == ("winner" if abs(means["a"] - means["b"]) >= 2 * se else "within_noise")
    # the asset page: markdown with the loss curves inline
    meta = rec.metadata
    assert meta["report"].startswith("# Ablation `abl`") and "data:image/png;base64," in meta["report"]
    assert "## What won" in meta["report"]


@end_to_end
def test_changing_one_variant_rebuilds_only_its_runs(session):
    session.write([_variant("a", 0.003), _variant("b", 0.002)])
    report = session.sync()
    assert set(report["ran"]) == {f"abl__b__s{s}/{a}" for s in (0, 1) for a in RUN_ASSETS} | {"abl/ablation_report"}
    assert report["cache_hit"] == []
    for s in (0, 1):
        assert names(report["untouched"], f"abl__a__s{s}") == DATA_ASSETS | RUN_ASSETS
        assert names(report["untouched"], f"abl__b__s{s}") == DATA_ASSETS


@end_to_end
def test_foundry_compare_prints_the_report(session, monkeypatch, capsys, tmp_path):
    from assets.cli import main

    monkeypatch.setenv("DAGSTER_HOME", str(session.home))
    monkeypatch.setenv("FOUNDRY_RECIPES", "")  # compare sets these two: restore them afterwards
    monkeypatch.setenv("FOUNDRY_ABLATIONS", "")
    assert main(["compare", str(session.path), "--no-sync", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("# Ablation `abl`") and "| train/final_loss | lower |" in out.out
    assert (tmp_path / "out" / "loss_curves.png").read_bytes().startswith(b"\x89PNG")
    assert main(["compare", str(session.path.parent / "bases" / "tiny.yaml")]) == 2
    assert "is not an ablation file" in capsys.readouterr().err
