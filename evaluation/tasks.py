"""Multiple-choice benchmark tasks, scored in cloze form through lighteval.

Every task is one row of ``TASK_SPECS``: where its source file lives (relative to the
data root), how to turn one source row into a normalised ``{query, choices, gold}``
record, and how the prompt is shaped. Adding a benchmark is adding a row (plus a
reader function if its file format is new).

Cloze form: the model never sees the other options. For each choice we score
log P(choice | query) and pick the argmax, raw (``acc``) and divided by the choice's
character length (``acc_norm``, lighteval's ``LogProbCharNorm``).

lighteval wants a dataset *folder*; the source files have assorted names and formats.
``prepare_task_dataset`` therefore writes the selected items, already normalised, to
``<cache_dir>/<task>-<digest>/test.jsonl``; the lighteval config points ``hf_repo`` at that
folder. The digest covers the spec, the item selection and the source file's identity,
so a folder is never reused for different content.

This module does not import lighteval at module level (its import takes ~10 s); only
``build_task_configs`` does.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

# ---------------------------------------------------------------------------
# Readers: source file -> normalised records {"query", "choices", "gold"}
# ---------------------------------------------------------------------------


def _read_jsonl(path: Path) -> Iterator[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                yield json.loads(line)


def _hellaswag_clean(text: str) -> str:
    # The usual HellaSwag preprocessing (WikiHow markup removal). Our copy is already
    # cleaned upstream; this is idempotent and kept for other copies of the data.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag(path: Path) -> Iterator[dict]:
    """HellaSwag jsonl(.gz): {activity_label, ctx, endings[4], label}."""
    for row in _read_jsonl(path):
        yield {
            "query": _hellaswag_clean(f"{row['activity_label']}: {row['ctx']}"),
            "choices": [" " + _hellaswag_clean(e) for e in row["endings"]],
            "gold": int(row["label"]),
        }


def read_query_choices_gold(path: Path) -> Iterator[dict]:
    """LLM Foundry local-data MC format: {query, choices, gold}; choices get a leading space."""
    for row in _read_jsonl(path):
        yield {
            "query": row["query"],
            "choices": [" " + str(c).strip() for c in row["choices"]],
            "gold": int(row["gold"]),
        }


def read_mmlu_redux(path: Path) -> Iterator[dict]:
    """MMLU-Redux jsonl {subject, question, choices, answer, error_type}; keeps error_type 'ok' only.

    error_type spellings in the file are not normalised ('ok', 'OK', 'Ok', 'OK '...), so compare
    case- and whitespace-insensitively.
    """
    for row in _read_jsonl(path):
        if str(row.get("error_type", "ok")).strip().lower() != "ok":
            continue
        subject = row["subject"].replace("_", " ")
        yield {
            "query": f"The following are questions about {subject}.\n\nQuestion: {row['question'].strip()}",
            "choices": [" " + str(c).strip() for c in row["choices"]],
            "gold": int(row["answer"]),
        }


READERS: dict[str, Callable[[Path], Iterator[dict]]] = {
    "hellaswag": read_hellaswag,
    "query_choices_gold": read_query_choices_gold,
    "mmlu_redux": read_mmlu_redux,
}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    source: str  # path relative to the data root (the folder holding eval/ and text/)
    reader: str  # key of READERS
    answer_prompt: str = ""  # appended to the query (after stripping trailing whitespace)
    description: str = ""

    def fingerprint(self) -> str:
        return json.dumps(
            {"name": self.name, "source": self.source, "reader": self.reader, "answer_prompt": self.answer_prompt},
            sort_keys=True,
        )


# Bump when the record layout or any reader changes: it invalidates prepared folders.
DATA_FORMAT_VERSION = 1

TASK_SPECS: dict[str, TaskSpec] = {
    s.name: s
    for s in [
        TaskSpec("hellaswag", "eval/hellaswag/hellaswag_val.jsonl.gz", "hellaswag",
                 description="HellaSwag validation (10,042), sentence completion"),
        TaskSpec("arc_easy", "eval/llmfoundry/arc_easy.jsonl", "query_choices_gold", answer_prompt="\nAnswer:",
                 description="ARC-Easy test (2,376)"),
        TaskSpec("arc_challenge", "eval/llmfoundry/arc_challenge.jsonl", "query_choices_gold",
                 answer_prompt="\nAnswer:", description="ARC-Challenge test (1,172)"),
        TaskSpec("piqa", "eval/llmfoundry/piqa.jsonl", "query_choices_gold", answer_prompt="\nAnswer:",
                 description="PIQA validation (1,838)"),
        TaskSpec("openbookqa", "eval/llmfoundry/openbook_qa.jsonl", "query_choices_gold",
                 description="OpenBookQA test (500)"),
        TaskSpec("copa", "eval/llmfoundry/copa.jsonl", "query_choices_gold", description="COPA (100)"),
        TaskSpec("mmlu_redux", "eval/mmlu_redux/mmlu_redux_all.jsonl", "mmlu_redux", answer_prompt="\nAnswer:",
                 description="MMLU-Redux, error_type ok (5,330), cloze over answer texts"),
    ]
}


def known_tasks() -> list[str]:
    return sorted(TASK_SPECS)


def get_spec(name: str) -> TaskSpec:
    try:
        return TASK_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown eval task {name!r}; known tasks: {', '.join(known_tasks())}") from None


def check_tasks(names: list[str]) -> list[TaskSpec]:
    unknown = [n for n in names if n not in TASK_SPECS]
    if unknown:
        raise ValueError(f"unknown eval task(s) {unknown}; known tasks: {', '.join(known_tasks())}")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate task names in {names}")
    return [TASK_SPECS[n] for n in names]


def source_path(spec: TaskSpec, data_root: Path) -> Path:
    path = Path(data_root) / spec.source
    if not path.is_file():
        raise FileNotFoundError(
            f"eval data for {spec.name!r} not found at {path} "
            "(data_root must be the folder that holds eval/ and text/)"
        )
    return path


def load_records(spec: TaskSpec, data_root: Path) -> list[dict]:
    """All normalised records of a task, in file order, each with its 0-based source index."""
    records = []
    for i, rec in enumerate(READERS[spec.reader](source_path(spec, data_root))):
        query = rec["query"]
        if spec.answer_prompt:
            query = query.rstrip() + spec.answer_prompt
        if not 0 <= rec["gold"] < len(rec["choices"]):
            raise ValueError(f"{spec.name}: row {i} has gold {rec['gold']} out of range")
        records.append({"query": query, "choices": rec["choices"], "gold": rec["gold"], "source_index": i})
    return records


def select_indices(n_total: int, max_items: int | None, seed: int) -> list[int]:
    """Deterministic subset: all rows if max_items is None or >= n_total, else a seeded
    random sample, returned in file order."""
    if max_items is None or max_items >= n_total:
        return list(range(n_total))
    if max_items <= 0:
        raise ValueError(f"max_items must be positive or None, got {max_items}")
    return sorted(random.Random(seed).sample(range(n_total), max_items))


def _source_identity(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def prepare_task_dataset(
    spec: TaskSpec, data_root: Path, cache_dir: Path, max_items: int | None, seed: int = 0
) -> Path:
    """Write the selected items of a task to ``<cache_dir>/<name>-<digest>/test.jsonl``; return the folder.

    Reuses an existing folder with the same digest. Content depends only on the source file,
    the spec, max_items and seed.
    """
    src = source_path(spec, data_root)
    key = json.dumps(
        [DATA_FORMAT_VERSION, spec.fingerprint(), _source_identity(src), max_items, seed], sort_keys=True
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    out = Path(cache_dir) / f"{spec.name}-{digest}"
    target = out / "test.jsonl"
    if target.is_file():
        return out

    records = load_records(spec, data_root)
    chosen = [records[i] for i in select_indices(len(records), max_items, seed)]
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".test.jsonl.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in chosen:
            f.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
    # The folder must hold only the data file: datasets reads every data file in it.
    os.replace(tmp, target)
    return out


# ---------------------------------------------------------------------------
# lighteval side
# ---------------------------------------------------------------------------


def cloze_prompt(line: dict, task_name: str | None = None):
    """lighteval prompt function: one prepared record -> Doc."""
    from lighteval.tasks.requests import Doc

    return Doc(
        task_name=task_name,
        query=line["query"],
        choices=list(line["choices"]),
        gold_index=int(line["gold"]),
        specific={"source_index": int(line["source_index"])},
    )


def cloze_metrics() -> list:
    from lighteval.metrics.dynamic_metrics import LogLikelihoodAccMetric
    from lighteval.metrics.metrics import Metrics
    from lighteval.metrics.normalizations import LogProbCharNorm

    # "acc" (raw sum of log-probs) and "acc_norm" (log-prob / len(choice) in characters)
    return [Metrics.loglikelihood_acc, LogLikelihoodAccMetric(normalization=LogProbCharNorm())]


def build_task_config(spec: TaskSpec, dataset_dir: Path):
    from lighteval.tasks.lighteval_task import LightevalTaskConfig

    return LightevalTaskConfig(
        name=spec.name,
        prompt_function=cloze_prompt,
        hf_repo=str(dataset_dir),
        hf_subset="default",
        hf_avail_splits=["test"],
        evaluation_splits=["test"],
        few_shots_split=None,
        few_shots_select=None,
        generation_size=None,
        metrics=cloze_metrics(),
        stop_sequence=None,
        version=DATA_FORMAT_VERSION,
    )


def build_task_configs(
    names: list[str], data_root: Path, cache_dir: Path, max_items: int | None, seed: int = 0
) -> list:
    """LightevalTaskConfig per task name, each reading a freshly prepared local folder."""
    specs = check_tasks(names)
    return [build_task_config(s, prepare_task_dataset(s, data_root, cache_dir, max_items, seed)) for s in specs]
