"""PDF text-layer extraction: speed and quality of the candidate libraries, side by side.

Speed: every sample PDF under <data>/pdf (pdfplumber/, pypdf_samples/, olmocr/gnarly/,
olmocr/bench_sample/pdfs/), in this process, one library after the other over the same files
(read once beforehand so the page cache is warm), --repeats times in alternating order, best run
kept (a library slower than 10 s a run is timed once): pages/s and docs/s of the files each
library opened; files it failed on are counted apart.

Quality: the olmOCR-Bench sample (olmocr/bench_sample/dataset.jsonl), scored as olmOCR-Bench does
(olmocr/bench/tests.py, re-implemented here):
  present / absent  text and page both normalized (markdown emphasis dropped, whitespace collapsed,
                    NFC, typographic quotes and dashes made ASCII); case folded where
                    case_sensitive is false; cut to first_n / last_n characters; then
                    rapidfuzz partial_ratio >= 1 - max_diffs / len(text) means found (a page
                    shorter than the text minus max_diffs cannot contain it)
  order             `before` and `after` each found with at most max_diffs edits (Levenshtein,
                    approximate substring search); passes when some `before` match starts before
                    some `after` match
  table, math       not scored: they look for markdown/HTML tables and LaTeX that plain text
                    layers never contain (every library fails all of them), and math needs KaTeX

Rows: each library's plain call (pypdf extract_text, pdfminer.six extract_text, pdfplumber
extract_text, pypdfium2 get_text_range, PyMuPDF get_text), then Foundry's extractor
(dataprep.pdf: pypdfium2 + cleanup + OCR-routing figures) in process and through its worker
process. The child process's own cost per file is measured apart as the call's wall time minus
the extraction time the child reports (whole-run differences drown in the machine's noise).
Ratios are against the library dataprep.pdf uses.

    python benchmarks/pdf_extraction.py [--data DIR] [--libs pypdfium2,pymupdf,...] [--repeats 3]
                                        [--json] [--failures]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import time
import unicodedata
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from dataprep import pdf as foundry_pdf  # noqa: E402

DATA = Path(os.environ.get("FOUNDRY_DATA_ROOT", PROJECT.parent / "shared" / "data")) / "pdf"
SCORED = ("present", "absent", "order")
SLOW_RUN_S = 10.0  # a library whose run takes longer is timed once (pdfminer.six, pdfplumber, pypdf)
NOT_SCORED = {"table": "no tables in plain text", "math": "no LaTeX in plain text; needs KaTeX"}


# --------------------------------------------------------------------- the candidates


def _pypdf(path: Path) -> list[str]:
    import pypdf

    return [page.extract_text() or "" for page in pypdf.PdfReader(path).pages]


def _pdfminer(path: Path) -> list[str]:
    from pdfminer.high_level import extract_text

    text = extract_text(path)  # default LAParams; a form feed ends every page
    return text.split("\f")[:-1] if text.endswith("\f") else text.split("\f")


def _pdfplumber(path: Path) -> list[str]:
    import pdfplumber

    with pdfplumber.open(path) as doc:
        pages = []
        for page in doc.pages:
            pages.append(page.extract_text() or "")
            page.close()
        return pages


def _pypdfium2(path: Path) -> list[str]:
    import pypdfium2 as pdfium

    doc = pdfium.PdfDocument(path)
    try:
        pages = []
        for page in doc:
            textpage = page.get_textpage()
            pages.append(textpage.get_text_range().replace("\r\n", "\n"))
            textpage.close()
            page.close()
        return pages
    finally:
        doc.close()


def _pymupdf(path: Path) -> list[str]:
    import pymupdf

    with pymupdf.open(path) as doc:
        return [page.get_text() for page in doc]


def _foundry_result_pages(result: foundry_pdf.PdfResult) -> list[str]:
    if result.drop == "no_text_layer":
        return [""] * result.pages
    if result.drop is not None:
        raise RuntimeError(f"{result.drop}: {result.error}")
    return [result.page_text(i) for i in range(len(result.page_offsets))]


def _foundry_in_process(path: Path) -> list[str]:
    return _foundry_result_pages(foundry_pdf.extract_in_process(path, max_pages=10_000))


_worker: foundry_pdf.PdfExtractor | None = None


def _foundry_worker(path: Path) -> list[str]:
    return _foundry_result_pages(_worker.extract(path))


MODULES = {"pypdf": "pypdf", "pdfminer.six": "pdfminer", "pdfplumber": "pdfplumber", "pypdfium2": "pypdfium2",
           "pymupdf": "pymupdf", "foundry": "pypdfium2", "foundry-worker": "pypdfium2"}
LIBRARIES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "pypdf": (_pypdf, "BSD-3-Clause"),
    "pdfminer.six": (_pdfminer, "MIT"),
    "pdfplumber": (_pdfplumber, "MIT"),
    "pypdfium2": (_pypdfium2, "BSD-3/Apache-2.0"),
    "pymupdf": (_pymupdf, "AGPL-3.0"),
    "foundry": (_foundry_in_process, "(pypdfium2)"),
    "foundry-worker": (_foundry_worker, "(pypdfium2)"),
}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("pypdf", "pdfminer.six", "pdfplumber", "pypdfium2", "pymupdf", "rapidfuzz"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "-"
    return out


# --------------------------------------------------------------------- olmOCR-Bench scoring

_QUOTES = str.maketrans({"‘": "'", "’": "'", "‚": "'", "“": '"', "”": '"', "„": '"', "＿": "_", "–": "-",
                         "—": "-", "‑": "-", "‒": "-", "−": "-", "\u00b5": "\u03bc"})


def normalize(text: str) -> str:
    """olmOCR-Bench's normalization of both the page and the test strings."""
    text = re.sub(r"<br/?>", " ", text)
    text = re.sub(r"\*\*(.*?)\*\*", r"\1", text)
    text = re.sub(r"__(.*?)__", r"\1", text)
    text = re.sub(r"</?[bi]>", "", text)
    text = re.sub(r"(\*\*|__)(.*?)\1", r"\2", text)
    text = re.sub(r"(\*|_)(.*?)\1", r"\2", text)
    text = re.sub(r"\s+", " ", text)
    return unicodedata.normalize("NFC", text).translate(_QUOTES)


def _codes(s: str) -> np.ndarray:
    return np.frombuffer(s.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)


def _match_ends(pattern: str, text: str, max_edits: int) -> np.ndarray:
    """Indices e such that some text[s:e] is within `max_edits` edits of `pattern` (Sellers' DP).

    Row by row over the pattern, each row vectorised over the text: the insertion chain along a
    row is a running minimum of (value - column) + column.
    """
    p, t = _codes(pattern), _codes(text)
    cols = np.arange(len(t) + 1)
    row = np.zeros(len(t) + 1, dtype=np.int64)  # a match may start anywhere
    for i, ch in enumerate(p, start=1):
        best = np.empty_like(row)
        best[0] = i
        best[1:] = np.minimum(row[:-1] + (t != ch), row[1:] + 1)
        row = np.minimum.accumulate(best - cols) + cols
    return np.nonzero(row <= max_edits)[0]


def match_starts(pattern: str, text: str, max_edits: int) -> list[int]:
    """Start offsets of the approximate occurrences of `pattern` in `text`."""
    if max_edits == 0:
        starts, i = [], text.find(pattern)
        while i >= 0:
            starts.append(i)
            i = text.find(pattern, i + 1)
        return starts
    ends = _match_ends(pattern[::-1], text[::-1], max_edits)  # ends in the reversed text are starts
    return sorted(len(text) - int(e) for e in ends)


def run_test(test: dict, page: str) -> bool:
    from rapidfuzz import fuzz

    kind = test["type"]
    max_diffs = int(test.get("max_diffs", 0))
    content = normalize(page)
    if kind == "order":
        before = match_starts(normalize(test["before"]), content, max_diffs)
        after = match_starts(normalize(test["after"]), content, max_diffs)
        return bool(before and after and min(before) < max(after))
    query = normalize(test["text"])
    if not test.get("case_sensitive", True):
        query, content = query.lower(), content.lower()
    first_n, last_n = test.get("first_n"), test.get("last_n")
    if first_n and last_n:
        content = content[:first_n] + content[-last_n:]
    elif first_n:
        content = content[:first_n]
    elif last_n:
        content = content[-last_n:]
    if len(content) < len(query) - max_diffs:  # too short to contain it
        return kind == "absent"
    threshold = 1.0 - max_diffs / max(len(query), 1)
    found = fuzz.partial_ratio(query, content) / 100.0 >= threshold
    return found if kind == "present" else not found


def load_tests(data: Path) -> list[dict]:
    with open(data / "olmocr" / "bench_sample" / "dataset.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def quality(name: str, extract: Callable[[Path], list[str]], tests: list[dict], data: Path,
            failures: list[str]) -> dict[str, tuple[int, int]]:
    """(passed, total) per test type; a PDF the library fails on fails its tests."""
    pdf_dir = data / "olmocr" / "bench_sample" / "pdfs"
    pages: dict[str, list[str] | None] = {}
    scores: dict[str, list[int]] = {kind: [0, 0] for kind in (*SCORED, *NOT_SCORED)}
    for test in tests:
        if test["pdf"] not in pages:
            try:
                pages[test["pdf"]] = extract(pdf_dir / test["pdf"])
            except Exception:  # noqa: BLE001 - a failure is a failed test
                pages[test["pdf"]] = None
        score = scores[test["type"]]
        score[1] += 1
        if test["type"] in NOT_SCORED:
            continue
        doc = pages[test["pdf"]]
        index = int(test.get("page", 1)) - 1
        ok = doc is not None and index < len(doc) and run_test(test, doc[index])
        score[0] += ok
        if not ok:
            failures.append(f"{name}: {test['id']} ({test['type']})")
    return {kind: (p, n) for kind, (p, n) in scores.items()}


# --------------------------------------------------------------------- speed


def corpus(data: Path) -> list[Path]:
    return sorted(p for p in data.rglob("*.pdf") if p.is_file())


def speed(extract: Callable[[Path], list[str]], files: list[Path]) -> dict:
    pages = docs = failed = 0
    t0 = time.perf_counter()
    for path in files:
        try:
            pages += len(extract(path))
            docs += 1
        except Exception:  # noqa: BLE001 - counted, not timed apart
            failed += 1
    seconds = time.perf_counter() - t0
    return {"docs": docs, "failed": failed, "pages": pages, "seconds": seconds,
            "pages_per_s": pages / seconds if seconds else 0.0, "docs_per_s": docs / seconds if seconds else 0.0}


def worker_overhead(worker: foundry_pdf.PdfExtractor, files: list[Path]) -> dict:
    """What the child process adds per file: the call's wall time minus the child's extraction time."""
    extra = []
    for path in files:
        t0 = time.perf_counter()
        result = worker.extract(path)
        extra.append(time.perf_counter() - t0 - result.extraction_seconds)
    t0 = time.perf_counter()
    with foundry_pdf.PdfExtractor() as fresh:
        fresh.start()
        startup = time.perf_counter() - t0
    return {"median_ms": 1000 * float(np.median(extra)), "mean_ms": 1000 * float(np.mean(extra)),
            "startup_ms": 1000 * startup}


# --------------------------------------------------------------------- report


def _rate(score: tuple[int, int]) -> str:
    passed, total = score
    return f"{passed:>2}/{total:<2} {100 * passed / total:5.1f}%" if total else "-"


def main() -> None:
    global _worker
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="folder holding the sample PDFs")
    parser.add_argument("--libs", default=",".join(LIBRARIES), help="comma-separated, from: " + ", ".join(LIBRARIES))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per library (best kept)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    parser.add_argument("--failures", action="store_true", help="list the tests each library fails")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)  # pypdf and pdfminer log every odd object

    names = [n.strip() for n in args.libs.split(",") if n.strip()]
    unknown = [n for n in names if n not in LIBRARIES]
    if unknown:
        sys.exit(f"unknown libraries: {unknown}")
    missing = [n for n in names if importlib.util.find_spec(MODULES[n]) is None]
    if missing:  # PyMuPDF (AGPL) is not a project dependency: install it by hand to compare
        print(f"not installed, left out: {', '.join(missing)}")
        names = [n for n in names if n not in missing]
    files = corpus(args.data)
    for path in files:  # warm the page cache
        path.read_bytes()
    tests = load_tests(args.data)
    if "foundry-worker" in names:
        _worker = foundry_pdf.PdfExtractor(max_pages=10_000)
        _worker.extract(files[0])  # start the child outside the timed run

    print(f"{len(files)} PDFs under {args.data}; {len(tests)} olmOCR-Bench tests; versions {versions()}", flush=True)
    rows: dict[str, dict] = {}
    failures: list[str] = []
    for name in names:
        extract, license_ = LIBRARIES[name]
        rows[name] = {"license": license_, "quality": quality(name, extract, tests, args.data, failures)}
    slow: set[str] = set()  # one run is enough to rank a library that takes this long
    for rep in range(args.repeats):  # alternate the order; keep each library's best run
        for name in (names if rep % 2 == 0 else names[::-1]):
            if name in slow:
                continue
            run = speed(LIBRARIES[name][0], files)
            if run["seconds"] > SLOW_RUN_S:
                slow.add(name)
            if "seconds" not in rows[name] or run["seconds"] < rows[name]["seconds"]:
                rows[name].update(run)
            print(f"  run {rep + 1}: {name} {run['seconds']:.2f} s", file=sys.stderr, flush=True)
    overhead = worker_overhead(_worker, files) if _worker is not None else None
    if _worker is not None:
        _worker.close()

    base = foundry_pdf.ENGINE if foundry_pdf.ENGINE in rows else names[0]
    b = rows[base]
    print(f"\n{'library':15s} {'license':17s} {'docs':>4s} {'fail':>4s} {'pages':>5s} {'sec':>7s} {'pages/s':>8s} "
          f"{'docs/s':>7s} {'speed vs ' + base:>19s} | {'present':>12s} {'absent':>12s} {'order':>12s} "
          f"{'text tests':>12s} {'vs ' + base:>8s}")
    for name, r in rows.items():
        q = r["quality"]
        passed = sum(q[k][0] for k in SCORED)
        total = sum(q[k][1] for k in SCORED)
        base_passed = sum(b["quality"][k][0] for k in SCORED)
        ratio = b["pages_per_s"] / r["pages_per_s"] if r["pages_per_s"] else float("inf")
        print(f"{name:15s} {r['license']:17s} {r['docs']:4d} {r['failed']:4d} {r['pages']:5d} {r['seconds']:7.2f} "
              f"{r['pages_per_s']:8.1f} {r['docs_per_s']:7.1f} {f'{base} is {ratio:.2f}x':>19s} | "
              f"{_rate(q['present']):>12s} {_rate(q['absent']):>12s} {_rate(q['order']):>12s} "
              f"{_rate((passed, total)):>12s} {passed - base_passed:+8d}")
    skipped = ", ".join(f"{kind} ({rows[names[0]]['quality'][kind][1]} tests: {why})" for kind, why in NOT_SCORED.items())
    print(f"\nnot scored: {skipped}")
    print("'fail' = files the library raised on (empty, password-protected, ...): no pages counted, time counted")
    if "foundry" in rows and "foundry-worker" in rows:
        inproc, worker = rows["foundry"], rows["foundry-worker"]
        done = max(worker["docs"] + worker["failed"], 1)
        print(f"worker process, whole run: {worker['seconds']:.2f} s vs {inproc['seconds']:.2f} s in process "
              f"({1000 * (worker['seconds'] - inproc['seconds']) / done:+.2f} ms per file over {done} files)")
    if overhead is not None:
        print(f"worker process, per file (call time minus the child's own extraction time): median "
              f"{overhead['median_ms']:.2f} ms, mean {overhead['mean_ms']:.2f} ms; start-up "
              f"{overhead['startup_ms']:.0f} ms (once, and again after a kill)")
    if args.failures:
        print("\nfailed tests:\n  " + "\n  ".join(failures))
    if args.json:
        print(json.dumps({"versions": versions(), "rows": rows, "worker_overhead": overhead}, indent=1))


if __name__ == "__main__":
    main()
