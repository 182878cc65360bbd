"""Recipe validation: every failure names the recipe file and the offending field."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from assets.recipe import Recipe, RecipeError, load_recipe, parse_recipe, source_files
from assets.settings import PROJECT_ROOT, data_root, expand_vars, resolve_data_path

DEMO = PROJECT_ROOT / "recipes" / "demo.yaml"
FINEWEB_REL = "web/fineweb_sample/fineweb_legal_dedup.jsonl.gz"
CC_REL = "web/commoncrawl_raw"


def base_recipe() -> dict:
    return {
        "name": "unit",
        "sources": {
            "fineweb": {
                "kind": "jsonl",
                "path": FINEWEB_REL,
                "curation": {"gopher_quality": {"min_doc_words": 50}},
            },
            "commoncrawl": {"kind": "jsonl", "path": CC_REL},
        },
        "mixture": {"weights": {"fineweb": 0.8, "commoncrawl": 0.2}, "total_tokens": 1000},
    }


def write(tmp_path: Path, data, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def load_error(tmp_path: Path, data) -> tuple[Path, str]:
    path = write(tmp_path, data)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, data_root=data_root())
    return path, str(info.value)


def mutated(fn) -> dict:
    d = copy.deepcopy(base_recipe())
    fn(d)
    return d


# --------------------------------------------------------------------- schema errors


def test_base_recipe_is_valid(tmp_path):
    recipe = load_recipe(write(tmp_path, base_recipe()), data_root=data_root())
    assert isinstance(recipe, Recipe)
    assert list(recipe.sources) == ["fineweb", "commoncrawl"]
    assert recipe.sources["fineweb"].curation.gopher_quality.min_doc_words == 50
    assert recipe.mixed_sources() == ["fineweb", "commoncrawl"]


def test_unknown_top_level_key(tmp_path):
    path, msg = load_error(tmp_path, mutated(lambda d: d.update(epochz=3)))
    assert msg == f"{path}: invalid recipe\n  epochz: unknown key"


def test_unknown_nested_key_names_full_field_path(tmp_path):
    def typo(d):
        d["sources"]["fineweb"]["curation"]["gopher_quality"]["min_doc_wordz"] = 40

    path, msg = load_error(tmp_path, mutated(typo))
    assert msg == (
        f"{path}: invalid recipe\n  sources.fineweb.curation.gopher_quality.min_doc_wordz: unknown key"
    )


def test_unknown_key_in_model_section(tmp_path):
    path, msg = load_error(tmp_path, mutated(lambda d: d.update(model={"d_modle": 64})))
    assert msg == f"{path}: invalid recipe\n  model.d_modle: unknown key"


def test_negative_weight(tmp_path):
    path, msg = load_error(tmp_path, mutated(lambda d: d["mixture"]["weights"].update(commoncrawl=-0.5)))
    assert msg == f"{path}: invalid recipe\n  mixture.weights: weight of 'commoncrawl' must be >= 0 (got -0.5)"


def test_all_zero_weights(tmp_path):
    path, msg = load_error(
        tmp_path, mutated(lambda d: d["mixture"].update(weights={"fineweb": 0, "commoncrawl": 0.0}))
    )
    assert msg == (
        f"{path}: invalid recipe\n  mixture.weights: "
        "weights are all zero: at least one source needs a positive weight"
    )


def test_empty_weights(tmp_path):
    path, msg = load_error(tmp_path, mutated(lambda d: d["mixture"].update(weights={})))
    assert msg == f"{path}: invalid recipe\n  mixture.weights: at least one source weight is required"


def test_weight_for_unknown_source(tmp_path):
    path, msg = load_error(tmp_path, mutated(lambda d: d["mixture"]["weights"].update(wikipedia=0.1)))
    assert msg.startswith(f"{path}: invalid recipe\n")
    assert "mixture.weights names unknown source(s) ['wikipedia']" in msg
    assert "sources are ['commoncrawl', 'fineweb']" in msg


def test_max_epochs_for_unknown_source(tmp_path):
    path, msg = load_error(tmp_path, mutated(lambda d: d["mixture"].update(max_epochs={"wiki": 2})))
    assert msg.startswith(f"{path}: invalid recipe\n")
    assert "mixture.max_epochs names unknown source(s) ['wiki']" in msg


def test_heads_must_divide_width(tmp_path):
    path, msg = load_error(tmp_path, mutated(lambda d: d.update(model={"d_model": 128, "n_heads": 3, "n_kv_heads": 1})))
    assert msg == f"{path}: invalid recipe\n  model: n_heads (3) must divide d_model (128)"


def test_kv_heads_must_divide_heads(tmp_path):
    path, msg = load_error(tmp_path, mutated(lambda d: d.update(model={"n_heads": 4, "n_kv_heads": 3})))
    assert msg == f"{path}: invalid recipe\n  model: n_kv_heads (3) must divide n_heads (4)"


def test_odd_head_dim_rejected(tmp_path):
    path, msg = load_error(tmp_path, mutated(lambda d: d.update(model={"d_model": 12, "n_heads": 4, "n_kv_heads": 2})))
    assert msg == f"{path}: invalid recipe\n  model: head dimension d_model / n_heads must be even for RoPE"


@pytest.mark.parametrize("name", ["Demo", "1demo", "demo-x", "", "demo x"])
def test_bad_recipe_name(tmp_path, name):
    path, msg = load_error(tmp_path, mutated(lambda d: d.update(name=name)))
    assert msg == (
        f"{path}: invalid recipe\n  name: must be lowercase letters, digits and '_', starting with a letter"
    )


def test_bad_source_name(tmp_path):
    def rename(d):
        d["sources"]["Web-1"] = d["sources"].pop("commoncrawl")
        d["mixture"]["weights"] = {"fineweb": 1.0}

    path, msg = load_error(tmp_path, mutated(rename))
    assert msg == f"{path}: invalid recipe\n  sources: source name 'Web-1' must be lowercase letters, digits and '_'"


def test_several_errors_are_all_reported(tmp_path):
    def two(d):
        d["bogus"] = 1
        d["sources"]["fineweb"]["shards"] = 0

    path, msg = load_error(tmp_path, mutated(two))
    lines = msg.splitlines()
    assert lines[0] == f"{path}: invalid recipe"
    assert sorted(lines[1:]) == sorted(
        ["  bogus: unknown key", "  sources.fineweb.shards: Input should be greater than or equal to 1"]
    )


def test_invalid_yaml(tmp_path):
    path, msg = load_error(tmp_path, "name: demo\nsources: {fineweb: [unclosed\n")
    assert msg.startswith(f"{path}: not valid YAML: ")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", ""])
def test_non_mapping_yaml(tmp_path, text):
    path, msg = load_error(tmp_path, text)
    assert msg == f"{path}: a recipe must be a YAML mapping"


def test_missing_recipe_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value) == f"{path}: recipe file not found"


def test_parse_recipe_uses_origin():
    with pytest.raises(RecipeError) as info:
        parse_recipe(mutated(lambda d: d.update(nme="x")), origin="somewhere/r.yaml")
    assert str(info.value) == "somewhere/r.yaml: invalid recipe\n  nme: unknown key"
    with pytest.raises(RecipeError) as info:
        parse_recipe(["not", "a", "mapping"], origin="o.yaml")
    assert str(info.value) == "o.yaml: a recipe must be a YAML mapping"


# --------------------------------------------------------------------- paths


def test_missing_source_path_names_resolved_path(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    path = write(tmp_path, mutated(lambda d: d["sources"]["fineweb"].update(path="web/missing/file.jsonl")))
    # commoncrawl also missing under this root: both are reported
    with pytest.raises(RecipeError) as info:
        load_recipe(path, data_root=root)
    msg = str(info.value)
    assert msg == (
        f"{path}: invalid recipe\n"
        f"  sources.fineweb.path: path does not exist: {root.resolve() / 'web/missing/file.jsonl'}\n"
        f"  sources.commoncrawl.path: path does not exist: {root.resolve() / CC_REL}"
    )


def test_missing_absolute_source_path(tmp_path):
    missing = tmp_path / "absent" / "x.jsonl"
    path, msg = load_error(tmp_path, mutated(lambda d: d["sources"]["commoncrawl"].update(path=str(missing))))
    assert msg == f"{path}: invalid recipe\n  sources.commoncrawl.path: path does not exist: {missing}"


def test_directory_without_matching_files(tmp_path):
    empty = tmp_path / "only_txt"
    empty.mkdir()
    (empty / "notes.txt").write_text("hi")
    path, msg = load_error(tmp_path, mutated(lambda d: d["sources"]["commoncrawl"].update(path=str(empty))))
    assert msg == f"{path}: invalid recipe\n  sources.commoncrawl.path: no jsonl files match {empty}"


def test_missing_tokenizer_path(tmp_path):
    path, msg = load_error(tmp_path, mutated(lambda d: d.update(tokenizer={"path": "tok/none.json"})))
    assert msg == f"{path}: invalid recipe\n  tokenizer.path: file not found: {data_root() / 'tok/none.json'}"


def test_relative_paths_resolve_under_data_root(tmp_path):
    recipe = load_recipe(write(tmp_path, base_recipe()), data_root=data_root())
    assert source_files(recipe.sources["fineweb"], data_root()) == [data_root() / FINEWEB_REL]
    cc = source_files(recipe.sources["commoncrawl"], data_root())
    assert [p.name for p in cc] == [
        "CC-MAIN-20190717121559-20190717143559-00140.jsonl.gz",
        "cc_en_head-0091.jsonl.gz",
        "cc_en_head-0174.jsonl.gz",
        "provided_documents_000.json.gz",
    ]
    assert all(p.parent == data_root() / CC_REL for p in cc)


def test_data_root_env_override(tmp_path, monkeypatch):
    root = tmp_path / "alt_root"
    (root / "web").mkdir(parents=True)
    (root / "web" / "a.jsonl").write_text('{"text": "x"}\n')
    monkeypatch.setenv("FOUNDRY_DATA_ROOT", str(root))
    assert data_root() == root.resolve()
    d = base_recipe()
    d["sources"] = {"only": {"kind": "jsonl", "path": "web/a.jsonl"}}
    d["mixture"]["weights"] = {"only": 1}
    recipe = load_recipe(write(tmp_path, d))  # no explicit data_root: the env one
    assert source_files(recipe.sources["only"]) == [root.resolve() / "web" / "a.jsonl"]


def test_glob_source(tmp_path):
    d = mutated(lambda d: d["sources"]["commoncrawl"].update(path="web/commoncrawl_raw/cc_en_*.jsonl.gz"))
    recipe = load_recipe(write(tmp_path, d), data_root=data_root())
    files = source_files(recipe.sources["commoncrawl"], data_root())
    assert [p.name for p in files] == ["cc_en_head-0091.jsonl.gz", "cc_en_head-0174.jsonl.gz"]


def test_var_default_expansion_in_source_path(tmp_path, monkeypatch):
    d = mutated(
        lambda d: d["sources"]["fineweb"].update(
            path="${FOUNDRY_TEST_FW_DIR:-web/fineweb_sample}/fineweb_legal_dedup.jsonl.gz"
        )
    )
    path = write(tmp_path, d)

    monkeypatch.delenv("FOUNDRY_TEST_FW_DIR", raising=False)
    recipe = load_recipe(path, data_root=data_root())
    assert source_files(recipe.sources["fineweb"], data_root()) == [data_root() / FINEWEB_REL]

    # set but empty: `:-` falls back to the default, like a POSIX shell
    monkeypatch.setenv("FOUNDRY_TEST_FW_DIR", "")
    assert source_files(recipe.sources["fineweb"], data_root()) == [data_root() / FINEWEB_REL]

    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "fineweb_legal_dedup.jsonl.gz").write_bytes(b"")
    monkeypatch.setenv("FOUNDRY_TEST_FW_DIR", str(other))
    recipe = load_recipe(path, data_root=data_root())
    assert source_files(recipe.sources["fineweb"], data_root()) == [other / "fineweb_legal_dedup.jsonl.gz"]

    # pointing the variable at a missing directory fails at load, naming the expanded path
    monkeypatch.setenv("FOUNDRY_TEST_FW_DIR", str(tmp_path / "gone"))
    with pytest.raises(RecipeError) as info:
        load_recipe(path, data_root=data_root())
    assert str(info.value) == (
        f"{path}: invalid recipe\n  sources.fineweb.path: path does not exist: "
        f"{tmp_path / 'gone' / 'fineweb_legal_dedup.jsonl.gz'}"
    )


def test_expand_vars_forms(monkeypatch):
    monkeypatch.setenv("FOUNDRY_T_A", "aa")
    monkeypatch.delenv("FOUNDRY_T_UNSET", raising=False)
    assert expand_vars("${FOUNDRY_T_A}/x") == "aa/x"
    assert expand_vars("${FOUNDRY_T_A:-zz}/x") == "aa/x"
    assert expand_vars("${FOUNDRY_T_UNSET:-zz}/x") == "zz/x"
    assert expand_vars("${FOUNDRY_T_UNSET}/x") == "/x"
    assert expand_vars("$FOUNDRY_T_A/x") == "$FOUNDRY_T_A/x"  # only the braced form
    assert resolve_data_path("${FOUNDRY_T_UNSET:-sub}/f.jsonl", Path("/r")) == Path("/r/sub/f.jsonl")


def test_directory_source_lists_only_matching_files(tmp_path):
    src_dir = tmp_path / "mixed"
    (src_dir / "sub").mkdir(parents=True)
    for name in ["b.jsonl", "a.jsonl.gz", "c.json.gz", "sub/d.jsonl", "e.jsonl.zst", "x.parquet",
                 "notes.txt", "README.md", "data.jsonl.bak", "archive.tar.gz", "LICENSE"]:
        (src_dir / name).write_bytes(b"")
    d = base_recipe()
    d["sources"] = {
        "js": {"kind": "jsonl", "path": str(src_dir)},
        "pq": {"kind": "parquet", "path": str(src_dir)},
    }
    d["mixture"]["weights"] = {"js": 1, "pq": 1}
    recipe = load_recipe(write(tmp_path, d))
    js = source_files(recipe.sources["js"])
    assert [p.relative_to(src_dir).as_posix() for p in js] == [
        "a.jsonl.gz", "b.jsonl", "c.json.gz", "e.jsonl.zst", "sub/d.jsonl",
    ]
    assert [p.relative_to(src_dir).as_posix() for p in source_files(recipe.sources["pq"])] == ["x.parquet"]


def test_demo_recipe_loads():
    recipe = load_recipe(DEMO)
    assert recipe.name == "demo"
    assert list(recipe.sources) == ["fineweb", "commoncrawl", "warc", "pdf"]
    assert recipe.sources["fineweb"].limit == 1000
    assert recipe.sources["fineweb"].curation.c4_quality.filter_no_terminal_punct is False
    cc = recipe.sources["commoncrawl"].curation
    assert cc.language.languages == ["en"] and cc.minhash.num_buckets == 14 and cc.checks.language_share.blocking
    assert recipe.sources["warc"].kind == "warc"
    pdf = recipe.sources["pdf"]  # curation left to the PDF defaults
    assert (pdf.kind, pdf.shards, pdf.curation.c4_quality, pdf.curation.pdf.max_pages) == ("pdf", 1, None, 500)
    assert recipe.mixture.weights == {"fineweb": 0.71, "commoncrawl": 0.2, "warc": 0.02, "pdf": 0.02,
                                      "fineweb_qa": 0.05}
    qa = recipe.rephrase["fineweb_qa"]
    assert (qa.source, qa.backend.kind, qa.styles) == ("fineweb", "extractive", ["qa", "cloze"])
    # the token budget covers what training reads (steps x batch x seq_len)
    t, m = recipe.training, recipe.model
    assert recipe.mixture.total_tokens >= t.steps * t.batch_size * m.seq_len
    assert recipe.mixture.epoch_cap("fineweb") == 1.0
    assert recipe.mixture.epoch_cap("commoncrawl") == 3.0
    assert (recipe.model.d_model, recipe.model.n_heads, recipe.model.n_kv_heads) == (128, 4, 2)
    assert recipe.automation.training == "manual"
    assert len(source_files(recipe.sources["commoncrawl"])) == 4


# --------------------------------------------------------------------- kind hf


def test_hf_fields_validate(tmp_path):
    def hf(**fields):
        return mutated(lambda d: d["sources"]["commoncrawl"].update(fields))

    not_a_folder = "must be a folder inside the dataset, like 'sample/10BT'"
    for fields, error in [
        ({"name": "train"}, "sources.commoncrawl: 'name' applies only to kind hf (this source is jsonl)"),
        ({"revision": "v1"}, "sources.commoncrawl: 'revision' applies only to kind hf (this source is jsonl)"),
        ({"kind": "hf", "name": "../up"}, f"sources.commoncrawl.name: '../up' {not_a_folder}"),
        ({"kind": "hf", "name": "/abs"}, f"sources.commoncrawl.name: '/abs' {not_a_folder}"),
        ({"kind": "hf", "revision": ""}, "sources.commoncrawl.revision: String should have at least 1 character"),
    ]:
        with pytest.raises(RecipeError) as info:
            parse_recipe(hf(**fields), origin="r.yaml")
        assert str(info.value) == f"r.yaml: invalid recipe\n  {error}"
    spec = parse_recipe(hf(kind="hf", name="./sample//10BT/"), origin="r.yaml").sources["commoncrawl"]
    assert spec.name == "sample/10BT"


def test_hf_fields_leave_existing_sources_unchanged_in_dumps():
    """Unset hf fields stay out of the dump, so sources written before them keep their hashes."""
    recipe = parse_recipe(base_recipe())
    assert set(recipe.sources["commoncrawl"].model_dump(mode="json")) == {
        "kind", "path", "text_key", "id_key", "limit", "shards", "curation",
    }
    d = mutated(lambda d: d["sources"]["commoncrawl"].update(kind="hf", path="o/n", name="a", revision="r1"))
    dumped = parse_recipe(d).sources["commoncrawl"].model_dump(mode="json")
    assert (dumped["name"], dumped["revision"]) == ("a", "r1")


def test_hf_hub_source_not_cached_fails_at_load(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    d = mutated(lambda d: d["sources"]["commoncrawl"].update(kind="hf", path="HuggingFaceFW/fineweb",
                                                              name="sample/10BT"))
    path, msg = load_error(tmp_path, d)
    assert msg == (
        f"{path}: invalid recipe\n  sources.commoncrawl.path: Hugging Face dataset HuggingFaceFW/fineweb is not in "
        f"the local HF cache ({tmp_path / 'hub'}) and HF_HUB_OFFLINE=1 forbids downloading it; "
        f"no local path {data_root() / 'HuggingFaceFW/fineweb'} exists either"
    )


def test_hf_glob_takes_data_files_but_no_name(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ["data-00000-of-00001.arrow", "x.parquet", "state.json", "dataset_info.json"]:
        (tmp_path / "a" / name).write_bytes(b"")
    d = base_recipe()
    d["sources"] = {"hf": {"kind": "hf", "path": str(tmp_path / "a" / "*")}}
    d["mixture"]["weights"] = {"hf": 1}
    recipe = load_recipe(write(tmp_path, d))
    assert [p.name for p in source_files(recipe.sources["hf"])] == ["data-00000-of-00001.arrow", "x.parquet"]
    d["sources"]["hf"]["name"] = "train"
    path, msg = load_error(tmp_path, d)
    assert msg == (f"{path}: invalid recipe\n  sources.hf.path: {tmp_path / 'a' / '*'}: 'name' and 'revision' need "
                   "a folder or Hub id as path, not a glob")


def test_moe_fields_validate_and_stay_out_of_dense_identity():
    from assets.recipe import ModelSpec, TrainingSpec

    dense = ModelSpec()
    assert not any(k.startswith("moe_") for k in dense.hashed())
    assert "grad_accum_steps" not in TrainingSpec().hashed()
    assert TrainingSpec(grad_accum_steps=2).hashed()["grad_accum_steps"] == 2
    moe = ModelSpec(moe_experts=8, moe_top_k=2, moe_lb_scope="global_batch")
    assert moe.hashed()["moe_experts"] == 8 and moe.hashed()["moe_lb_scope"] == "global_batch"
    with pytest.raises(ValueError, match="apply only to MoE models"):
        ModelSpec(moe_top_k=4)
    with pytest.raises(ValueError, match="at most moe_experts"):
        ModelSpec(moe_experts=2, moe_top_k=3)
