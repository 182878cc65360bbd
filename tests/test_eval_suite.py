"""The task suite (issue 8): every benchmark's data preparation, the multiple-choice-letter
form, WinoGrande partial scoring and LAMBADA through a real lighteval Pipeline, recipe
validation of task names, and the `evals` / `eval_items` DuckDB views.

Reuses the tiny tokenizer and model of tests/test_evaluation.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", str(Path(__file__).resolve().parents[1] / ".cache" / "hf"))

import pyarrow.parquet as pq
import pytest

from evaluation.tasks import LETTERS, TASK_SPECS, known_tasks, load_records, prepare_task_dataset
from tests.test_evaluation import DATA_ROOT, assets, direct_choice_logprob, no_network  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(not (DATA_ROOT / "eval").is_dir(), reason=f"eval data not found under {DATA_ROOT}")

# items per benchmark in ../shared/data/eval (SOURCE.txt files; MMLU-Redux: error_type ok)
EXPECTED_COUNTS = {
    "hellaswag": 10042, "arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838, "openbookqa": 500,
    "winogrande": 1267, "boolq": 3270, "copa": 100, "commonsense_qa": 1221, "siqa": 1954, "mmlu_redux": 5330,
    "lambada": 5153,
}
MC_TASKS = {"hellaswag", "arc_easy", "arc_challenge", "piqa", "openbookqa", "commonsense_qa", "siqa", "mmlu_redux"}
N_ITEMS = 10


# --------------------------------------------------------------------------- data preparation


def test_task_table_covers_the_suite():
    assert set(known_tasks()) == set(EXPECTED_COUNTS) | {f"{t}:mc" for t in MC_TASKS}
    for name, spec in TASK_SPECS.items():
        assert spec.form == ("mc" if name.endswith(":mc") else "cloze")


@pytest.mark.parametrize("base", sorted(EXPECTED_COUNTS))
def test_every_task_prepares(base):
    cloze = load_records(TASK_SPECS[base], DATA_ROOT)
    assert len(cloze) == EXPECTED_COUNTS[base]
    for i, r in enumerate(cloze):
        assert r["source_index"] == i
        assert r["query"].strip() and r["choices"] and 0 <= r["gold"] < len(r["choices"])
        assert all(c.startswith(" ") and c.strip() for c in r["choices"])
    if base == "lambada":
        assert all(len(r["choices"]) == 1 for r in cloze)
        one_word = sum(len(r["choices"][0].split()) == 1 for r in cloze)
        assert one_word >= len(cloze) - 10  # a handful of targets in the file span a line break
        return
    assert all(len(r["choices"]) >= 2 for r in cloze)
    if base in ("commonsense_qa", "siqa"):  # answer texts parsed back out of the lettered source
        assert all("Choices:" not in r["query"] for r in cloze)
        assert all(c.strip() not in LETTERS for r in cloze for c in r["choices"])
    if base in MC_TASKS:
        mc = load_records(TASK_SPECS[f"{base}:mc"], DATA_ROOT)
        assert len(mc) == len(cloze)
        for c, m in zip(cloze[:200], mc[:200]):
            assert m["gold"] == c["gold"]
            assert m["choices"] == [f" {L}" for L in LETTERS[: len(c["choices"])]]
            assert m["query"].endswith("\nAnswer:")
            for L, text in zip(LETTERS, c["choices"]):
                assert f"\n{L}. {text.strip()}\n" in m["query"]
    else:
        assert f"{base}:mc" not in TASK_SPECS


def test_winogrande_partial_form():
    raw = [json.loads(line) for line in (DATA_ROOT / "eval/llmfoundry/winogrande.jsonl").read_text().splitlines()]
    records = load_records(TASK_SPECS["winogrande"], DATA_ROOT)
    for row, r in zip(raw, records):
        # the option sits in the context; the shared continuation is what is scored
        assert r["contexts"] == [c.rstrip() for c in row["context_options"]]
        assert len(set(r["contexts"])) == 2
        assert r["choices"] == [" " + row["continuation"].strip()] * 2
        assert r["gold"] == row["gold"]
        assert all(c.startswith(r["query"]) for c in r["contexts"])
    # the first row of the file, by hand
    assert records[0]["contexts"][1].endswith("so Maria") and records[0]["gold"] == 1
    assert records[0]["choices"][0] == " always got the easier cases."


def test_malformed_row_and_empty_file_name_task_and_file(tmp_path):
    from dataclasses import replace

    bad = tmp_path / "eval" / "bad.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"query": "Q", "choices": ["a", "b"], "gold": 0}\n{"query": "Q", "choices": ["a"]}\n')
    spec = replace(TASK_SPECS["arc_easy"], source="eval/bad.jsonl")
    with pytest.raises(ValueError, match=r"arc_easy: .*bad\.jsonl: row 1 is malformed"):
        load_records(spec, tmp_path)
    bad.write_text('{"query": "Q", "choices": ["a", "b"], "gold": 0}\n{"query": \n')
    with pytest.raises(ValueError, match=r"arc_easy: .*bad\.jsonl: line 2 is not valid JSON"):
        load_records(spec, tmp_path)
    bad.write_text('{"query": "Q", "choices": ["a", "b"], "gold": 2}\n')
    with pytest.raises(ValueError, match=r"arc_easy: .*bad\.jsonl: row 0 has gold 2 out of range"):
        load_records(spec, tmp_path)
    bad.write_text("")
    with pytest.raises(ValueError, match=r"arc_easy: .*bad\.jsonl holds no items"):
        load_records(spec, tmp_path)


def test_prepared_folders_of_both_forms_are_distinct(tmp_path):
    a = prepare_task_dataset(TASK_SPECS["arc_easy"], DATA_ROOT, tmp_path, max_items=3)
    b = prepare_task_dataset(TASK_SPECS["arc_easy:mc"], DATA_ROOT, tmp_path, max_items=3)
    assert a != b and ":" not in b.name
    ids = lambda d: [json.loads(x)["source_index"] for x in (d / "test.jsonl").read_text().splitlines()]  # noqa
    assert ids(a) == ids(b)  # the same items in both forms


# --------------------------------------------------------------------------- recipe validation


def test_recipe_accepts_suite_and_rejects_unknown_task():
    from pydantic import ValidationError

    from assets.recipe import EvalSpec

    assert EvalSpec(tasks=["arc_easy:mc", "winogrande", "lambada"]).tasks == ["arc_easy:mc", "winogrande", "lambada"]
    assert EvalSpec().model_dump(mode="json")["tasks"] == ["hellaswag", "arc_easy"]  # default (and hash) kept
    with pytest.raises(ValidationError) as e:
        EvalSpec(tasks=["arc_easy", "arc_eazy:mc"])
    msg = str(e.value)
    assert "unknown eval task(s) 'arc_eazy:mc'" in msg
    for name in ("arc_easy:mc", "winogrande", "mmlu_redux", "lambada"):
        assert name in msg
    with pytest.raises(ValidationError, match="duplicate"):
        EvalSpec(tasks=["copa", "copa"])


# --------------------------------------------------------------------------- through lighteval


def _fixed_model(assets, work_dir: Path, name: str, oracle: bool):  # noqa: F811
    """Scores the gold choice 0 and the others -10 (oracle), or the reverse (anti-oracle)."""
    from lighteval.models.model_output import ModelResponse
    from lighteval.tasks.requests import SamplingMethod
    from lighteval.utils.cache_management import cached

    from evaluation.lighteval_model import FoundryLightevalModel, FoundryModelConfig

    class Fixed(FoundryLightevalModel):
        @cached(SamplingMethod.LOGPROBS)
        def loglikelihood(self, docs):
            out = []
            for doc in docs:
                good = [(i == doc.gold_index) == oracle for i in range(len(doc.choices))]
                out.append(ModelResponse(logprobs=[0.0 if g else -10.0 for g in good], argmax_logits_eq_gold=good,
                                         output_tokens=[[1]] * len(doc.choices)))
            return out

    return Fixed(assets["model"], assets["tok"], FoundryModelConfig(model_name=name, cache_dir=str(work_dir / "c")))


@pytest.mark.parametrize("oracle,expected", [(True, 1.0), (False, 0.0)])
def test_oracle_on_mc_form_through_pipeline(assets, tmp_path, oracle, expected):  # noqa: F811
    from evaluation.run import run_lighteval

    tasks = ["arc_easy:mc", "winogrande", "lambada"]
    lm = _fixed_model(assets, tmp_path, f"fixed-{oracle}", oracle)
    with no_network() as attempts:
        rows, details, failed = run_lighteval(None, None, tasks, N_ITEMS, DATA_ROOT, tmp_path, "x", lighteval_model=lm)
    assert attempts == [] and failed == {}
    assert {(r["task"], r["form"], r["metric"]) for r in rows} == {
        ("arc_easy:mc", "mc", "acc"), ("lambada", "cloze", "acc"),
        ("winogrande", "cloze", "acc"), ("winogrande", "cloze", "acc_norm"), ("winogrande", "cloze", "acc_norm_token"),
    }
    for r in rows:
        assert r["value"] == expected and r["n_items"] == N_ITEMS
    assert len(details) == 3 * N_ITEMS
    assert all(d["correct"] == oracle for d in details)


@pytest.fixture(scope="module")
def suite_run(assets, tmp_path_factory):  # noqa: F811
    from evaluation.run import evaluate_checkpoint

    work = tmp_path_factory.mktemp("suite_work")
    with no_network() as attempts:
        res = evaluate_checkpoint(assets["ckpt"], assets["tok_path"], ["winogrande", "arc_easy:mc", "boolq", "lambada"],
                                  N_ITEMS, DATA_ROOT, work, heldout="wikitext2", heldout_max_tokens=500)
    assert attempts == []
    return res


def test_real_run_of_four_tasks(suite_run):
    rows = {(r["task"], r["metric"]): r for r in suite_run["rows"]}
    forms = {r["task"]: r["form"] for r in suite_run["rows"]}
    assert forms == {"winogrande": "cloze", "arc_easy:mc": "mc", "boolq": "cloze", "lambada": "cloze",
                     "wikitext2": "heldout"}
    for task in ("winogrande", "arc_easy:mc", "boolq", "lambada"):
        r = rows[(task, "acc")]
        assert r["n_items"] == N_ITEMS and 0.0 <= r["value"] <= 1.0
        items = [d for d in suite_run["details"] if d["task"] == task]
        assert len(items) == N_ITEMS == len({d["item"] for d in items})
        assert r["value"] == pytest.approx(sum(d["correct"] for d in items) / N_ITEMS)
    assert rows[("boolq", "acc_norm_token")]["n_items"] == N_ITEMS
    assert rows[("wikitext2", "bits_per_byte")]["value"] > 0


def test_partial_and_mc_logprobs_match_direct_computation(suite_run, assets):  # noqa: F811
    """WinoGrande: choice i is the shared continuation scored after context i. MC: the letters
    are scored after the listing."""
    model, tok = assets["model"], assets["tok"]
    for task in ("winogrande", "arc_easy:mc"):
        records = load_records(TASK_SPECS[task], DATA_ROOT)
        for d in [x for x in suite_run["details"] if x["task"] == task][:3]:
            rec = records[d["item"]]
            contexts = rec.get("contexts") or [rec["query"]] * len(rec["choices"])
            ref = [direct_choice_logprob(model, tok, ctx, c) for ctx, c in zip(contexts, rec["choices"])]
            assert d["logprobs"] == pytest.approx(ref, abs=2e-3, rel=1e-4)
            assert d["gold"] == rec["gold"]
    if len({tuple(d["logprobs"]) for d in suite_run["details"] if d["task"] == "winogrande"}) == 1:
        pytest.fail("winogrande contexts had no effect on the scores")


# --------------------------------------------------------------------------- DuckDB views


def test_eval_items_view_with_old_and_new_outputs(tmp_path, suite_run):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from assets.evaluation import write_eval_tables
    from assets.stats import query, rebuild_database, view_sql

    store = tmp_path / "store"
    new = store / "eval_report" / "k_new"
    new.mkdir(parents=True)
    write_eval_tables(new, suite_run["rows"], suite_run["details"])
    old = store / "eval_report" / "k_old"  # an eval report from before `form` and details.parquet
    old.mkdir(parents=True)
    pq.write_table(pa.table({"task": ["hellaswag"], "metric": ["acc"], "value": [0.3], "stderr": [0.01],
                             "n_items": [100]}), old / "evals.parquet")
    entries = [
        {"table": "evals", "recipe": "a", "source": None, "file": "eval_report/k_new/evals.parquet"},
        {"table": "eval_items", "recipe": "a", "source": None, "file": "eval_report/k_new/details.parquet"},
        {"table": "evals", "recipe": "b", "source": None, "file": "eval_report/k_old/evals.parquet"},
    ]
    (store / "stats" / "recipes").mkdir(parents=True)
    (store / "stats" / "recipes" / "all.json").write_text(json.dumps(entries))
    rebuild_database(store)

    cols, rows = query(store, "select recipe, task, form, count(*) n, sum(correct::int) k, sum(correct_norm::int) "
                              "from eval_items group by all order by task")
    assert cols[:4] == ["recipe", "task", "form", "n"]
    got = {r[1]: r for r in rows}
    assert set(got) == {"winogrande", "arc_easy:mc", "boolq", "lambada"}
    assert all(r[0] == "a" and r[3] == N_ITEMS for r in rows)
    assert got["arc_easy:mc"][2] == "mc"
    acc = {r["task"]: r["value"] for r in suite_run["rows"] if r["metric"] == "acc"}
    assert all(got[t][4] == round(acc[t] * N_ITEMS) for t in got)

    _, rows = query(store, "select recipe, task, form from evals where metric in ('acc', 'bits_per_byte') "
                           "order by recipe, task")
    assert ("b", "hellaswag", None) in rows  # old output: form is a typed NULL
    assert ("a", "wikitext2", "heldout") in rows and ("a", "arc_easy:mc", "mc") in rows

    # no outputs at all: the views exist, typed and empty
    empty = view_sql(store, [])
    assert "correct_norm" in empty["eval_items"] and "form" in empty["evals"]


# --------------------------------------------------------------------------- few-shot


def test_fewshot_examples_come_from_unscored_items_and_are_reproducible(tmp_path):
    from evaluation.tasks import example_text

    spec = TASK_SPECS["arc_easy"]
    records = load_records(spec, DATA_ROOT)
    a = prepare_task_dataset(spec, DATA_ROOT, tmp_path / "a", max_items=6, seed=0, num_fewshot=3)
    b = prepare_task_dataset(spec, DATA_ROOT, tmp_path / "b", max_items=6, seed=0, num_fewshot=3)
    zero = prepare_task_dataset(spec, DATA_ROOT, tmp_path / "a", max_items=6, seed=0)
    other_seed = prepare_task_dataset(spec, DATA_ROOT, tmp_path / "a", max_items=6, seed=1, num_fewshot=3)
    assert (a / "test.jsonl").read_bytes() == (b / "test.jsonl").read_bytes()
    read = lambda d: [json.loads(x) for x in (d / "test.jsonl").read_text().splitlines()]  # noqa: E731
    rows, zero_rows = read(a), read(zero)
    scored = [r["source_index"] for r in rows]
    assert scored == [r["source_index"] for r in zero_rows]  # few-shot does not change which items are scored
    for r, z in zip(rows, zero_rows):
        shots = r["fewshot_items"]
        assert len(shots) == len(set(shots)) == 3 and not set(shots) & set(scored)
        expected = "\n\n".join(example_text(records[j]) for j in shots) + "\n\n" + z["query"]
        assert r["query"] == expected and r["choices"] == z["choices"] and r["gold"] == z["gold"]
        assert records[shots[0]]["choices"][records[shots[0]]["gold"]] in r["query"]  # the gold answer is shown
    assert [r["fewshot_items"] for r in read(other_seed)] != [r["fewshot_items"] for r in rows]


def test_fewshot_partial_scoring_and_whole_file_fallback(tmp_path):
    wino = TASK_SPECS["winogrande"]
    records = load_records(wino, DATA_ROOT)
    d = prepare_task_dataset(wino, DATA_ROOT, tmp_path, max_items=3, seed=0, num_fewshot=2)
    for r in [json.loads(x) for x in (d / "test.jsonl").read_text().splitlines()]:
        ex = [records[j] for j in r["fewshot_items"]]
        block = "".join(f"{e['contexts'][e['gold']]}{e['choices'][0]}\n\n" for e in ex)  # gold option + rest
        src = records[r["source_index"]]
        assert r["contexts"] == [block + c for c in src["contexts"]]
        assert r["query"] == block + src["query"]
    # COPA scored whole: no unscored items exist, so examples are other items, never the item itself
    copa = TASK_SPECS["copa"]
    d = prepare_task_dataset(copa, DATA_ROOT, tmp_path, max_items=None, seed=0, num_fewshot=4)
    rows = [json.loads(x) for x in (d / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 100
    assert all(len(r["fewshot_items"]) == 4 and r["source_index"] not in r["fewshot_items"] for r in rows)
    with pytest.raises(ValueError, match="num_fewshot"):
        prepare_task_dataset(copa, DATA_ROOT, tmp_path, max_items=None, seed=0, num_fewshot=-1)


def _recording_model(assets, work_dir: Path, name: str, broken_task: str | None = None):  # noqa: F811
    """Scores the gold choice 0, records every prompt it is asked about, and fails on broken_task."""
    from lighteval.models.model_output import ModelResponse
    from lighteval.tasks.requests import SamplingMethod
    from lighteval.utils.cache_management import cached

    from evaluation.lighteval_model import FoundryLightevalModel, FoundryModelConfig

    class Recording(FoundryLightevalModel):
        prompts: dict = {}

        @cached(SamplingMethod.LOGPROBS)
        def loglikelihood(self, docs):
            out = []
            for doc in docs:
                if broken_task and doc.task_name.startswith(broken_task):
                    raise RuntimeError(f"model cannot score {doc.task_name}")
                self.prompts[(doc.task_name, doc.specific["source_index"])] = self.context_for(doc)
                good = [i == doc.gold_index for i in range(len(doc.choices))]
                out.append(ModelResponse(logprobs=[0.0 if g else -10.0 for g in good], argmax_logits_eq_gold=good,
                                         output_tokens=[[1]] * len(doc.choices)))
            return out

    lm = Recording(assets["model"], assets["tok"], FoundryModelConfig(model_name=name, cache_dir=str(work_dir / "c")))
    lm.prompts = {}
    return lm


def test_fewshot_prompts_through_lighteval_are_identical_across_runs(assets, tmp_path):  # noqa: F811
    from evaluation.run import run_lighteval

    records = load_records(TASK_SPECS["arc_easy"], DATA_ROOT)
    prompts = []
    for run in ("one", "two"):
        lm = _recording_model(assets, tmp_path / run, f"rec-{run}")
        rows, details, failed = run_lighteval(None, None, ["arc_easy"], 5, DATA_ROOT, tmp_path / run, run,
                                              lighteval_model=lm, num_fewshot=2)
        assert failed == {} and rows[0]["value"] == 1.0 and len(details) == 5
        prompts.append(lm.prompts)
    assert prompts[0] == prompts[1] and len(prompts[0]) == 5
    scored = {item for _, item in prompts[0]}
    for (_, item), prompt in prompts[0].items():
        parts = prompt.split("\n\n")
        assert len(parts) == 3  # two solved examples, then the question
        assert parts[-1] == records[item]["query"]
        for part in parts[:2]:
            shot = next(r for r in records if part.startswith(r["query"]))
            assert shot["source_index"] not in scored and part == shot["query"] + shot["choices"][shot["gold"]]


def test_recipe_num_fewshot_stays_out_of_the_hash_at_zero():
    from pydantic import ValidationError

    from assets.recipe import EvalSpec

    assert "num_fewshot" not in EvalSpec().model_dump(mode="json")
    assert EvalSpec(num_fewshot=5).model_dump(mode="json")["num_fewshot"] == 5
    with pytest.raises(ValidationError, match="num_fewshot"):
        EvalSpec(num_fewshot=-1)


# --------------------------------------------------------------------------- broken tasks


def _data_root_with(tmp_path: Path, broken: dict[str, str]) -> Path:
    """A data root whose eval files link to the real ones, except `broken` (relative path -> content)."""
    root = tmp_path / "data"
    for src in (DATA_ROOT / "eval").rglob("*.json*"):
        dst = root / src.relative_to(DATA_ROOT)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if str(src.relative_to(DATA_ROOT)) in broken:
            dst.write_text(broken[str(src.relative_to(DATA_ROOT))])
        else:
            dst.symlink_to(src)
    return root


def test_broken_tasks_are_marked_failed_and_the_rest_reported(assets, tmp_path):  # noqa: F811
    from evaluation.run import run_lighteval

    root = _data_root_with(tmp_path, {
        "eval/llmfoundry/copa.jsonl": '{"query": "Q", "choices": ["a", "b"], "gold": 0}\n{"query": "Q"}\n',
        "eval/llmfoundry/piqa.jsonl": "",  # an empty split
        "eval/mmlu_redux/mmlu_redux_all.jsonl": json.dumps(  # every row filtered out: no items
            {"subject": "x", "question": "q", "choices": ["a", "b"], "answer": 0, "error_type": "expert"}) + "\n",
    })
    lm = _recording_model(assets, tmp_path, "broken", broken_task="boolq")
    tasks = ["arc_easy", "copa", "piqa", "mmlu_redux", "boolq", "winogrande"]
    rows, details, failed = run_lighteval(None, None, tasks, 4, root, tmp_path / "w", "b", lighteval_model=lm)
    assert set(failed) == {"copa", "piqa", "mmlu_redux", "boolq"}
    assert "copa" in failed["copa"] and "copa.jsonl: row 1 is malformed" in failed["copa"]
    assert "piqa" in failed["piqa"] and "piqa.jsonl holds no items" in failed["piqa"]
    assert "mmlu_redux_all.jsonl holds no items" in failed["mmlu_redux"]
    assert failed["boolq"].startswith("boolq: RuntimeError: model cannot score boolq")
    assert {r["task"] for r in rows} == {d["task"] for d in details} == {"arc_easy", "winogrande"}
    assert all(r["value"] == 1.0 and r["n_items"] == 4 for r in rows)

    with pytest.raises(RuntimeError, match=r"every eval task failed:\n.*copa.*\n.*piqa"):
        run_lighteval(None, None, ["copa", "piqa"], 4, root, tmp_path / "w2", "b2",
                      lighteval_model=_recording_model(assets, tmp_path, "b2"))
    with pytest.raises(ValueError, match="unknown eval task"):
        run_lighteval(None, None, ["arc_easy", "nope"], 4, root, tmp_path / "w3", "b3", lighteval_model=lm)


def test_eval_asset_passes_num_fewshot_and_reports_failed_tasks(tmp_path, monkeypatch):
    """assets/evaluation.py: the recipe's num_fewshot reaches evaluate_checkpoint; a failed task
    is kept in report.json, the manifest counts and the UI table, the others' rows are written."""
    from types import SimpleNamespace

    import evaluation.run
    from assets.evaluation import build_eval_report, describe_eval_report
    from assets.recipe import EvalSpec
    from assets.store import Manifest

    seen = {}
    row = {"task": "arc_easy", "form": "cloze", "metric": "acc", "value": 0.5, "stderr": 0.1, "n_items": 4}

    def fake_evaluate(**kwargs):
        seen.update(kwargs)
        return {"rows": [row], "details": [], "failed": {"copa": "copa: copa.jsonl: row 1 is malformed"}}

    monkeypatch.setattr(evaluation.run, "evaluate_checkpoint", fake_evaluate)
    logged = []
    out = tmp_path / "out"
    out.mkdir()
    ctx = SimpleNamespace(
        plan=SimpleNamespace(context={"evals": EvalSpec(tasks=["arc_easy", "copa"], num_fewshot=3)}, label="r"),
        upstream={"checkpoint": SimpleNamespace(dir=tmp_path / "ckpt", manifest=SimpleNamespace(
                      counts={"steps": 6, "tokens": 1536})),
                  "tokenizer": SimpleNamespace(dir=tmp_path)},
        foundry=SimpleNamespace(data_path=lambda: DATA_ROOT), out_dir=out,
        log=SimpleNamespace(info=logged.append, error=logged.append),
        progress=lambda what, total=None, unit="documents": None,
    )
    counts = build_eval_report(ctx)
    evals = pq.read_table(out / "evals.parquet").to_pylist()
    assert [(r["task"], r["step"], r["tokens"]) for r in evals] == [("arc_easy", 6, 1536)]  # the final step
    assert seen["num_fewshot"] == 3 and seen["tasks"] == ["arc_easy", "copa"]
    assert counts["failed"] == {"copa": "copa: copa.jsonl: row 1 is malformed"}
    report = json.loads((out / "report.json").read_text())
    assert report["failed"] == counts["failed"] and report["rows"] == [row]
    assert any("copa FAILED" in line for line in logged)
    meta = describe_eval_report(Manifest("eval_report", "k", {}, counts, {}, 0.0, 0.0, out))
    assert "| copa | | FAILED |" in meta["scores"].md_str and "row 1 is malformed" in meta["failed_tasks"].md_str
    assert meta["arc_easy/acc"] == 0.5
