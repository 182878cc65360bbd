"""Benchmark tasks through lighteval, in cloze and multiple-choice-letter form.

Every benchmark is one row of ``_TASK_TABLE``: where its source file lives (relative to the
data root), which reader turns a source row into a raw record, and the cloze answer prompt.
``TASK_SPECS`` holds one ``TaskSpec`` per (benchmark, form): ``arc_easy`` (cloze) and
``arc_easy:mc`` (letters). Adding a benchmark is adding a row (plus a reader if its file
format is new).

Cloze form: the model never sees the other options. For each choice we score
log P(choice | query) and pick the argmax, raw (``acc``), divided by the choice's
character length (``acc_norm``, lighteval's ``LogProbCharNorm``) and by its token count
(``acc_norm_token``, ``LogProbTokenNorm``). WinoGrande uses partial scoring: the option
sits in the context and the shared rest of the sentence is scored. LAMBADA: ``acc`` is
whether the last word is the model's greedy continuation.

MC form: the choices are listed as ``A. text`` lines after the stem, followed by
``Answer:``; the continuations scored are `` A``, `` B``, ... (``acc`` only).

Few-shot (``num_fewshot`` = k > 0): each scored item's prompt starts with k solved examples
(``query`` + gold answer, blank-line separated, the plain-text layout of lighteval's
PromptManager). The source files have no train/dev split, so the examples come from the
task's items that are NOT scored in this run (the complement of the ``max_items`` selection);
only when fewer than k such items exist (the whole file is scored) are they drawn from the
other scored items, never the item itself. Each item's examples are drawn by a RNG seeded
with (seed, item index), so they do not depend on which other items are scored, and a run
is reproducible exactly. They are written into the prepared records (``fewshot_items``
lists their source indices), so every backend sees the same prompt. lighteval's own
sampler is not used: its seed is fixed (42) and tied to its shuffling of the eval docs, it
does not exclude the scored item when the pool is the eval split (Doc ids differ by split),
and it would render a partial-scoring example without its option.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

# ---------------------------------------------------------------------------
# Readers: source file -> raw records
#   multiple choice:  {"stem", "choices" (answer texts, no leading space), "gold"}
#   partial scoring:  {"contexts" (one per choice), "continuation", "gold"}   (WinoGrande)
#   last word:        {"context", "continuation"}                            (LAMBADA)
# ---------------------------------------------------------------------------


def _read_jsonl(path: Path) -> Iterator[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            line = line.strip()
            if line:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {n} is not valid JSON ({e})") from None


def _hellaswag_clean(text: str) -> str:
    # The usual HellaSwag preprocessing (WikiHow markup removal). Our copy is already
    # cleaned upstream; this is idempotent and kept for other copies of the data.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag(row: dict) -> dict:
    """HellaSwag jsonl(.gz): {activity_label, ctx, endings[4], label}."""
    return {
        "stem": _hellaswag_clean(f"{row['activity_label']}: {row['ctx']}"),
        "choices": [_hellaswag_clean(e) for e in row["endings"]],
        "gold": int(row["label"]),
    }


def read_query_choices_gold(row: dict) -> dict:
    """LLM Foundry local-data MC format: {query, choices, gold}."""
    return {"stem": row["query"], "choices": [str(c).strip() for c in row["choices"]], "gold": int(row["gold"])}


_LETTER_LINE = re.compile(r"^([A-Z])\. ?(.*)$")


def read_lettered(row: dict) -> dict:
    """LLM Foundry files already in letter form (CommonsenseQA, Social IQa):
    query = "<stem>\nChoices:\nA. text\nB. text\nAnswer:", choices = ["A", "B", ...].
    The answer texts are parsed back out of the query so both forms can be built."""
    query = row["query"]
    if "\nChoices:\n" not in query:
        raise ValueError("no 'Choices:' block in the query")
    stem, block = query.split("\nChoices:\n", 1)
    block = block.rstrip()
    if block.endswith("Answer:"):
        block = block[: -len("Answer:")]
    texts: dict[str, str] = {}
    for line in block.strip().split("\n"):
        m = _LETTER_LINE.match(line.strip())
        if not m:
            raise ValueError(f"cannot parse choice line {line!r}")
        texts[m.group(1)] = m.group(2).strip()
    letters = [str(c).strip() for c in row["choices"]]
    missing = [c for c in letters if c not in texts]
    if missing:
        raise ValueError(f"choices {missing} not listed in the query")
    return {"stem": stem, "choices": [texts[c] for c in letters], "gold": int(row["gold"])}


def read_mmlu_redux(row: dict) -> dict | None:
    """MMLU-Redux jsonl {subject, question, choices, answer, error_type}; keeps error_type 'ok' only
    (None: row skipped).

    error_type spellings in the file are not normalised ('ok', 'OK', 'Ok', 'OK '...), so compare
    case- and whitespace-insensitively.
    """
    if str(row.get("error_type", "ok")).strip().lower() != "ok":
        return None
    subject = row["subject"].replace("_", " ")
    return {
        "stem": f"The following are questions about {subject}.\n\nQuestion: {row['question'].strip()}",
        "choices": [str(c).strip() for c in row["choices"]],
        "gold": int(row["answer"]),
    }


def read_partial(row: dict) -> dict:
    """WinoGrande in LLM Foundry's partial-scoring form: {context_options[2], continuation, gold}.
    The choice is in the context; the shared continuation is what gets scored."""
    return {
        "contexts": [str(c) for c in row["context_options"]],
        "continuation": str(row["continuation"]).strip(),
        "gold": int(row["gold"]),
    }


def read_lambada(row: dict) -> dict:
    """LAMBADA (OpenAI): {context, continuation (the last word)}."""
    return {"context": str(row["context"]), "continuation": str(row["continuation"]).strip()}


# One source row -> a raw record (None: the row is not part of the task).
READERS: dict[str, Callable[[dict], dict | None]] = {
    "hellaswag": read_hellaswag,
    "query_choices_gold": read_query_choices_gold,
    "lettered": read_lettered,
    "mmlu_redux": read_mmlu_redux,
    "partial": read_partial,
    "lambada": read_lambada,
}

# How a task is scored: "choices" (argmax over per-choice log-likelihoods), "partial" (same,
# but each choice is a different context for one shared continuation), "last_word" (is the
# gold continuation the greedy prediction).
SCORING = {"hellaswag": "choices", "query_choices_gold": "choices", "lettered": "choices",
           "mmlu_redux": "choices", "partial": "partial", "lambada": "last_word"}

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
FORMS = ("cloze", "mc")


@dataclass(frozen=True)
class TaskSpec:
    name: str  # "<base>" (cloze form) or "<base>:mc" (multiple-choice-letter form)
    source: str  # path relative to the data root (the folder holding eval/ and text/)
    reader: str  # key of READERS
    answer_prompt: str = ""  # cloze: appended to the stem (after stripping trailing whitespace)
    description: str = ""
    form: str = "cloze"  # "cloze" | "mc"

    @property
    def base(self) -> str:
        return self.name.split(":", 1)[0]

    @property
    def scoring(self) -> str:
        return SCORING[self.reader]

    @property
    def metrics(self) -> tuple[str, ...]:
        """Metric names reported for this task."""
        if self.scoring == "last_word":
            return ("acc",)
        if self.form == "mc":
            return ("acc",)  # letters all have one character / token: normalising changes nothing
        return ("acc", "acc_norm", "acc_norm_token")

    def fingerprint(self) -> str:
        return json.dumps(
            {"name": self.name, "source": self.source, "reader": self.reader, "answer_prompt": self.answer_prompt,
             "form": self.form},
            sort_keys=True,
        )


def build_record(spec: TaskSpec, raw: dict) -> dict:
    """One raw record -> the prompt record lighteval sees: {query, choices, gold} (+ contexts)."""
    scoring = spec.scoring
    if scoring == "partial":
        cont = " " + raw["continuation"]
        contexts = [c.rstrip() for c in raw["contexts"]]
        return {"query": os.path.commonprefix(contexts).rstrip(), "contexts": contexts,
                "choices": [cont] * len(contexts), "gold": raw["gold"]}
    if scoring == "last_word":
        return {"query": raw["context"].rstrip(), "choices": [" " + raw["continuation"]], "gold": 0}
    stem = raw["stem"].rstrip()
    if spec.form == "mc":
        letters = LETTERS[: len(raw["choices"])]
        listing = "\n".join(f"{L}. {c}" for L, c in zip(letters, raw["choices"], strict=True))
        return {"query": f"{stem}\n{listing}\nAnswer:", "choices": [" " + L for L in letters], "gold": raw["gold"]}
    return {"query": stem + spec.answer_prompt, "choices": [" " + c for c in raw["choices"]], "gold": raw["gold"]}


# Bump when the record layout or any reader changes: it invalidates prepared folders.
# (The cloze prompts of hellaswag and arc_easy are unchanged since version 1.)
DATA_FORMAT_VERSION = 2

_ANSWER = "\nAnswer:"
# base name, source, reader, cloze answer prompt, has an mc form, description
_TASK_TABLE = [
    ("hellaswag", "eval/hellaswag/hellaswag_val.jsonl.gz", "hellaswag", "", True,
     "HellaSwag validation (10,042), sentence completion"),
    ("arc_easy", "eval/llmfoundry/arc_easy.jsonl", "query_choices_gold", _ANSWER, True, "ARC-Easy test (2,376)"),
    ("arc_challenge", "eval/llmfoundry/arc_challenge.jsonl", "query_choices_gold", _ANSWER, True,
     "ARC-Challenge test (1,172)"),
    ("piqa", "eval/llmfoundry/piqa.jsonl", "query_choices_gold", _ANSWER, True, "PIQA validation (1,838)"),
    ("openbookqa", "eval/llmfoundry/openbook_qa.jsonl", "query_choices_gold", "", True, "OpenBookQA test (500)"),
    ("winogrande", "eval/llmfoundry/winogrande.jsonl", "partial", "", False,
     "WinoGrande dev (1,267), partial scoring: the option is in the context, the shared rest is scored"),
    ("boolq", "eval/llmfoundry/boolq.jsonl", "query_choices_gold", _ANSWER, False, "BoolQ validation (3,270)"),
    ("copa", "eval/llmfoundry/copa.jsonl", "query_choices_gold", "", False, "COPA (100)"),
    ("commonsense_qa", "eval/llmfoundry/commonsense_qa.jsonl", "lettered", _ANSWER, True,
     "CommonsenseQA validation (1,221)"),
    ("siqa", "eval/llmfoundry/siqa.jsonl", "lettered", _ANSWER, True, "Social IQa validation (1,954)"),
    ("mmlu_redux", "eval/mmlu_redux/mmlu_redux_all.jsonl", "mmlu_redux", _ANSWER, True,
     "MMLU-Redux, error_type ok (5,330)"),
    ("lambada", "eval/llmfoundry/lambada_openai.jsonl", "lambada", "", False,
     "LAMBADA (OpenAI test, 5,153): is the last word the greedy continuation"),
]


def _task_specs() -> dict[str, TaskSpec]:
    specs = {}
    for base, source, reader, answer, has_mc, desc in _TASK_TABLE:
        specs[base] = TaskSpec(base, source, reader, answer, desc, "cloze")
        if has_mc:
            specs[f"{base}:mc"] = TaskSpec(f"{base}:mc", source, reader, "", desc + ", lettered choices", "mc")
    return specs


TASK_SPECS: dict[str, TaskSpec] = _task_specs()


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
    """All prompt records of a task, in file order, each with its 0-based source index.

    Raises ValueError naming the task and file for an empty file or a malformed row."""
    path = source_path(spec, data_root)
    records = []
    reader = READERS[spec.reader]
    try:
        rows = list(_read_jsonl(path))
    except (ValueError, OSError, EOFError) as e:  # bad JSON, bad gzip, bad UTF-8
        raise ValueError(f"{spec.name}: {e}") from None
    for line_no, row in enumerate(rows):
        i = len(records)  # 0-based index among the task's rows (MMLU-Redux: among error_type ok)
        try:
            raw = reader(row)
            if raw is None:
                continue
            rec = build_record(spec, raw)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{spec.name}: {path}: row {line_no} is malformed ({type(e).__name__}: {e})") from None
        choices = rec["choices"]
        if len(choices) < 1 or not all(c.strip() for c in choices):
            raise ValueError(f"{spec.name}: {path}: row {line_no} has an empty choice")
        if not 0 <= rec["gold"] < len(choices):
            raise ValueError(f"{spec.name}: {path}: row {line_no} has gold {rec['gold']} out of range")
        rec["source_index"] = i
        records.append(rec)
    if not records:
        raise ValueError(f"{spec.name}: {path} holds no items")
    return records


def select_indices(n_total: int, max_items: int | None, seed: int) -> list[int]:
    """Deterministic subset: all rows if max_items is None or >= n_total, else a seeded
    random sample, returned in file order."""
    if max_items is None or max_items >= n_total:
        return list(range(n_total))
    if max_items <= 0:
        raise ValueError(f"max_items must be positive or None, got {max_items}")
    return sorted(random.Random(seed).sample(range(n_total), max_items))


def example_text(record: dict) -> str:
    """A solved example: the prompt followed by the gold answer (for partial scoring the gold
    option's context followed by the shared continuation)."""
    gold = record["gold"]
    prompt = record["contexts"][gold] if record.get("contexts") else record["query"]
    return prompt + record["choices"][gold]


def fewshot_indices(n_total: int, scored: list[int], item: int, k: int, seed: int) -> list[int]:
    """k example rows for scored row `item`: from the rows not scored if at least k exist,
    else from every other row. Seeded by (seed, item) only."""
    if k <= 0:
        return []
    scored_set = set(scored)
    pool = [i for i in range(n_total) if i not in scored_set]
    if len(pool) < k:
        pool = [i for i in range(n_total) if i != item]
    if len(pool) < k:
        raise ValueError(f"num_fewshot {k} needs at least {k + 1} items; the task has {n_total}")
    return random.Random(f"fewshot:{seed}:{item}").sample(pool, k)


def with_fewshot(record: dict, examples: list[dict]) -> dict:
    """The record with the examples put before its prompt (and before each partial context)."""
    if not examples:
        return record
    block = "\n\n".join(example_text(e) for e in examples) + "\n\n"
    out = dict(record, query=block + record["query"], fewshot_items=[int(e["source_index"]) for e in examples])
    if record.get("contexts"):
        out["contexts"] = [block + c for c in record["contexts"]]
    return out


def _source_identity(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def prepare_task_dataset(
    spec: TaskSpec, data_root: Path, cache_dir: Path, max_items: int | None, seed: int = 0, num_fewshot: int = 0
) -> Path:
    """Write the selected items of a task to ``<cache_dir>/<name>-<digest>/test.jsonl``; return the folder.

    Reuses an existing folder with the same digest. Content depends only on the source file,
    the spec, max_items, seed and num_fewshot (examples put before each prompt).
    """
    if not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise ValueError(f"num_fewshot must be an integer >= 0, got {num_fewshot!r}")
    src = source_path(spec, data_root)
    parts = [DATA_FORMAT_VERSION, spec.fingerprint(), _source_identity(src), max_items, seed]
    if num_fewshot:  # left out at 0 so zero-shot folders keep their names
        parts.append(num_fewshot)
    key = json.dumps(parts, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    out = Path(cache_dir) / f"{lighteval_name(spec.name)}-{digest}"
    target = out / "test.jsonl"
    if target.is_file():
        return out

    records = load_records(spec, data_root)
    scored = select_indices(len(records), max_items, seed)
    chosen = [
        with_fewshot(records[i], [records[j] for j in fewshot_indices(len(records), scored, i, num_fewshot, seed)])
        for i in scored
    ]
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


def lighteval_name(name: str) -> str:
    """The task's name inside lighteval (no ':' there: lighteval task specs use ':' and '|')."""
    return name.replace(":", "__")


def cloze_prompt(line: dict, task_name: str | None = None):
    """lighteval prompt function: one prepared record -> Doc.

    Partial scoring (WinoGrande): ``specific["contexts"]`` holds one context per choice; the
    model scores the shared continuation (``choices[i]``) after ``contexts[i]``."""
    from lighteval.tasks.requests import Doc

    specific = {"source_index": int(line["source_index"])}
    if line.get("contexts"):
        specific["contexts"] = list(line["contexts"])
    if line.get("fewshot_items"):
        specific["fewshot_items"] = list(line["fewshot_items"])
    return Doc(
        task_name=task_name,
        query=line["query"],
        choices=list(line["choices"]),
        gold_index=int(line["gold"]),
        specific=specific,
    )


def task_metrics(spec: TaskSpec) -> list:
    from lighteval.metrics.dynamic_metrics import LogLikelihoodAccMetric
    from lighteval.metrics.metrics import Metrics
    from lighteval.metrics.normalizations import LogProbCharNorm, LogProbTokenNorm

    if spec.scoring == "last_word":
        return [Metrics.acc_golds_likelihood]  # "acc": the gold continuation is the greedy one
    # "acc" (raw sum of log-probs), "acc_norm" (log-prob / characters of the choice, lighteval's
    # LogProbCharNorm), "acc_norm_token" (log-prob / tokens of the choice, LogProbTokenNorm)
    metrics = {
        "acc": Metrics.loglikelihood_acc,
        "acc_norm": LogLikelihoodAccMetric(normalization=LogProbCharNorm()),
        "acc_norm_token": LogLikelihoodAccMetric(normalization=LogProbTokenNorm()),
    }
    return [metrics[m] for m in spec.metrics]


def cloze_metrics() -> list:
    """The metrics of a plain cloze task (kept for callers of the first version)."""
    return task_metrics(TASK_SPECS["arc_easy"])


def build_task_config(spec: TaskSpec, dataset_dir: Path):
    from lighteval.tasks.lighteval_task import LightevalTaskConfig

    return LightevalTaskConfig(
        name=lighteval_name(spec.name),
        prompt_function=cloze_prompt,
        hf_repo=str(dataset_dir),
        hf_subset="default",
        hf_avail_splits=["test"],
        evaluation_splits=["test"],
        few_shots_split=None,
        few_shots_select=None,
        generation_size=None,
        metrics=task_metrics(spec),
        stop_sequence=None,
        version=DATA_FORMAT_VERSION,
    )


def build_task_configs(
    names: list[str], data_root: Path, cache_dir: Path, max_items: int | None, seed: int = 0, num_fewshot: int = 0
) -> list:
    """LightevalTaskConfig per task name, each reading a freshly prepared local folder."""
    specs = check_tasks(names)
    return [build_task_config(s, prepare_task_dataset(s, data_root, cache_dir, max_items, seed, num_fewshot))
            for s in specs]
