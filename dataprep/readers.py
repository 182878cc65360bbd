"""Reading source files into datatrove Documents, bad input included.

Every line of input becomes exactly one Document, so every input gets one decision row.
Lines that cannot be used are not raised as errors: they flow on marked with a drop reason
(`malformed`, `invalid_utf8`, `empty`, `truncated`) and no filter looks at them. A file that
breaks off (a cut .gz, a cut Arrow stream) keeps the documents read before the break and ends
with one `truncated` row whose metadata["error"] says what happened; a file that turns to
garbage ends with one `malformed` row the same way.

WARC files: every `response` record is one Document whose text is the raw HTML (the
extraction step turns it into text); other record types (warcinfo, request, metadata,
resource) are not documents. A response that is not HTML, has no body or cannot be decoded
is marked `not_html`, `empty` or `undecodable`; a record warcio cannot parse ends the file
with one `malformed` row, and a record cut short ends it with one `truncated` row.

Hugging Face datasets (kind `hf`): every file is read on its own, one row per Document:
`.arrow` files as written by `Dataset.save_to_disk` (Arrow IPC streams) and `.parquet` files.

PDF files (kind `pdf`): every file is one Document, its text layer as dataprep.pdf extracts it (in
a child process with a time limit), or a reason (`encrypted`, `truncated`, `needs_ocr`, ...).
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

DROP_KEY = "foundry_drop"  # metadata key carrying a drop reason down the pipeline
CHARS_KEY = "foundry_chars"  # characters of the text as read (filters may rewrite text)
SHARD_KEY = "foundry_shard"


def open_binary(path: Path) -> io.BufferedIOBase:
    """The file's bytes, decompressed; a compressed stream that was cut raises EOFError."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        return io.BufferedReader(_ZstdStream(path))
    return open(path, "rb")


class _ZstdStream(io.RawIOBase):
    """A .zst file decompressed frame by frame.

    zstandard's own reader can neither be iterated by line nor tell a cut file from a whole one
    (it just ends); this raises EOFError where the last frame stops early, as gzip does.
    """

    def __init__(self, path: Path):
        import zstandard

        super().__init__()
        self._file = open(path, "rb")  # noqa: SIM115 - closed with this stream
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = None  # decompressor of the current frame
        self._input = b""  # compressed bytes not yet handed to a frame
        self._output = b""
        self._pos = 0  # bytes of _output already returned

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._pos >= len(self._output):
            if not self._input:
                self._input = self._file.read(1 << 17)
                if not self._input:
                    if self._frame is not None and not self._frame.eof:
                        raise EOFError("zstd frame ends before its end marker")
                    return 0
            if self._frame is None or self._frame.eof:
                self._frame = self._dctx.decompressobj()
            self._output, self._pos = self._frame.decompress(self._input), 0
            self._input = self._frame.unused_data if self._frame.eof else b""
        n = min(len(buffer), len(self._output) - self._pos)
        buffer[:n] = self._output[self._pos : self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def iter_records(
    files: list[Path], kind: str, text_key: str, id_key: str, limit: int | None = None,
    pdf: dict | None = None,
) -> Iterator[Document]:
    """All documents of a source in a stable order, each with its drop reason (if any).

    Each file is read on its own (no state crosses files), so one file alone gives the same
    documents as it does inside the whole list. `pdf`: extraction settings for kind pdf
    (time_limit_s, max_pages, ocr_threshold; the recipe's `curation.pdf`), defaults where unset.
    """
    count = 0
    for path in files:
        for doc in _file_reader(path, kind, pdf)(path, text_key, id_key):
            if limit is not None and count >= limit:
                return
            count += 1
            yield doc


def _file_reader(path: Path, kind: str, pdf: dict | None = None) -> Callable[[Path, str, str], Iterator[Document]]:
    if kind == "jsonl":
        return _iter_jsonl
    if kind == "warc":
        return lambda p, _text_key, _id_key: _iter_warc(p)
    if kind == "pdf":
        return lambda p, _text_key, _id_key: _iter_pdf(p, pdf)
    if kind == "hf" and path.name.endswith(".arrow"):
        return _iter_arrow
    return _iter_parquet  # kind parquet, and hf's .parquet files


def _make_doc(text: str, doc_id: str, metadata: dict, drop: str | None) -> Document:
    metadata[CHARS_KEY] = len(text)
    if drop is None and not text.strip():
        drop = "empty"
    if drop is not None:
        metadata[DROP_KEY] = drop
    return Document(text=text, id=doc_id, metadata=metadata)


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:200]


def _broken_doc(path: Path, position: int, err: BaseException, drop: str, doc_id: str | None = None,
                meta: dict | None = None) -> Document:
    """The one row a file ends with when the rest of it cannot be read."""
    meta = {**(meta or {}), "file": path.name, "line": position, "error": _describe(err)}
    return _make_doc("", doc_id or f"{path.name}:{position}", meta, drop)


def _cut_or_garbage(err: BaseException) -> str:
    # EOFError is how gzip says the compressed stream stopped before its end marker.
    return "truncated" if isinstance(err, EOFError) else "malformed"


def _decompress_errors() -> tuple[type[BaseException], ...]:
    """What reading a compressed file raises when its bytes are cut or damaged."""
    errors: tuple[type[BaseException], ...] = (EOFError, OSError, zlib.error)  # gzip.BadGzipFile is an OSError
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


# --------------------------------------------------------------------- JSONL


def _iter_jsonl(path: Path, text_key: str, id_key: str) -> Iterator[Document]:
    errors = _decompress_errors()
    lineno = 0
    with open_binary(path) as f:
        lines = iter(f)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except errors as err:  # a cut or damaged .gz/.zst: the lines before it stand
                yield _broken_doc(path, lineno + 1, err, _cut_or_garbage(err))
                return
            lineno += 1
            if raw.strip():  # a blank line between records is not a document
                yield _jsonl_doc(raw, path, lineno, text_key, id_key)


def _jsonl_doc(raw: bytes, path: Path, lineno: int, text_key: str, id_key: str) -> Document:
    fallback_id = f"{path.name}:{lineno}"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        # Keep the record's id if the JSON still parses, but never train on mojibake.
        record = _try_json(raw.decode("utf-8", errors="replace"))
        doc_id = str(record.get(id_key)) if isinstance(record, dict) and record.get(id_key) else fallback_id
        return _make_doc("", doc_id, {"file": path.name, "line": lineno}, "invalid_utf8")
    record = _try_json(line)
    if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
        return _make_doc("", fallback_id, {"file": path.name, "line": lineno}, "malformed")
    return _record_to_doc(record, text_key, id_key, fallback_id, path.name, lineno)


# --------------------------------------------------------------------- Parquet and Arrow

BATCH_ROWS = 1024  # rows turned into Python objects at a time


def _iter_parquet(path: Path, text_key: str, id_key: str) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:  # cut or not Parquet at all: no footer to read
        yield _broken_doc(path, 1, err, "malformed")
        return
    _require_column(path, pf.schema_arrow.names, text_key)
    yield from _iter_rows(path, pf.iter_batches(batch_size=BATCH_ROWS), text_key, id_key, "malformed")


def _iter_arrow(path: Path, text_key: str, id_key: str) -> Iterator[Document]:
    """An .arrow file of a `save_to_disk` dataset: an Arrow IPC stream, one record batch at a time.

    Read through a plain file handle rather than a memory map: only the batch in hand is in
    memory, and resident memory stays that small on multi-GB files.
    """
    import pyarrow as pa

    with pa.OSFile(str(path), "rb") as source:
        try:
            names, batches = _open_arrow(source)
        except (pa.ArrowException, OSError) as err:
            yield _broken_doc(path, 1, err, "malformed")
            return
        _require_column(path, names, text_key)
        # A stream has no footer: one that breaks off mid-batch was cut.
        yield from _iter_rows(path, _sliced(batches), text_key, id_key, "truncated")


def _open_arrow(source) -> tuple[list[str], Iterator]:
    """Column names and record batches of an Arrow IPC stream (or IPC file)."""
    import pyarrow as pa

    try:
        stream = pa.ipc.open_stream(source)  # what `datasets` writes
        return stream.schema.names, iter(stream)
    except pa.ArrowInvalid:
        source.seek(0)
        archive = pa.ipc.open_file(source)  # the random-access IPC format, written by other tools
        return archive.schema.names, (archive.get_batch(i) for i in range(archive.num_record_batches))


def _sliced(batches: Iterator) -> Iterator:
    # datasets writes 1000-row batches by default, but any size is allowed.
    for batch in batches:
        for start in range(0, batch.num_rows, BATCH_ROWS):
            yield batch.slice(start, BATCH_ROWS)


def _require_column(path: Path, names: list[str], text_key: str) -> None:
    # A missing text column is a recipe mistake, not bad input: fail loudly.
    if text_key not in names:
        raise ValueError(f"{path}: no column '{text_key}' (columns: {names})")


def _iter_rows(path: Path, batches: Iterator, text_key: str, id_key: str, broken: str) -> Iterator[Document]:
    """One Document per row; a batch that cannot be read ends the file with one `broken` row."""
    import pyarrow as pa

    row = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as err:
            yield _broken_doc(path, row + 1, err, broken)
            return
        for record in batch.to_pylist():
            row += 1
            fallback_id = f"{path.name}:{row}"
            if not isinstance(record.get(text_key), str):
                yield _make_doc("", fallback_id, {"file": path.name, "line": row}, "malformed")
                continue
            yield _record_to_doc(record, text_key, id_key, fallback_id, path.name, row)


# --------------------------------------------------------------------- WARC

HTML_TYPES = ("text/html", "application/xhtml+xml")


class _BufferedRecord:
    """A WARC record whose payload was already read, so it can be handed to datatrove.

    Where the WARC names no payload type, the server's Content-Type stands in for it: datatrove
    would otherwise ask libmagic, which takes HTML pages that start with a script or a comment
    for `application/javascript` (2 of the 37 sample pages).
    """

    def __init__(self, record, body: bytes):
        from warcio.statusandheaders import StatusAndHeaders

        self.rec_type = record.rec_type
        self.rec_headers = record.rec_headers
        self._body = body
        declared = _http_content_type(record)
        if not record.rec_headers.get("WARC-Identified-Payload-Type") and declared:
            h = record.rec_headers
            self.rec_headers = StatusAndHeaders(
                h.statusline, list(h.headers) + [("WARC-Identified-Payload-Type", declared)], protocol=h.protocol
            )

    def content_stream(self) -> io.BytesIO:
        return io.BytesIO(self._body)


def _http_content_type(record) -> str | None:
    if record.http_headers is None:
        return None
    value = record.http_headers.get_header("Content-Type") or ""
    return value.split(";")[0].strip().lower() or None


def _payload_type(record, body: bytes) -> str:
    """The payload's MIME type as the reader decides it (WARC header, HTTP header, else libmagic)."""
    declared = record.rec_headers.get("WARC-Identified-Payload-Type") or _http_content_type(record)
    if declared:
        return declared
    import magic

    return magic.from_buffer(body, mime=True)


class _WarcStream(io.RawIOBase):
    """The bytes of a WARC for warcio, with the gzip layer decompressed here and watched.

    warcio's own gzip handling ends quietly where a member is cut (a short body, or no more
    records), so a truncated file would read like a shorter intact one. Python's gzip raises
    instead; the error is kept in `error` and warcio sees an end of file.
    """

    def __init__(self, raw: io.BufferedIOBase):
        super().__init__()
        self._raw = raw  # the file as `open_binary` gives it: .gz already undone
        self.error: BaseException | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.error is not None:
            return 0
        try:
            # read1: one read underneath, so bytes decompressed before an error are never lost
            data = self._raw.read1(len(buffer))
        except (EOFError, OSError, zlib.error) as err:  # cut member, garbage between members
            self.error = err
            return 0
        buffer[: len(data)] = data
        return len(data)


def _iter_warc(path: Path) -> Iterator[Document]:
    from warcio.archiveiterator import ArchiveIterator

    index = 0
    with open_binary(path) as raw:
        stream = _WarcStream(raw)
        records = iter(ArchiveIterator(stream))
        while True:
            try:
                record = next(records)
            except StopIteration:
                break
            except Exception as err:  # noqa: BLE001 - warcio raises many kinds; the rest is unreadable
                err = stream.error or err
                yield _broken_doc(path, index + 1, err, _cut_or_garbage(err))
                return
            if record.rec_type != "response":
                continue
            index += 1
            doc_id, meta = _warc_identity(record, path, index)
            try:
                body = record.content_stream().read()
                missing = _missing_bytes(record)
            except Exception as err:  # noqa: BLE001 - e.g. broken chunked encoding, or a cut in it
                err = stream.error or err
                yield _broken_doc(path, index, err, _cut_or_garbage(err), doc_id, meta)
                return
            if missing:
                # A partial page must not pass for a whole one.
                err = stream.error or EOFError(f"record ends {missing} bytes before its Content-Length")
                yield _broken_doc(path, index, err, "truncated", doc_id, meta)
                return
            yield _warc_doc(record, body, doc_id, meta)
    if stream.error is not None:  # cut between or inside non-response records
        yield _broken_doc(path, index + 1, stream.error, _cut_or_garbage(stream.error))


def _warc_identity(record, path: Path, index: int) -> tuple[str, dict]:
    headers = record.rec_headers
    meta = {"url": headers.get("WARC-Target-URI"), "date": headers.get("WARC-Date"), "file": path.name, "line": index}
    doc_id = headers.get("WARC-Record-ID") or f"{path.name}:{index}"
    return doc_id, {k: v for k, v in meta.items() if v is not None}


def _missing_bytes(record) -> int:
    """Bytes of the record's block (per its Content-Length) that the file did not hold."""
    from warcio.limitreader import LimitReader

    raw = record.raw_stream
    if not isinstance(raw, LimitReader):
        return 0  # no Content-Length: nothing to compare with (and draining would read on)
    while raw.read(1 << 16):  # what the payload reader left, e.g. after a compressed body
        pass
    return raw.limit


def _warc_doc(record, body: bytes, doc_id: str, meta: dict) -> Document:
    from datatrove.pipeline.readers.warc import process_record

    if not body.strip():
        return _make_doc("", doc_id, meta, "empty")
    extracted = process_record(_BufferedRecord(record, body))  # datatrove's own decision
    if extracted is None:
        drop = "not_html" if _payload_type(record, body) not in HTML_TYPES else "undecodable"
        return _make_doc("", doc_id, meta, drop)
    return _make_doc(extracted["text"], doc_id, meta, None)


# --------------------------------------------------------------------- PDF


PDF_OPTIONS = ("time_limit_s", "max_pages", "ocr_threshold")


def _iter_pdf(path: Path, options: dict | None = None) -> Iterator[Document]:
    """One Document per PDF file: its text layer, pages joined by a blank line (dataprep.pdf).

    The id is the file's SHA-256 (the same PDF twice is one document). A PDF that cannot be used
    carries dataprep.pdf's reason; one whose text layer should be replaced by OCR is dropped as
    `needs_ocr` (metadata needs_ocr / ocr_score say so for the OCR queue, its text is kept).
    Metadata keeps pages, chars, extraction_seconds, producer, encrypted, sha256 and
    page_offsets (where each page starts in the text).
    """
    from dataprep.pdf import extract_pdf

    unknown = set(options or {}) - set(PDF_OPTIONS)
    if unknown:
        raise ValueError(f"unknown PDF extraction option(s) {sorted(unknown)}; known: {list(PDF_OPTIONS)}")
    result = extract_pdf(path, **(options or {}))
    drop = result.drop or ("needs_ocr" if result.needs_ocr else None)
    yield _make_doc(result.text, result.sha256 or path.name, result.metadata(), drop)


# --------------------------------------------------------------------- records


def _record_to_doc(record: dict, text_key: str, id_key: str, fallback_id: str, fname: str, lineno: int) -> Document:
    text = record.pop(text_key)
    doc_id = record.pop(id_key, None)
    # Dolma and datatrove outputs nest url, date, ... under "metadata"; top-level keys win.
    nested = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
    metadata = {k: v for k, v in nested.items() if isinstance(v, (str, int, float, bool))}
    metadata.update({k: v for k, v in record.items() if isinstance(v, (str, int, float, bool))})
    metadata.update(file=fname, line=lineno)
    return _make_doc(text, str(doc_id) if doc_id not in (None, "") else fallback_id, metadata, None)


def _try_json(line: str):
    try:
        return json.loads(line)
    except ValueError:
        return None


class SourceReader(PipelineStep):
    """datatrove reader step: documents are dealt round-robin to ranks (one rank per shard).

    Sharding by document rather than by file lets a single large file use every worker,
    and makes the output depend on the shard count (part of the spec), never on workers.

    With `shards_per_file`, each file is curated as if alone: rank r reads only file
    r // shards_per_file and takes its shard r % shards_per_file, so one datatrove run (one
    process pool) produces exactly what separate runs per file would.
    """

    name = "📖 Foundry source reader"
    type = "📖 - READER"

    def __init__(self, files: list[str], kind: str, text_key: str, id_key: str, limit: int | None,
                 shards_per_file: int | None = None, pdf: dict | None = None):
        super().__init__()
        self.pdf = pdf  # kind pdf: extraction settings (the recipe's curation.pdf)
        self.files = [Path(f) for f in files]
        self.kind = kind
        self.text_key = text_key
        self.id_key = id_key
        self.limit = limit
        self.shards_per_file = shards_per_file

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        files, shard, shards = self.files, rank, world_size
        if self.shards_per_file is not None:
            index, shard = divmod(rank, self.shards_per_file)
            files, shards = [self.files[index]], self.shards_per_file
        for i, doc in enumerate(iter_records(files, self.kind, self.text_key, self.id_key, self.limit, self.pdf)):
            if i % shards != shard:
                continue
            doc.metadata[SHARD_KEY] = shard
            self.stat_update("documents")
            if DROP_KEY in doc.metadata:
                self.stat_update(f"dropped_{doc.metadata[DROP_KEY]}")
            yield doc
