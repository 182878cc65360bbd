"""Reading source files into datatrove Documents, bad input included.

Every line of input becomes exactly one Document, so every input gets one decision row.
Lines that cannot be used are not raised as errors: they flow on marked with a drop reason
(`malformed`, `invalid_utf8`, `empty`) and no filter looks at them.

WARC files: every `response` record is one Document whose text is the raw HTML (the
extraction step turns it into text); other record types (warcinfo, request, metadata,
resource) are not documents. A response that is not HTML, has no body or cannot be decoded
is marked `not_html`, `empty` or `undecodable`; a record warcio cannot parse ends the file
with one `malformed` row.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Iterator

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

DROP_KEY = "foundry_drop"  # metadata key carrying a drop reason down the pipeline
CHARS_KEY = "foundry_chars"  # characters of the text as read (filters may rewrite text)
SHARD_KEY = "foundry_shard"


def open_binary(path: Path) -> io.BufferedIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        import zstandard

        return zstandard.open(path, "rb")
    return open(path, "rb")


def iter_records(
    files: list[Path], kind: str, text_key: str, id_key: str, limit: int | None = None
) -> Iterator[Document]:
    """All documents of a source in a stable order, each with its drop reason (if any)."""
    count = 0
    for path in files:
        if kind == "jsonl":
            records = _iter_jsonl(path, text_key, id_key)
        elif kind == "warc":
            records = _iter_warc(path)
        else:
            records = _iter_parquet(path, text_key, id_key)
        for doc in records:
            if limit is not None and count >= limit:
                return
            count += 1
            yield doc


def _make_doc(text: str, doc_id: str, metadata: dict, drop: str | None) -> Document:
    metadata[CHARS_KEY] = len(text)
    if drop is None and not text.strip():
        drop = "empty"
    if drop is not None:
        metadata[DROP_KEY] = drop
    return Document(text=text, id=doc_id, metadata=metadata)


def _iter_jsonl(path: Path, text_key: str, id_key: str) -> Iterator[Document]:
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            fallback_id = f"{path.name}:{lineno}"
            if not raw.strip():
                continue  # blank line between records: not a document
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                # Keep the record's id if the JSON still parses, but never train on mojibake.
                record = _try_json(raw.decode("utf-8", errors="replace"))
                doc_id = str(record.get(id_key)) if isinstance(record, dict) and record.get(id_key) else fallback_id
                yield _make_doc("", doc_id, {"file": path.name, "line": lineno}, "invalid_utf8")
                continue
            record = _try_json(line)
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                yield _make_doc("", fallback_id, {"file": path.name, "line": lineno}, "malformed")
                continue
            yield _record_to_doc(record, text_key, id_key, fallback_id, path.name, lineno)


def _iter_parquet(path: Path, text_key: str, id_key: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_key not in pf.schema_arrow.names:
        raise ValueError(f"{path}: no column '{text_key}' (columns: {pf.schema_arrow.names})")
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            fallback_id = f"{path.name}:{row}"
            if not isinstance(record.get(text_key), str):
                yield _make_doc("", fallback_id, {"file": path.name, "line": row}, "malformed")
                continue
            yield _record_to_doc(record, text_key, id_key, fallback_id, path.name, row)


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


def _iter_warc(path: Path) -> Iterator[Document]:
    from datatrove.pipeline.readers.warc import process_record
    from warcio.archiveiterator import ArchiveIterator

    index = 0
    with open(path, "rb") as f:
        records = iter(ArchiveIterator(f))
        while True:
            try:
                record = next(records)
                if record.rec_type != "response":
                    continue
                index += 1
                headers = record.rec_headers
                meta = {"url": headers.get("WARC-Target-URI"), "date": headers.get("WARC-Date"),
                        "file": path.name, "line": index}
                doc_id = headers.get("WARC-Record-ID") or f"{path.name}:{index}"
                body = record.content_stream().read()
            except StopIteration:
                return
            except Exception as err:  # truncated gzip, broken headers: the rest of the file is unreadable
                meta = {"file": path.name, "line": index + 1, "error": f"{type(err).__name__}: {err}"[:200]}
                yield _make_doc("", f"{path.name}:{index + 1}", meta, "malformed")
                return
            meta = {k: v for k, v in meta.items() if v is not None}
            if not body.strip():
                yield _make_doc("", doc_id, meta, "empty")
                continue
            extracted = process_record(_BufferedRecord(record, body))  # datatrove's own decision
            if extracted is None:
                drop = "not_html" if _payload_type(record, body) not in HTML_TYPES else "undecodable"
                yield _make_doc("", doc_id, meta, drop)
                continue
            yield _make_doc(extracted["text"], doc_id, meta, None)


def _record_to_doc(record: dict, text_key: str, id_key: str, fallback_id: str, fname: str, lineno: int) -> Document:
    text = record.pop(text_key)
    doc_id = record.pop(id_key, None)
    metadata = {k: v for k, v in record.items() if isinstance(v, (str, int, float, bool))}
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
    """

    name = "📖 Foundry source reader"
    type = "📖 - READER"

    def __init__(self, files: list[str], kind: str, text_key: str, id_key: str, limit: int | None):
        super().__init__()
        self.files = [Path(f) for f in files]
        self.kind = kind
        self.text_key = text_key
        self.id_key = id_key
        self.limit = limit

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        for i, doc in enumerate(iter_records(self.files, self.kind, self.text_key, self.id_key, self.limit)):
            if i % world_size != rank:
                continue
            doc.metadata[SHARD_KEY] = rank
            self.stat_update("documents")
            if DROP_KEY in doc.metadata:
                self.stat_update(f"dropped_{doc.metadata[DROP_KEY]}")
            yield doc
