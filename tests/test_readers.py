"""Reading bad input into marked Documents, and the curation pipeline's decision rows."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datatrove.data import Document
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from datatrove.pipeline.filters.base_filter import get_filter_result

from assets.recipe import CurationSpec, RecipeError, SourceSpec, source_files
from assets.settings import data_root
from dataprep.curate import run_curation
from dataprep.readers import CHARS_KEY, DROP_KEY, iter_records

FINEWEB = "web/fineweb_sample/fineweb_legal_dedup.jsonl.gz"
# 10 distinct words: passes GopherRepetition (no n-gram dominates), too short for GopherQuality
SHORT_TEXT = "We saw it all with extraordinarily thorough constitutional parliamentary accountability."


def read(path: Path, kind: str = "jsonl", limit: int | None = None, **kw) -> list[Document]:
    return list(iter_records([path] if isinstance(path, Path) else path, kind, kw.get("text_key", "text"),
                             kw.get("id_key", "id"), limit))


def summary(docs: list[Document]) -> list[tuple[str, str | None, str]]:
    return [(d.id, d.metadata.get(DROP_KEY), d.text) for d in docs]


def jl(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


# --------------------------------------------------------------------- iter_records


def test_malformed_json_line(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(jl({"id": "ok", "text": "fine"}) + b'{"id": "x", "text": "unterminated\n' + jl({"id": "ok2", "text": "t"}))
    docs = read(p)
    assert summary(docs) == [("ok", None, "fine"), ("a.jsonl:2", "malformed", ""), ("ok2", None, "t")]
    assert docs[1].metadata == {"file": "a.jsonl", "line": 2, CHARS_KEY: 0, DROP_KEY: "malformed"}


def test_invalid_utf8(tmp_path):
    p = tmp_path / "u.jsonl"
    p.write_bytes(
        b'{"id": "latin1", "text": "caf\xe9"}\n'  # parses once decoded with replacement: keeps its id
        b'{"id": "z", "text": "\xff\xfe\n'  # invalid bytes and broken JSON: position id
        + jl({"id": "good", "text": "caf\u00e9"})
    )
    docs = read(p)
    assert summary(docs) == [("latin1", "invalid_utf8", ""), ("u.jsonl:2", "invalid_utf8", ""), ("good", None, "café")]


@pytest.mark.parametrize("text", ["", " ", "\n\t  \r\n", "\u00a0\u2003"])
def test_empty_and_whitespace_text(tmp_path, text):
    p = tmp_path / "e.jsonl"
    p.write_bytes(jl({"id": "e1", "text": text}))
    [doc] = read(p)
    assert (doc.id, doc.metadata[DROP_KEY], doc.metadata[CHARS_KEY]) == ("e1", "empty", len(text))


def test_missing_or_non_string_text_and_non_object_lines(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_bytes(
        jl({"id": "a", "body": "no text key"})
        + jl({"id": "b", "text": 42})
        + jl({"id": "c", "text": None})
        + jl(["text", "list"])
        + jl("just a string")
        + b"null\n"
    )
    docs = read(p)
    assert summary(docs) == [(f"m.jsonl:{i}", "malformed", "") for i in range(1, 7)]


def test_blank_lines_skipped_but_counted_in_line_numbers(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_bytes(b"\n" + jl({"text": "one"}) + b"   \n\t\n\r\n" + jl({"text": "two"}) + b"\n\n")
    docs = read(p)
    assert summary(docs) == [("b.jsonl:2", None, "one"), ("b.jsonl:6", None, "two")]
    assert [d.metadata["line"] for d in docs] == [2, 6]


def test_ids_and_metadata(tmp_path):
    p = tmp_path / "i.jsonl"
    p.write_bytes(
        jl({"doc": "d1", "body": "x", "url": "http://a", "score": 3, "nested": {"k": 1}, "flag": True})
        + jl({"doc": "", "body": "y"})
        + jl({"doc": 7, "body": "z"})
    )
    docs = read(p, text_key="body", id_key="doc")
    assert [d.id for d in docs] == ["d1", "i.jsonl:2", "7"]
    assert docs[0].metadata == {"url": "http://a", "score": 3, "flag": True, "file": "i.jsonl", "line": 1,
                                CHARS_KEY: 1}


def test_jsonl_gz(tmp_path):
    p = tmp_path / "g.jsonl.gz"
    with gzip.open(p, "wb") as f:
        f.write(jl({"id": "g1", "text": "alpha"}) + b"{broken\n" + b"\n" + jl({"id": "g3", "text": "  "}))
    assert summary(read(p)) == [("g1", None, "alpha"), ("g.jsonl.gz:2", "malformed", ""), ("g3", "empty", "  ")]


def test_parquet(tmp_path):
    p = tmp_path / "t.parquet"
    table = pa.table({
        "id": ["p1", None, "p3", "p4"],
        "text": ["hello world", "no id", None, " "],
        "lang": ["en", "en", "fr", "de"],
    })
    pq.write_table(table, p, row_group_size=2)
    docs = read(p, kind="parquet")
    assert summary(docs) == [("p1", None, "hello world"), ("t.parquet:2", None, "no id"),
                             ("t.parquet:3", "malformed", ""), ("p4", "empty", " ")]
    assert docs[0].metadata == {"lang": "en", "file": "t.parquet", "line": 1, CHARS_KEY: 11}

    bad = tmp_path / "nocol.parquet"
    pq.write_table(pa.table({"body": ["x"]}), bad)
    with pytest.raises(ValueError, match="no column 'text'"):
        read(bad, kind="parquet")


def test_limit_counts_across_files(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_bytes(jl({"id": "a1", "text": "x"}) + b"\n" + b"{bad\n" + jl({"id": "a3", "text": "x"}))
    b.write_bytes(jl({"id": "b1", "text": "x"}) + jl({"id": "b2", "text": "x"}))
    assert [d.id for d in read([a, b], limit=4)] == ["a1", "a.jsonl:3", "a3", "b1"]  # bad lines count
    assert [d.id for d in read([a, b], limit=2)] == ["a1", "a.jsonl:3"]
    assert [d.id for d in read([a, b], limit=None)] == ["a1", "a.jsonl:3", "a3", "b1", "b2"]
    assert [d.id for d in read([b, a], limit=3)] == ["b1", "b2", "a1"]


# --------------------------------------------------------------------- files that break off or turn to garbage

WARC_DIR = data_root() / "web" / "warc"


def drops(docs: list[Document]) -> list[str | None]:
    return [d.metadata.get(DROP_KEY) for d in docs]


def fineweb_lines(n: int) -> list[bytes]:
    lines = []
    with gzip.open(data_root() / FINEWEB, "rb") as f:
        for line in f:
            lines.append(line)
            if len(lines) == n:
                return lines
    return lines


@pytest.mark.parametrize("keep", [0.004, 0.5, 0.999])
def test_truncated_jsonl_gz_keeps_complete_lines(tmp_path, keep):
    lines = fineweb_lines(200)
    blob = gzip.compress(b"".join(lines))
    p = tmp_path / "cut.jsonl.gz"
    p.write_bytes(blob[: int(len(blob) * keep)])
    docs = read(p)
    *complete, cut = docs
    assert drops(complete) == [None] * len(complete)
    assert [(d.id, d.text) for d in complete] == [(r["id"], r["text"]) for r in map(json.loads, lines[: len(complete)])]
    assert (cut.id, cut.text, cut.metadata[DROP_KEY]) == (f"cut.jsonl.gz:{len(complete) + 1}", "", "truncated")
    assert cut.metadata["error"].startswith("EOFError: ")
    assert cut.metadata["line"] == len(complete) + 1
    assert len(complete) < 200 and (keep < 0.5 or len(complete) > 90)


def test_truncated_jsonl_gz_is_counted_by_curation(tmp_path):
    blob = gzip.compress(b"".join(fineweb_lines(40)))
    p = tmp_path / "cut.jsonl.gz"
    p.write_bytes(blob[: len(blob) // 2])
    n_complete = len(read(p)) - 1
    counts = run_curation(files=[p], kind="jsonl", text_key="text", id_key="id", limit=None, shards=1,
                          curation={"gopher_repetition": None, "gopher_quality": None, "c4_quality": None,
                                    "fineweb_quality": None}, out_dir=tmp_path / "cur", workers=1)
    assert counts["documents"] == n_complete + 1
    assert counts["reasons"] == {"truncated": 1}
    rows = pq.read_table(tmp_path / "cur" / "decisions.parquet").to_pylist()
    assert [(r["reason"], r["step"]) for r in rows if not r["kept"]] == [("truncated", "reader")]


def test_truncated_jsonl_zst(tmp_path):
    import zstandard

    lines = fineweb_lines(60)
    cctx = zstandard.ZstdCompressor()
    blob = cctx.compress(b"".join(lines[:30])) + cctx.compress(b"".join(lines[30:]))  # two frames
    whole, cut = tmp_path / "whole.jsonl.zst", tmp_path / "cut.jsonl.zst"
    whole.write_bytes(blob)
    cut.write_bytes(blob[: len(blob) * 3 // 4])  # inside the second frame
    assert [d.id for d in read(whole)] == [json.loads(line)["id"] for line in lines]
    docs = read(cut)
    assert drops(docs) == [None] * (len(docs) - 1) + ["truncated"]
    assert 30 <= len(docs) - 1 < 60


def warc_members(path: Path) -> list[tuple[int, int, str]]:
    """(offset, length, record type) of each gzip member of a .warc.gz."""
    from warcio.archiveiterator import ArchiveIterator

    with open(path, "rb") as f:
        it = ArchiveIterator(f)
        return [(it.get_record_offset(), it.get_record_length(), rec.rec_type) for rec in it]


def test_warc_sample_has_no_truncated_or_malformed_rows():
    docs = read(sorted(WARC_DIR.glob("*.warc.gz")), kind="warc")
    assert len(docs) == 37
    assert drops(docs) == [None] * 37


@pytest.mark.parametrize("where", ["response_body", "request_headers", "gzip_trailer"])
def test_truncated_warc_gz(tmp_path, where):
    sample = WARC_DIR / "sample-0000.warc.gz"
    data = sample.read_bytes()
    members = warc_members(sample)
    whole = read(sample, kind="warc")
    k = [i for i, m in enumerate(members) if m[2] == "response"][5]  # the sixth response
    offset, length, _ = members[k]
    cut = {"response_body": offset + length // 2, "request_headers": members[k + 1][0] + 40,
           "gzip_trailer": offset + length - 3}[where]
    p = tmp_path / "cut.warc.gz"
    p.write_bytes(data[:cut])
    docs = read(p, kind="warc")
    *complete, last = docs
    kept = 5 if where == "response_body" else 6  # the sixth response is whole unless its body was cut
    assert [(d.id, d.text, drops([d])) for d in complete] == [(d.id, d.text, [None]) for d in whole[:kept]]
    assert (last.text, last.metadata[DROP_KEY]) == ("", "truncated")
    if where == "response_body":  # the cut page is named, and not passed on as a shorter page
        assert (last.id, last.metadata["url"]) == (whole[5].id, whole[5].metadata["url"])
        assert last.metadata["line"] == 6
    else:
        assert (last.id, last.metadata["line"]) == ("cut.warc.gz:7", 7)
    assert last.metadata["error"].startswith("EOFError: ")


def test_truncated_plain_warc(tmp_path):
    plain = gzip.decompress((WARC_DIR / "sample-0001.warc.gz").read_bytes())
    p = tmp_path / "cut.warc"
    p.write_bytes(plain[: len(plain) // 2])
    whole = read(WARC_DIR / "sample-0001.warc.gz", kind="warc")
    *complete, last = read(p, kind="warc")
    assert [d.id for d in complete] == [d.id for d in whole[: len(complete)]]
    assert drops(complete) == [None] * len(complete)
    assert (last.id, last.metadata[DROP_KEY]) == (whole[len(complete)].id, "truncated")
    assert "before its Content-Length" in last.metadata["error"]


@pytest.mark.parametrize("junk", ["raw_bytes", "gzip_member", "plain_warc"])
def test_warc_garbage_between_records(tmp_path, junk):
    sample = WARC_DIR / "sample-0000.warc.gz"
    data = sample.read_bytes()
    members = warc_members(sample)
    k = [i for i, m in enumerate(members) if m[2] == "request"][4]  # before the fifth response
    whole = read(sample, kind="warc")
    if junk == "plain_warc":
        p = tmp_path / "junk.warc"
        head = gzip.decompress(data[: members[k][0]])
        p.write_bytes(head + b"garbage line\r\nmore garbage\r\n\r\n" + gzip.decompress(data[members[k][0]:]))
    else:
        garbage = b"not a gzip member at all" if junk == "raw_bytes" else gzip.compress(b"not a WARC record\r\n\r\n")
        p = tmp_path / "junk.warc.gz"
        p.write_bytes(data[: members[k][0]] + garbage + data[members[k][0]:])
    docs = read(p, kind="warc")
    assert [(d.id, d.text) for d in docs[:4]] == [(d.id, d.text) for d in whole[:4]]
    assert drops(docs) == [None] * 4 + ["malformed"]  # and the file stops there
    assert docs[4].id == f"{p.name}:5"
    assert docs[4].metadata["error"]


def test_ten_megabyte_document_passes_the_reader(tmp_path):
    lines = fineweb_lines(3)
    first = json.loads(lines[0])
    big_text = (first["text"] + "\n") * (10_000_000 // len(first["text"]) + 1)
    big = {"id": "big", "text": big_text, "url": first["url"]}
    for name, opener in [("big.jsonl", open), ("big.jsonl.gz", gzip.open)]:
        p = tmp_path / name
        with opener(p, "wb") as f:
            f.write(lines[0] + jl(big) + lines[1] + lines[2])
        docs = read(p)
        assert [d.id for d in docs] == [first["id"], "big"] + [json.loads(line)["id"] for line in lines[1:]]
        assert drops(docs) == [None] * 4
        assert docs[1].text == big_text and len(big_text) > 10_000_000
        assert docs[1].metadata[CHARS_KEY] == len(big_text)
        assert docs[2].text == json.loads(lines[1])["text"]


def test_binary_junk_in_jsonl_fields(tmp_path):
    docs = [json.loads(line) for line in fineweb_lines(4)]
    junk = b"\xff\xfe\x80\xc3(binary)"
    in_url = json.dumps(docs[0]).encode().replace(b'"url": "', b'"url": "' + junk)
    in_text = json.dumps(docs[1]).encode().replace(b'"text": "', b'"text": "' + junk)
    breaks_json = b'{"id": "' + junk + b'", "text": "' + junk + b'\n'
    p = tmp_path / "junk.jsonl"
    p.write_bytes(in_url + b"\n" + in_text + b"\n" + breaks_json + jl(docs[2]) + jl(docs[3]))
    out = read(p)
    assert [(d.id, d.metadata.get(DROP_KEY), d.text) for d in out] == [
        (docs[0]["id"], "invalid_utf8", ""),  # junk outside the text still drops the record
        (docs[1]["id"], "invalid_utf8", ""),
        ("junk.jsonl:3", "invalid_utf8", ""),
        (docs[2]["id"], None, docs[2]["text"]),
        (docs[3]["id"], None, docs[3]["text"]),
    ]


# --------------------------------------------------------------------- kind hf (Hugging Face datasets)


def fineweb_columns(n: int) -> dict[str, list]:
    rows = [json.loads(line) for line in fineweb_lines(n)]
    return {key: [r[key] for r in rows] for key in ("id", "text", "url", "legal_score")}


def save_dataset(path: Path, columns: dict[str, list], num_shards: int) -> Path:
    import datasets

    datasets.Dataset.from_dict(columns).save_to_disk(str(path), num_shards=num_shards)
    return path


def test_hf_save_to_disk_each_file_reads_alone(tmp_path):
    cols = fineweb_columns(300)
    cols["text"][150] = None  # a row without text: one malformed row, the rest unaffected
    folder = save_dataset(tmp_path / "ds", cols, num_shards=3)
    (folder / "cache-0123abcd.arrow").write_bytes((folder / "data-00000-of-00003.arrow").read_bytes())

    files = source_files(SourceSpec(kind="hf", path=str(folder)))
    assert [f.name for f in files] == [f"data-0000{i}-of-00003.arrow" for i in range(3)]  # no cache, no json
    docs = read(files, kind="hf")
    assert len(docs) == 300
    assert [d.id for d in docs if DROP_KEY not in d.metadata] == cols["id"][:150] + cols["id"][151:]
    assert (docs[150].id, docs[150].metadata[DROP_KEY]) == ("data-00001-of-00003.arrow:51", "malformed")
    assert [d.text for d in docs[:150]] == cols["text"][:150]
    assert docs[0].metadata == {"url": cols["url"][0], "legal_score": cols["legal_score"][0],
                                "file": "data-00000-of-00003.arrow", "line": 1, CHARS_KEY: len(cols["text"][0])}
    # the pipeline reads one file per partition: each file alone gives its own rows, in order
    start = 0
    for f in files:
        alone = read(f, kind="hf")
        assert summary(alone) == summary(docs[start : start + len(alone)])
        start += len(alone)
    assert [d.id for d in read(files, kind="hf", limit=120)] == cols["id"][:120]


def test_hf_dataset_dict_split_is_a_subfolder(tmp_path):
    import datasets

    cols = fineweb_columns(30)
    half = {k: v[:20] for k, v in cols.items()}, {k: v[20:] for k, v in cols.items()}
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict(half[0]),
                                   "test": datasets.Dataset.from_dict(half[1])})
    splits.save_to_disk(str(tmp_path / "dd"))
    files = source_files(SourceSpec(kind="hf", path="dd", name="train"), data_root=tmp_path)
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["dd/train/data-00000-of-00001.arrow"]
    assert [d.id for d in read(files, kind="hf")] == half[0]["id"]
    assert len(source_files(SourceSpec(kind="hf", path="dd"), data_root=tmp_path)) == 2


def test_hf_arrow_stream_and_file_formats(tmp_path):
    cols = fineweb_columns(300)
    table = pa.table({"id": cols["id"] * 9, "text": cols["text"] * 9})  # 2,700 rows in one record batch
    stream, archive = tmp_path / "stream.arrow", tmp_path / "file.arrow"
    with pa.OSFile(str(stream), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=len(table))
    with pa.OSFile(str(archive), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=1000)
    for path in (stream, archive):
        docs = read(path, kind="hf")
        assert [d.id for d in docs] == table["id"].to_pylist()
        assert [d.metadata["line"] for d in docs] == list(range(1, 2701))


def test_hf_arrow_truncated_and_not_arrow(tmp_path):
    cols = fineweb_columns(300)
    folder = save_dataset(tmp_path / "ds", cols, num_shards=1)
    data = (folder / "data-00000-of-00001.arrow").read_bytes()  # datasets writes 1,000-row batches
    cut = tmp_path / "cut.arrow"
    table = pa.table({"id": cols["id"] * 4, "text": cols["text"] * 4})
    with pa.OSFile(str(cut), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=500)
    cut.write_bytes(cut.read_bytes()[: int(cut.stat().st_size * 0.6)])
    *complete, last = read(cut, kind="hf")
    assert [d.id for d in complete] == table["id"].to_pylist()[: len(complete)]
    assert len(complete) % 500 == 0 and 0 < len(complete) < 1200  # whole batches before the cut
    assert (last.id, last.metadata[DROP_KEY]) == (f"cut.arrow:{len(complete) + 1}", "truncated")
    assert last.metadata["error"]

    junk = tmp_path / "junk.arrow"
    junk.write_bytes(b"not arrow at all" + data[100:200])
    [doc] = read(junk, kind="hf")
    assert (doc.id, doc.metadata[DROP_KEY]) == ("junk.arrow:1", "malformed")

    with pytest.raises(ValueError, match="no column 'body'"):
        read(folder / "data-00000-of-00001.arrow", kind="hf", text_key="body")


def test_hf_parquet_folder_like_a_hub_snapshot(tmp_path):
    cols = fineweb_columns(90)
    snap = tmp_path / "fineweb"
    for i, sub in enumerate(["sample/10BT", "sample/10BT", "sample/100BT"]):
        (snap / sub).mkdir(parents=True, exist_ok=True)
        part = {k: v[i * 30 : (i + 1) * 30] for k, v in cols.items()}
        pq.write_table(pa.table(part), snap / sub / f"{i:03d}_00000.parquet", row_group_size=8)
    (snap / "README.md").write_text("---\nconfigs: []\n---\n")

    files = source_files(SourceSpec(kind="hf", path="fineweb", name="sample/10BT"), data_root=tmp_path)
    assert [f.relative_to(snap).as_posix() for f in files] == ["sample/10BT/000_00000.parquet",
                                                               "sample/10BT/001_00000.parquet"]
    docs = read(files, kind="hf")
    assert [d.id for d in docs] == cols["id"][:60]
    assert drops(docs) == [None] * 60
    assert docs[30].metadata["file"] == "001_00000.parquet"
    assert len(source_files(SourceSpec(kind="hf", path=str(snap)))) == 3

    broken = tmp_path / "broken.parquet"
    broken.write_bytes(files[0].read_bytes()[:-100])
    [doc] = read(broken, kind="hf")
    assert doc.metadata[DROP_KEY] == "malformed"


def test_hf_local_paths_errors(tmp_path):
    folder = save_dataset(tmp_path / "ds", fineweb_columns(5), num_shards=1)
    with pytest.raises(RecipeError, match="'revision' applies to Hub dataset ids"):
        source_files(SourceSpec(kind="hf", path=str(folder), revision="main"))
    with pytest.raises(RecipeError, match=r"path does not exist: .*ds/train \(folder 'train' of"):
        source_files(SourceSpec(kind="hf", path=str(folder), name="train"))
    with pytest.raises(RecipeError, match="path does not exist"):
        source_files(SourceSpec(kind="hf", path=str(tmp_path / "absent" / "ds")))  # absolute: never a Hub id


def hub_cache(monkeypatch, root: Path) -> Path:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return root


def test_hf_hub_id_not_in_cache(tmp_path, monkeypatch):
    cache = hub_cache(monkeypatch, tmp_path / "hub")
    with pytest.raises(RecipeError) as info:
        source_files(SourceSpec(kind="hf", path="HuggingFaceFW/fineweb", name="sample/10BT"), data_root=tmp_path)
    assert str(info.value) == (
        f"Hugging Face dataset HuggingFaceFW/fineweb is not in the local HF cache ({cache}) and HF_HUB_OFFLINE=1 "
        f"forbids downloading it; no local path {tmp_path / 'HuggingFaceFW/fineweb'} exists either"
    )
    with pytest.raises(RecipeError, match=r"HuggingFaceFW/fineweb@v2 is not in the local HF cache"):
        source_files(SourceSpec(kind="hf", path="HuggingFaceFW/fineweb", revision="v2"), data_root=tmp_path)


def test_hf_hub_id_from_cache(tmp_path, monkeypatch):
    cache = hub_cache(monkeypatch, tmp_path / "hub")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "datasets--HuggingFaceFW--fineweb"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    cols = fineweb_columns(20)
    (snap / "sample" / "10BT").mkdir(parents=True)
    pq.write_table(pa.table(cols), snap / "sample" / "10BT" / "000_00000.parquet")

    src = SourceSpec(kind="hf", path="HuggingFaceFW/fineweb", name="sample/10BT")
    files = source_files(src, data_root=tmp_path)
    assert files == [snap / "sample" / "10BT" / "000_00000.parquet"]
    assert [d.id for d in read(files, kind="hf")] == cols["id"]
    with pytest.raises(RecipeError, match=r"no \.arrow or \.parquet files under 'sample/350BT'"):
        source_files(SourceSpec(kind="hf", path="HuggingFaceFW/fineweb", name="sample/350BT"), data_root=tmp_path)


# --------------------------------------------------------------------- run_curation


def real_docs(n: int) -> list[dict]:
    docs = []
    with gzip.open(data_root() / FINEWEB, "rt", encoding="utf-8") as f:
        for line in f:
            docs.append(json.loads(line))
            if len(docs) == n:
                break
    return docs


def oracle(doc: dict) -> tuple[str | None, str]:
    """datatrove's own filters (their defaults), in FineWeb's order, applied one by one."""
    d = Document(text=doc["text"], id=doc["id"])
    for name, f in [("gopher_repetition", GopherRepetitionFilter()), ("gopher_quality", GopherQualityFilter()),
                    ("c4_quality", C4QualityFilter()), ("fineweb_quality", FineWebQualityFilter())]:
        keep, reason = get_filter_result(f.filter(d))
        if not keep:
            return f"{name}:{reason or 'dropped'}", d.text
    return None, d.text


def test_run_curation_decisions(tmp_path):
    docs = real_docs(20)
    src = tmp_path / "input.jsonl"
    src.write_bytes(
        b'{"id": "bad-json", "text": "unterminated\n'  # 1
        + b'{"id": "latin1", "text": "caf\xe9 au lait"}\n'  # 2
        + b"\n   \n"  # 3, 4: blank
        + jl({"id": "ws", "text": "  \n\t "})  # 5
        + jl({"id": "notext", "body": "hello"})  # 6
        + jl({"id": "short", "text": SHORT_TEXT})  # 7
        + b"".join(jl(d) for d in docs)  # 8..27
    )
    out = tmp_path / "curated"
    counts = run_curation(
        files=[src], kind="jsonl", text_key="text", id_key="id", limit=None, shards=2,
        curation=CurationSpec().model_dump(mode="json"), out_dir=out, workers=1,
    )

    expected: dict[str, str | None] = {
        "input.jsonl:1": "malformed",
        "latin1": "invalid_utf8",
        "ws": "empty",
        "input.jsonl:6": "malformed",
        "short": "gopher_quality:gopher_short_doc",
    }
    expected_text = {}
    for d in docs:
        expected[d["id"]], expected_text[d["id"]] = oracle(d)
    # what datatrove 0.10.1 decides for these 20 real documents
    assert {k: v for k, v in expected.items() if k.startswith("<urn") and v} == {
        "<urn:uuid:cf094b9a-1a6b-4e84-ae25-87f54b74cddf>": "gopher_quality:gopher_below_alpha_threshold",
        "<urn:uuid:8439870a-c624-4ca2-b22c-90a8c1a24fdc>": "c4_quality:too_few_sentences",
        "<urn:uuid:d8014027-670d-410a-87ea-b1a529a7f9f2>": "c4_quality:too_few_sentences",
    }

    rows = pq.read_table(out / "decisions.parquet").to_pylist()
    assert len(rows) == 25  # one row per non-blank input line
    assert len({r["doc_id"] for r in rows}) == 25
    assert {r["doc_id"]: r["reason"] for r in rows} == expected
    for r in rows:
        assert r["kept"] is (r["reason"] is None)
        if r["reason"] is None:
            assert r["step"] is None
        elif ":" in r["reason"]:
            assert r["step"] == r["reason"].split(":")[0]
        else:
            assert r["step"] == "reader"
    # documents are dealt round-robin to the two shards in input order
    order = ["input.jsonl:1", "latin1", "ws", "input.jsonl:6", "short"] + [d["id"] for d in docs]
    assert {r["doc_id"]: r["shard"] for r in rows} == {i: n % 2 for n, i in enumerate(order)}
    by_id = {r["doc_id"]: r for r in rows}
    assert (by_id["ws"]["chars"], by_id["ws"]["words"]) == (5, 0)
    assert (by_id["short"]["chars"], by_id["short"]["words"]) == (len(SHORT_TEXT), 10)
    for d in docs:
        assert by_id[d["id"]]["chars"] == len(d["text"])

    kept_ids = [i for i in order if expected[i] is None]
    assert counts == {
        "documents": 25, "kept": len(kept_ids), "dropped": 25 - len(kept_ids),
        "reasons": {"malformed": 2, "invalid_utf8": 1, "empty": 1, "gopher_quality:gopher_short_doc": 1,
                    "gopher_quality:gopher_below_alpha_threshold": 1, "c4_quality:too_few_sentences": 2},
    }
    assert len(kept_ids) == 17

    # kept documents, ids preserved, one file per shard, internal metadata stripped
    assert sorted(p.name for p in (out / "docs").iterdir()) == ["00000.jsonl", "00001.jsonl"]
    assert sorted(p.name for p in out.iterdir()) == ["decisions.parquet", "docs", "excluded"]
    assert not (tmp_path / "curated.logs").exists()
    # what each filter step dropped, readable per step (datatrove's exclusion writer)
    excluded = {step.name: [json.loads(line)["id"] for f in sorted(step.glob("*.jsonl")) for line in f.open()]
                for step in (out / "excluded").iterdir()}
    dropped_by = {}
    for doc_id, reason in expected.items():
        if reason is not None and ":" in reason:
            dropped_by.setdefault(reason.split(":")[0], []).append(doc_id)
    assert {k: sorted(v) for k, v in excluded.items()} == {k: sorted(v) for k, v in dropped_by.items()}
    written: dict[str, dict] = {}
    for shard in (0, 1):
        for line in (out / "docs" / f"{shard:05d}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            assert by_id[rec["id"]]["shard"] == shard
            written[rec["id"]] = rec
    assert sorted(written) == sorted(kept_ids)
    src_by_id = {d["id"]: d for d in docs}
    for doc_id, rec in written.items():
        assert rec["text"] == expected_text[doc_id]
        assert by_id[doc_id]["words"] == len(rec["text"].split())
        meta = rec["metadata"]
        assert not any(k.startswith("foundry_") for k in meta)
        assert meta["url"] == src_by_id[doc_id]["url"]
        assert meta["legal_score"] == src_by_id[doc_id]["legal_score"]
        assert meta["file"] == "input.jsonl"
        assert meta["line"] == 8 + [d["id"] for d in docs].index(doc_id)


def test_run_curation_with_filters_off_keeps_every_usable_doc(tmp_path):
    docs = real_docs(3)
    src = tmp_path / "in.jsonl"
    src.write_bytes(jl({"id": "short", "text": SHORT_TEXT}) + b"{oops\n" + b"".join(jl(d) for d in docs))
    out = tmp_path / "cur"
    counts = run_curation(
        files=[src], kind="jsonl", text_key="text", id_key="id", limit=3, shards=1,
        curation={"gopher_repetition": None, "gopher_quality": None, "c4_quality": None, "fineweb_quality": None},
        out_dir=out, workers=1,
    )
    assert counts == {"documents": 3, "kept": 2, "dropped": 1, "reasons": {"malformed": 1}}
    kept = [json.loads(line) for line in (out / "docs" / "00000.jsonl").read_text().splitlines()]
    assert [(k["id"], k["text"]) for k in kept] == [("short", SHORT_TEXT), (docs[0]["id"], docs[0]["text"])]


def test_nested_metadata_is_flattened_so_url_filters_see_the_url(tmp_path):
    """Dolma-style records keep url under "metadata"; the URL filter and the domain column need it."""
    path = tmp_path / "dolma.jsonl"
    path.write_text(json.dumps({"id": "d1", "text": "hello world", "source": "cc",
                                "metadata": {"url": "https://www.example.org/a", "source": "inner",
                                             "line_ids": [1, 2]}}) + "\n")
    (doc,) = list(iter_records([path], "jsonl", "text", "id"))
    assert doc.metadata["url"] == "https://www.example.org/a"
    assert doc.metadata["source"] == "cc"  # the top-level value wins
    assert "line_ids" not in doc.metadata  # only scalars are carried
