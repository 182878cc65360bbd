"""PDF text-layer extraction with OCR routing (the text branch of a FinePDFs-style PDF pipeline).

One PDF in, one `PdfResult` out, never an exception and never a hang:

- The text layer is read with pypdfium2 (PDFium; BSD-3-Clause / Apache-2.0), chosen by
  benchmarks/pdf_extraction.py: the fastest of pypdf, pdfminer.six, pdfplumber, pypdfium2 and
  PyMuPDF on the sample PDFs (~500 pages/s, 15-60x the pure-Python ones) and tied best on the
  olmOCR-Bench text tests; PyMuPDF is as fast, a little worse, and AGPL-3.0.
- Extraction runs in a persistent child process (`PdfExtractor`): the caller waits at most
  `time_limit_s` per file, then kills the child (it is started again for the next file). A file
  that crashes the child is `malformed`; any exception inside becomes a drop reason.
- Pages are joined with "\\n\\n" (line-based filters see no line straddling two pages);
  `page_offsets[i]` is where page i starts in `text`. PDFium's marker for a hyphen it removed at a
  line end (U+FFFE) is dropped, so "mathemati-/cally" reads "mathematically".

Drop reasons (`PdfResult.drop`), one per file:
  empty           0 bytes
  unreadable      the file cannot be read (missing, permissions)
  malformed       not a PDF, or PDFium cannot parse it (or crashes on it)
  truncated       the end of the file is missing (no %%EOF near the end), even where PDFium
                  could rebuild a readable part: a partial document must not pass for a whole one
  encrypted       needs a password (an encrypted PDF that opens with the empty password is
                  extracted, with encrypted=True)
  zero_pages      parses but has no pages
  too_many_pages  more than `max_pages` pages: dropped whole, not cut to the first N (a cut book
                  must not pass for a whole one either; the page count is still reported)
  timeout         no result within `time_limit_s` (the child was killed)
  no_text_layer   not one character of text on any page (needs_ocr where some page has images)

OCR routing (`needs_ocr`, `ocr_score`, `figures`), see `route_ocr`: FinePDFs sends a PDF to OCR
when its text layer is missing, garbled or only covers part of the content; it learns that
decision (XGBoost over PDF features). With no labels here the score is a transparent noisy-OR of
the same kinds of evidence, each in [0, 1]: pages that are images with (almost) no text, pages that
are scans carrying an old OCR layer, characters that are not text (replacement, private-use,
control), Latin-script words with case flips or digits inside (rare in real text), and Latin text
with too few vowels (a shifted or wrongly mapped font, like olmOCR's Caesar-shifted arXiv pages).
needs_ocr = ocr_score >= `ocr_threshold` (0.5 by default). A scan that carries an earlier OCR layer
scores 0.6 on that alone: such layers are often poor (olmocr/gnarly's newspaper, horribleocr), so it
is sent to OCR again.

Knobs (recipe `curation.pdf` of a kind pdf source; all three change what comes out, so all are
hashed): `time_limit_s` per file, `max_pages`, `ocr_threshold`.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from itertools import repeat
from pathlib import Path

ENGINE = "pypdfium2"
LOGIC_VERSION = "pdf-1"  # bump when extraction or routing changes what comes out
DEFAULT_TIME_LIMIT_S = 30.0
DEFAULT_MAX_PAGES = 500
PAGE_SEPARATOR = "\n\n"
OCR_THRESHOLD = 0.5  # needs_ocr when ocr_score >= this

REASONS = ("empty", "unreadable", "malformed", "truncated", "encrypted", "zero_pages", "too_many_pages",
           "timeout", "no_text_layer")

# Routing constants (see route_ocr)
IMAGE_PAGE_MAX_CHARS = 100  # a page mostly covered by images with fewer characters is an image page
IMAGE_PAGE_MIN_COVER = 0.5  # share of the page area under images
SCAN_MIN_COVER = 0.9  # one image covering this much of a page that has text: a scan with an OCR layer
SCAN_WEIGHT = 0.6  # a fully scanned document with an OCR layer alone scores 0.6: re-OCR it
BAD_CHAR_FULL = 0.05  # this share of non-text characters counts as fully garbled
BAD_WORD_FROM, BAD_WORD_FULL = 0.15, 0.40
VOWEL_FROM, VOWEL_FULL = 0.25, 0.15  # Latin text has 33-46% vowels; shifted fonts ~7-13%
VOWEL_MIN_LETTERS = 200
TEXT_SAMPLE_CHARS = 40_000  # word and letter shares are taken from at most this much text

STARTUP_LIMIT_S = 120.0  # a cold interpreter and pypdfium2 import, on a loaded machine
EOF_TAIL_BYTES = 2048  # the spec puts %%EOF within the last 1 KiB; allow some slack


@dataclass
class OcrFigures:
    """What the OCR decision is made from (document level)."""

    chars_per_page: float = 0.0  # non-whitespace characters per page
    garbled_share: float = 0.0  # non-text characters (U+FFFD, private use, controls) among non-whitespace ones
    bad_word_share: float = 0.0  # Latin-script words with case flips or digits inside
    vowel_share: float | None = None  # vowels among Latin letters (None: too little Latin text to judge)
    image_only_share: float = 0.0  # pages mostly covered by images with (almost) no text
    scanned_share: float = 0.0  # pages that are one full-page image with a text layer on top


@dataclass
class PdfResult:
    path: str
    drop: str | None = None  # one of REASONS, or None
    error: str | None = None  # what went wrong, for people
    pages: int = 0  # pages in the document (known for too_many_pages too)
    text: str = ""
    page_offsets: list[int] = field(default_factory=list)  # start of each page in text (none if no text)
    extraction_seconds: float = 0.0  # in the worker (the time limit, for a timeout)
    producer: str | None = None
    encrypted: bool = False
    needs_ocr: bool = False
    ocr_score: float = 0.0
    figures: OcrFigures | None = None
    sha256: str | None = None

    @property
    def chars(self) -> int:
        return len(self.text)

    def page_text(self, i: int) -> str:
        end = self.page_offsets[i + 1] - len(PAGE_SEPARATOR) if i + 1 < len(self.page_offsets) else len(self.text)
        return self.text[self.page_offsets[i]:end]

    def metadata(self) -> dict:
        """Per-document metadata for a datatrove Document (the drop reason is the caller's).

        The same keys for every PDF (None where unknown), plus "error" where something went wrong.
        """
        meta = {
            "pages": self.pages, "chars": self.chars, "extraction_seconds": round(self.extraction_seconds, 4),
            "producer": self.producer, "encrypted": self.encrypted, "needs_ocr": self.needs_ocr,
            "ocr_score": round(self.ocr_score, 4), "page_offsets": list(self.page_offsets), "sha256": self.sha256,
            "file": Path(self.path).name,
        }
        figures = asdict(self.figures) if self.figures is not None else dict.fromkeys(asdict(OcrFigures()))
        meta.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in figures.items()})
        if self.error:
            meta["error"] = self.error
        return meta


# --------------------------------------------------------------------- OCR routing

_BAD_CHARS = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f\ufffd\ufffe\uffff\ue000-\uf8ff\U000f0000-\U0010ffff]")
_LATIN = re.compile("[A-Za-zÀ-ÖØ-öø-ɏ]")
_VOWELS = re.compile("[aeiouyAEIOUYà-æè-ïò-öø-ýÿÀ-ÆÈ-ÏÒ-ÖØ-Ýœ]")
_LETTERS = re.compile(r"[^\W\d_]")
_LATIN_WORD = re.compile("[A-Za-zÀ-ÖØ-öø-ɏ0-9][A-Za-zÀ-ÖØ-öø-ɏ0-9'’.&/-]*[A-Za-zÀ-ÖØ-öø-ɏ0-9]")
_WORD_EDGES = ".,;:!?()[]{}\"'«»“”‘’*"
_ODD_WORD = re.compile("[a-zß-öø-ÿ][A-ZÀ-ÖØ-Þ]|[A-Za-z][0-9]+[A-Za-z]|[0-9][A-Za-z]+[0-9]")


@dataclass
class PageStats:
    chars: int  # non-whitespace characters
    image_cover: float  # share of the page area under images (summed, may exceed 1)
    largest_image: float  # share of the page area under the largest single image


def _ramp(x: float, zero: float, full: float) -> float:
    """0 at `zero`, 1 at `full`, linear between (either direction)."""
    return min(1.0, max(0.0, (x - zero) / (full - zero)))


def _sample(text: str, limit: int = TEXT_SAMPLE_CHARS, pieces: int = 8) -> str:
    if len(text) <= limit:
        return text
    size, step = limit // pieces, len(text) // pieces
    return " ".join(text[i * step:i * step + size] for i in range(pieces))


def route_ocr(text: str, pages: list[PageStats], threshold: float = OCR_THRESHOLD) -> tuple[bool, float, OcrFigures]:
    """(needs_ocr, ocr_score in [0, 1], figures) for a document's text and per-page stats."""
    n = max(len(pages), 1)
    nonspace = sum(p.chars for p in pages)
    fig = OcrFigures(chars_per_page=nonspace / n)
    fig.garbled_share = len(_BAD_CHARS.findall(text)) / nonspace if nonspace else 0.0
    text = _sample(text)  # word and letter shares: a few spread-out pieces of a long text are enough
    words = [w for w in (t.strip(_WORD_EDGES) for t in text.split()) if len(w) >= 3 and _LATIN_WORD.fullmatch(w)]
    fig.bad_word_share = sum(1 for w in words if _ODD_WORD.search(w)) / len(words) if words else 0.0
    latin = len(_LATIN.findall(text))
    if latin >= VOWEL_MIN_LETTERS and latin >= 0.5 * len(_LETTERS.findall(text)):
        fig.vowel_share = len(_VOWELS.findall(text)) / latin
    fig.image_only_share = sum(
        1 for p in pages if p.image_cover >= IMAGE_PAGE_MIN_COVER and p.chars < IMAGE_PAGE_MAX_CHARS) / n
    fig.scanned_share = sum(
        1 for p in pages if p.largest_image >= SCAN_MIN_COVER and p.chars >= IMAGE_PAGE_MAX_CHARS) / n
    evidence = [
        fig.image_only_share,
        SCAN_WEIGHT * fig.scanned_share,
        _ramp(fig.garbled_share, 0.0, BAD_CHAR_FULL),
        _ramp(fig.bad_word_share, BAD_WORD_FROM, BAD_WORD_FULL),
        _ramp(fig.vowel_share, VOWEL_FROM, VOWEL_FULL) if fig.vowel_share is not None else 0.0,
    ]
    keep = 1.0
    for e in evidence:
        keep *= 1.0 - e
    score = 1.0 - keep
    return score >= threshold, score, fig


# --------------------------------------------------------------------- extraction (in this process)


def clean_page_text(raw: str) -> str:
    """PDFium's page text as plain text: \\n line ends, no trailing blanks, its removed hyphens gone."""
    text = raw.replace("\r\n", "\n").replace("\r", "\n").replace("\ufffe", "").replace("\x00", "")
    return re.sub(r"[ \t]+\n", "\n", text).strip()


def _has_eof_marker(data: bytes) -> bool:
    tail = data[-EOF_TAIL_BYTES - 64:].rstrip(b" \t\r\n\x00")
    return b"%%EOF" in tail[-EOF_TAIL_BYTES:]


def _looks_like_pdf_body(data: bytes) -> bool:
    """Objects as a PDF writer lays them out (a cut file has them; random bytes do not)."""
    return re.search(rb"\d+\s+\d+\s+obj\b", data[:1 << 20]) is not None and b"endobj" in data


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:300]


def _page_stats(page, pdfium_c) -> tuple[float, float]:
    """(summed, largest) share of the page area under image objects, forms included."""
    import ctypes

    width, height = page.get_size()
    area = max(width * height, 1e-6)
    left, bottom, right, top = (ctypes.c_float() for _ in range(4))
    get_type, get_bounds = pdfium_c.FPDFPageObj_GetType, pdfium_c.FPDFPageObj_GetBounds
    image, form = pdfium_c.FPDF_PAGEOBJ_IMAGE, pdfium_c.FPDF_PAGEOBJ_FORM
    covers: list[float] = []

    def walk(objects, depth: int) -> None:
        for obj in objects:
            kind = get_type(obj)
            if kind == image:
                if get_bounds(obj, left, bottom, right, top):  # for an image inside a form: in its space
                    w = max(0.0, min(right.value, width) - max(left.value, 0.0))
                    h = max(0.0, min(top.value, height) - max(bottom.value, 0.0))
                    covers.append(w * h / area)
            elif kind == form and depth < 8:
                count = pdfium_c.FPDFFormObj_CountObjects(obj)
                walk(map(pdfium_c.FPDFFormObj_GetObject, repeat(obj, count), range(count)), depth + 1)

    count = pdfium_c.FPDFPage_CountObjects(page.raw)
    walk(map(pdfium_c.FPDFPage_GetObject, repeat(page.raw, count), range(count)), 0)
    return sum(covers), max(covers, default=0.0)


def extract_in_process(path: str | os.PathLike, max_pages: int = DEFAULT_MAX_PAGES,
                       ocr_threshold: float = OCR_THRESHOLD) -> PdfResult:
    """Extract one PDF here, with no time limit. Never raises (errors become drop reasons).

    Use `extract_pdf` or `PdfExtractor` in pipelines: they run this in a child process.
    """
    t0 = time.perf_counter()
    result = PdfResult(path=str(path))
    try:
        _extract_into(result, Path(path), max_pages, ocr_threshold)
    except Exception as err:  # noqa: BLE001 - whatever PDFium or our code raises, the file is unusable
        result.drop, result.error = "malformed", _describe(err)
        result.text, result.page_offsets, result.needs_ocr, result.ocr_score = "", [], False, 0.0
    result.extraction_seconds = time.perf_counter() - t0
    return result


def _extract_into(result: PdfResult, path: Path, max_pages: int, ocr_threshold: float) -> None:
    try:
        data = path.read_bytes()
    except OSError as err:
        result.drop, result.error = "unreadable", _describe(err)
        return
    result.sha256 = hashlib.sha256(data).hexdigest()
    if not data:
        result.drop = "empty"
        return
    if b"%PDF-" not in data[:1024]:
        result.drop, result.error = "malformed", "no %PDF- header in the first 1 KiB"
        return
    complete = _has_eof_marker(data)

    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c

    # PDFium keeps its last error across calls and sets none when it refuses a document that has
    # no pages; a failed open of a file that does not exist leaves FPDF_ERR_FILE, which a document
    # opened from memory cannot cause, so that code afterwards means "parsed, but no pages".
    pdfium_c.FPDF_LoadDocument(b"/nonexistent/foundry-pdf-error-sentinel.pdf", None)
    try:
        doc = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as err:
        code = getattr(err, "err_code", None)
        result.error = _describe(err)
        if code in (pdfium_c.FPDF_ERR_PASSWORD, pdfium_c.FPDF_ERR_SECURITY):
            result.drop, result.encrypted = "encrypted", True
        elif not complete and _looks_like_pdf_body(data):
            result.drop = "truncated"
        elif code == pdfium_c.FPDF_ERR_FILE:
            result.drop, result.error = "zero_pages", "PDFium found no pages"
        else:
            result.drop = "malformed"
        return
    try:
        result.encrypted = pdfium_c.FPDF_GetSecurityHandlerRevision(doc) != -1
        result.producer = _producer(doc)
        result.pages = len(doc)
        if not complete:
            result.drop, result.error = "truncated", "no %%EOF marker at the end of the file"
        elif result.pages == 0:
            result.drop = "zero_pages"
        elif result.pages > max_pages:
            result.drop, result.error = "too_many_pages", f"{result.pages} pages (max_pages={max_pages})"
        if result.drop is None:
            _read_pages(result, doc, pdfium_c, ocr_threshold)
    finally:
        doc.close()


def _producer(doc) -> str | None:
    try:
        return doc.get_metadata_value("Producer").strip()[:200] or None
    except Exception:  # noqa: BLE001 - an unreadable Info dictionary does not spoil the text
        return None


def _read_pages(result: PdfResult, doc, pdfium_c, ocr_threshold: float) -> None:
    texts: list[str] = []
    stats: list[PageStats] = []
    for i in range(result.pages):
        page = doc[i]
        try:
            textpage = page.get_textpage()
            try:
                text = clean_page_text(textpage.get_text_range())
            finally:
                textpage.close()
            cover, largest = _page_stats(page, pdfium_c)
        finally:
            page.close()
        texts.append(text)
        stats.append(PageStats(chars=len("".join(text.split())), image_cover=cover, largest_image=largest))
    offsets, pos = [], 0
    for text in texts:
        offsets.append(pos)
        pos += len(text) + len(PAGE_SEPARATOR)
    result.text, result.page_offsets = PAGE_SEPARATOR.join(texts), offsets
    result.needs_ocr, result.ocr_score, result.figures = route_ocr(result.text, stats, ocr_threshold)
    if not any(s.chars for s in stats):
        result.drop, result.text, result.page_offsets = "no_text_layer", "", []
        has_images = any(s.image_cover > 0 for s in stats)
        result.needs_ocr, result.ocr_score = has_images, 1.0 if has_images else 0.0


# --------------------------------------------------------------------- the worker process


def _write_frame(stream, obj) -> None:
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(payload)) + payload)
    stream.flush()


def _read_exact(stream, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def serve() -> None:
    """The worker's loop: requests on stdin, results on the original stdout, one at a time."""
    out = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # whatever a library prints cannot corrupt the protocol
    inp = sys.stdin.buffer
    import pypdfium2  # noqa: F401 - loaded before the first file's clock starts

    _write_frame(out, "ready")
    while True:
        header = _read_exact(inp, 8)
        if header is None:
            return
        request = pickle.loads(_read_exact(inp, struct.unpack("<Q", header)[0]) or b"")
        result = extract_in_process(request["path"], max_pages=request["max_pages"],
                                    ocr_threshold=request["ocr_threshold"])
        _write_frame(out, asdict(result))


def _result_from_dict(d: dict) -> PdfResult:
    figures = d.pop("figures", None)
    return PdfResult(**d, figures=OcrFigures(**figures) if figures is not None else None)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _file_sha256(path: Path) -> str | None:
    try:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    except OSError:
        return None


class PdfExtractor:
    """Extracts PDFs in one persistent child process, with a hard time limit per file.

    The child is started on first use and reused; a file that runs past the limit gets the child
    killed (the next file starts a new one). Not thread-safe: use one per thread.

        with PdfExtractor(time_limit_s=30) as ex:
            for path in paths:
                result = ex.extract(path)
    """

    def __init__(self, time_limit_s: float = DEFAULT_TIME_LIMIT_S, max_pages: int = DEFAULT_MAX_PAGES,
                 ocr_threshold: float = OCR_THRESHOLD):
        self.time_limit_s = time_limit_s
        self.max_pages = max_pages
        self.ocr_threshold = ocr_threshold
        self.starts = 0  # child processes started (1 + restarts after kills and crashes)
        self._proc: subprocess.Popen | None = None
        self._owner = os.getpid()  # a forked copy of this object must not talk to its parent's child

    def __enter__(self) -> PdfExtractor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> subprocess.Popen:
        """Start a child process now (else the first `extract` does); waits until it is ready."""
        root = str(Path(__file__).resolve().parent.parent)  # so the child imports this very module
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        self._owner = os.getpid()
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from dataprep.pdf import serve; serve()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, bufsize=0,
        )
        self.starts += 1
        if self._read_reply(self._proc, time.perf_counter() + STARTUP_LIMIT_S) != "ready":
            self._kill()
            raise RuntimeError("the PDF extraction process did not start (is pypdfium2 installed?)")
        return self._proc

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                stream.close()

    def close(self) -> None:
        """Stop the child (it exits when its input closes)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        proc.stdout.close()

    def extract(self, path: str | os.PathLike, time_limit_s: float | None = None,
                max_pages: int | None = None, ocr_threshold: float | None = None) -> PdfResult:
        """One PDF's result; waits at most the time limit (plus the child's start-up, if any)."""
        limit = self.time_limit_s if time_limit_s is None else time_limit_s
        if self._owner != os.getpid():  # inherited through fork: that child is the parent's
            self._proc = None
        request = {"path": str(Path(path).resolve()), "max_pages": self.max_pages if max_pages is None else max_pages,
                   "ocr_threshold": self.ocr_threshold if ocr_threshold is None else ocr_threshold}
        for attempt in (0, 1):  # a child that died since the last file is replaced once
            proc = self._proc if self._proc is not None and self._proc.poll() is None else self.start()
            try:
                _write_frame(proc.stdin, request)
                break
            except (BrokenPipeError, OSError):
                self._kill()
                if attempt:
                    return self._failed(path, "malformed", "could not start the extraction process", 0.0)
        t0 = time.perf_counter()
        reply = self._read_reply(proc, t0 + limit)
        if isinstance(reply, dict):
            result = _result_from_dict(reply)
            result.path = str(path)
            return result
        elapsed = time.perf_counter() - t0
        code = proc.poll()
        self._kill()
        if reply == "timeout":
            return self._failed(path, "timeout", f"no result within {limit:g} s; extraction process killed", elapsed)
        how = f"signal {_signal_name(-code)}" if code is not None and code < 0 else f"exit code {code}"
        return self._failed(path, "malformed", f"extraction process died ({how})", elapsed)

    def _read_reply(self, proc: subprocess.Popen, deadline: float) -> dict | str:
        """The child's reply (a result dict, or "ready"), else 'timeout' or 'died'."""
        fd = proc.stdout.fileno()
        poller = select.poll()  # not select.select: it fails on descriptors above 1023
        poller.register(fd, select.POLLIN)
        buf = bytearray()
        need = 8
        while len(buf) < need:
            remaining = deadline - time.perf_counter()
            if remaining <= 0 or not poller.poll(max(1, int(remaining * 1000) + 1)):
                return "timeout"
            chunk = os.read(fd, max(need - len(buf), 1 << 16))
            if not chunk:
                return "died"
            buf += chunk
            if need == 8 and len(buf) >= 8:
                need = 8 + struct.unpack("<Q", bytes(buf[:8]))[0]
        return pickle.loads(bytes(buf[8:need]))

    @staticmethod
    def _failed(path, drop: str, error: str, seconds: float) -> PdfResult:
        return PdfResult(path=str(path), drop=drop, error=error, extraction_seconds=seconds,
                         sha256=_file_sha256(Path(path)))


_shared: PdfExtractor | None = None
_shared_lock = threading.Lock()


def extract_pdf(path: str | os.PathLike, time_limit_s: float = DEFAULT_TIME_LIMIT_S,
                max_pages: int = DEFAULT_MAX_PAGES, ocr_threshold: float = OCR_THRESHOLD) -> PdfResult:
    """Extract one PDF in this process's shared worker (started once, reused, restarted after a kill)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            import atexit

            _shared = PdfExtractor()
            atexit.register(_shared.close)
        return _shared.extract(path, time_limit_s=time_limit_s, max_pages=max_pages, ocr_threshold=ocr_threshold)
