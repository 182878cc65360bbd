"""Web curation: WARC input with extraction, URL filter, language ID and PII, all offline."""

from __future__ import annotations

import gzip
import io
import json
import socket
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datatrove.data import Document
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from assets.curation import curated_spec
from assets.recipe import CurationSpec, RecipeError, SourceSpec, parse_recipe, source_files
from assets.settings import PROJECT_ROOT, data_root
from assets.stats import view_sql
from dataprep.curate import Judged, run_curation
from dataprep.readers import DROP_KEY, iter_records
from dataprep.web import FastTextLanguageFilter, OfflineURLFilter, cache_dir

WARC_DIR = data_root() / "web" / "warc"
FINEWEB = data_root() / "web/fineweb_sample/fineweb_legal_dedup.jsonl.gz"
OFF = {"gopher_repetition": None, "gopher_quality": None, "c4_quality": None, "fineweb_quality": None}

ENGLISH = ("The committee met on Tuesday to discuss the new budget for the public library, and most "
           "members agreed that the opening hours should be extended during the winter months.")
FRENCH = ("Le comité s'est réuni mardi pour discuter du nouveau budget de la bibliothèque municipale, "
          "et la plupart des membres ont convenu que les horaires devaient être prolongés en hiver.")
GERMAN = ("Der Ausschuss traf sich am Dienstag, um über das neue Budget der Stadtbibliothek zu sprechen, "
          "und die meisten Mitglieder waren sich einig, dass die Öffnungszeiten verlängert werden sollten.")
SPANISH = ("El comité se reunió el martes para discutir el nuevo presupuesto de la biblioteca pública, y la "
           "mayoría de los miembros estuvo de acuerdo en ampliar el horario durante los meses de invierno.")


def write_warc(path: Path, responses: list[tuple[str, str | None, bytes]]) -> Path:
    """A gzipped WARC with a request record before each response (requests are not documents)."""
    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=True)
        for url, ctype, body in responses:
            w.write_record(w.create_warc_record(url, "request", payload=io.BytesIO(b"GET / HTTP/1.1\r\n\r\n")))
            http = StatusAndHeaders("200 OK", [("Content-Type", ctype)] if ctype else [], protocol="HTTP/1.1")
            w.write_record(w.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=http))
    return path


def html(body: str) -> bytes:
    return f"<!DOCTYPE html><html><head><title>t</title></head><body>{body}</body></html>".encode()


# --------------------------------------------------------------------- WARC reading


def test_warc_sample_every_response_is_one_document():
    files = sorted(WARC_DIR.glob("*.warc.gz"))
    docs = list(iter_records(files, "warc", "text", "id"))
    assert len(docs) == 37  # 22 + 15 HTTP responses; warcinfo/request/metadata/resource are not documents
    assert len({d.id for d in docs}) == 37
    assert all(d.id.startswith("<urn:uuid:") for d in docs)
    assert [DROP_KEY in d.metadata for d in docs] == [False] * 37  # all HTML (Content-Type trusted over libmagic)
    first = docs[0]
    assert first.id == "<urn:uuid:283E41D7-F686-4C3E-B7DA-E8D248A100C1>"
    assert first.metadata["url"] == "https://www.semanticscholar.org/research/research-team"
    assert first.metadata["date"] == "2024-04-25T16:24:44Z"
    assert (first.metadata["file"], first.metadata["line"]) == ("sample-0000.warc.gz", 1)
    assert "<html" in first.text.lower()
    assert source_files(SourceSpec(kind="warc", path=str(WARC_DIR))) == files


def test_warc_sample_extraction_decisions(tmp_path):
    files = sorted(WARC_DIR.glob("*.warc.gz"))
    out = tmp_path / "cur"
    counts = run_curation(files=files, kind="warc", text_key="text", id_key="id", limit=None, shards=1,
                          curation=OFF, out_dir=out, workers=1)
    rows = pq.read_table(out / "decisions.parquet").to_pylist()
    assert counts["documents"] == len(rows) == 37
    by_id = {r["doc_id"]: r for r in rows}
    urls = {d.id: d.metadata["url"] for d in iter_records(files, "warc", "text", "id")}
    assert set(by_id) == set(urls)
    kept = [json.loads(line) for line in (out / "docs" / "00000.jsonl").read_text().splitlines()]
    assert counts["kept"] == len(kept) >= 30
    for rec in kept:
        assert rec["metadata"]["url"] == urls[rec["id"]]
        assert rec["metadata"]["date"].startswith("2024-04-25T")
        assert "<" not in rec["text"][:200] or "</" not in rec["text"]  # text, not markup
        assert by_id[rec["id"]]["chars"] == len(rec["text"]) > 0
        assert by_id[rec["id"]]["language"] is None  # the language step did not run
    for r in rows:
        assert r["kept"] or r["reason"].startswith("extraction:")
    assert any("Creative Commons" in rec["text"] for rec in kept)


def test_warc_non_html_empty_and_unextractable(tmp_path):
    warc = write_warc(tmp_path / "mixed.warc.gz", [
        ("https://a.example/", "text/html; charset=utf-8",
         html("<p>Hello there. This is a paragraph of real text about the weather in spring.</p>")),
        ("https://a.example/logo.png", "image/png", b"\x89PNG\r\n\x1a\n\x00\x00binary"),
        ("https://a.example/empty", "text/html", b""),
        ("https://a.example/script", "text/html", html("<script>var x = 1;</script>")),
        ("https://a.example/noheader", None, html("<p>A page served without a content type header at all.</p>")),
    ])
    docs = list(iter_records([warc], "warc", "text", "id"))
    assert [(d.metadata["url"].rsplit("/", 1)[1], d.metadata.get(DROP_KEY)) for d in docs] == [
        ("", None), ("logo.png", "not_html"), ("empty", "empty"), ("script", None), ("noheader", None),
    ]
    out = tmp_path / "cur"
    counts = run_curation(files=[warc], kind="warc", text_key="text", id_key="id", limit=None, shards=2,
                          curation=OFF, out_dir=out, workers=1)
    rows = pq.read_table(out / "decisions.parquet").to_pylist()
    reasons = {r["doc_id"]: (r["reason"], r["step"]) for r in rows}
    assert [reasons[d.id] for d in docs] == [
        (None, None), ("not_html", "reader"), ("empty", "reader"), ("extraction:no_text", "extraction"),
        (None, None),
    ]
    assert counts["reasons"] == {"not_html": 1, "empty": 1, "extraction:no_text": 1}
    texts = {}
    for part in sorted((out / "docs").glob("*.jsonl")):  # a shard that keeps nothing writes no file
        for line in part.read_text().splitlines():
            rec = json.loads(line)
            texts[rec["id"]] = rec["text"]
    assert texts == {docs[0].id: "Hello there. This is a paragraph of real text about the weather in spring.",
                     docs[4].id: "A page served without a content type header at all."}


# --------------------------------------------------------------------- URL filter


@pytest.fixture
def no_network(monkeypatch):
    """Any internet connection or name lookup fails the test (local unix sockets still work)."""
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guard(real):
        def connect(self, address, *args):
            if self.family in (socket.AF_INET, socket.AF_INET6):
                raise AssertionError(f"network access attempted: {address}")
            return real(self, address, *args)

        return connect

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", guard(real_connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guard(real_connect_ex))
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def judge(step: str, f, docs: list[Document]) -> list[str | None]:
    out = list(Judged(step, f).run(iter(docs)))
    return [d.metadata.get(DROP_KEY) for d in out]


def test_url_filter_offline(no_network):
    f = OfflineURLFilter(extra_domains=["blocked-site.com"])
    docs = [
        Document(text="x", id="ok", metadata={"url": "https://www.cs.washington.edu/people/faculty/weld"}),
        Document(text="x", id="listed", metadata={"url": "https://pornhub.com/some/page"}),
        Document(text="x", id="extra", metadata={"url": "http://news.blocked-site.com/a"}),
        Document(text="x", id="word", metadata={"url": "https://example.org/free-porn-videos"}),
        Document(text="x", id="nourl", metadata={}),
    ]
    assert judge("url_filter", f, docs) == [
        None, "url_filter:domain", "url_filter:domain", "url_filter:hard_blacklisted", "url_filter:no_url",
    ]
    # the block lists were unpacked inside the project cache, not under the user's home
    assets = Path(f.assets_dir)
    assert assets == cache_dir() / "datatrove-assets"
    assert assets.is_relative_to(PROJECT_ROOT) or "FOUNDRY_CACHE" in __import__("os").environ
    assert (assets / "datatrove" / "filters" / "url_filter" / "domains").is_file()


# --------------------------------------------------------------------- language ID


def test_language_id_reasons_and_metadata():
    f = FastTextLanguageFilter(languages=["en"], min_score=0.65)
    docs = [Document(text=t, id=i) for i, t in
            [("en", ENGLISH), ("fr", FRENCH), ("de", GERMAN), ("es", SPANISH), ("en_lines", ENGLISH.replace(",", "\n"))]]
    assert judge("language", f, docs) == [None, "language:fr", "language:de", "language:es", None]
    for d in docs:
        assert d.metadata["language"] == d.id[:2]
        assert 0.65 <= d.metadata["language_score"] <= 1.0
    strict = FastTextLanguageFilter(languages=["en"], min_score=0.9999)
    assert judge("language", strict, [Document(text=ENGLISH, id="e")]) == ["language:low_score"]
    anything = FastTextLanguageFilter(languages=None, min_score=0.5)
    assert judge("language", anything, [Document(text=t, id=str(i)) for i, t in enumerate([ENGLISH, FRENCH])]) == [
        None, None]
    multi = FastTextLanguageFilter(languages=["en", "fr"])
    assert judge("language", multi, [Document(text=t, id=str(i)) for i, t in enumerate([ENGLISH, FRENCH, GERMAN])]) \
        == [None, None, "language:de"]


# --------------------------------------------------------------------- recipe


def test_recipe_web_fields_validate_and_default_off():
    base = {"name": "web", "mixture": {"weights": {"w": 1}, "total_tokens": 100},
            "sources": {"w": {"kind": "warc", "path": "web/warc",
                              "curation": {"url_filter": {"extra_domains": ["x.example"]},
                                           "language": {"languages": ["en", "fr"], "min_score": 0.5},
                                           "pii": {"remove_ips": False}}}}}
    cur = parse_recipe(base).sources["w"].curation
    assert cur.url_filter.extra_domains == ["x.example"] and cur.url_filter.use_integrated_lists
    assert (cur.language.languages, cur.language.min_score) == (["en", "fr"], 0.5)
    assert (cur.pii.remove_emails, cur.pii.remove_ips) == (True, False)

    # off by default, and left out of the hashed spec while off: existing recipes keep their keys
    default = CurationSpec()
    assert (default.url_filter, default.language, default.pii) == (None, None, None)
    assert set(default.filter_spec()) == {"gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality"}
    assert set(cur.filter_spec()) == set(CurationSpec.model_fields) - {"minhash", "checks", "pdf"}  # pdf: kind pdf
    assert set(default.hashed()) == {"filters", "minhash"}  # checks never change an output
    on = CurationSpec(language={})
    assert on.filter_spec()["language"] == {"languages": ["en"], "min_score": 0.65}
    assert curated_spec(SourceSpec(kind="jsonl", path="x")) != curated_spec(SourceSpec(kind="jsonl", path="x",
                                                                                       curation=on))

    def error(curation: dict) -> str:
        bad = json.loads(json.dumps(base))
        bad["sources"]["w"]["curation"] = curation
        with pytest.raises(RecipeError) as info:
            parse_recipe(bad, origin="r.yaml")
        return str(info.value)

    assert error({"language": {"min_score": 1.5}}) == (
        "r.yaml: invalid recipe\n  sources.w.curation.language.min_score: Input should be less than or equal to 1")
    assert error({"language": {"languages": ["English"]}}) == (
        "r.yaml: invalid recipe\n  sources.w.curation.language.languages: "
        "'English' is not a language code like 'en' or 'fr'")
    assert error({"language": {"languages": []}}).endswith(
        "give at least one language code, or null to keep every language")
    assert error({"url_filter": {"soft_words": 3}}) == (
        "r.yaml: invalid recipe\n  sources.w.curation.url_filter.soft_words: unknown key")
    assert error({"pii": {"remove_phones": True}}) == (
        "r.yaml: invalid recipe\n  sources.w.curation.pii.remove_phones: unknown key")


# --------------------------------------------------------------------- the whole chain


def fineweb_docs(n: int) -> list[dict]:
    docs = []
    with gzip.open(FINEWEB, "rt", encoding="utf-8") as f:
        for line in f:
            docs.append(json.loads(line))
            if len(docs) == n:
                break
    return docs


def test_run_curation_full_web_chain(tmp_path, no_network):
    real = fineweb_docs(3)  # all three pass the four quality filters (see test_readers)
    long_fr = " ".join([FRENCH] * 6)
    contact = real[1]["text"] + "\n\nWrite to jane.doe@example.net or reach our server at 8.8.8.8 today."
    records = [
        {"id": "good", "text": real[0]["text"], "url": "https://law.example.com/a"},
        {"id": "blocked", "text": real[0]["text"], "url": "https://pornhub.com/a"},
        {"id": "french", "text": long_fr, "url": "https://journal.example.fr/article"},
        {"id": "nourl", "text": real[2]["text"]},
        {"id": "pii", "text": contact, "url": "https://law.example.com/contact"},
        {"id": "short", "text": ENGLISH, "url": "https://law.example.com/short"},
    ]
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in records) + b"{broken\n")
    curation = CurationSpec(url_filter={}, language={}, pii={}).model_dump(mode="json")
    out = tmp_path / "cur"
    # one shard: each task loads the 4.5M-domain block list (~5 s)
    counts = run_curation(files=[src], kind="jsonl", text_key="text", id_key="id", limit=None, shards=1,
                          curation=curation, out_dir=out, workers=1)
    rows = {r["doc_id"]: r for r in pq.read_table(out / "decisions.parquet").to_pylist()}
    assert {k: (r["reason"], r["step"]) for k, r in rows.items()} == {
        "good": (None, None),
        "blocked": ("url_filter:domain", "url_filter"),
        "french": ("language:fr", "language"),
        "nourl": ("url_filter:no_url", "url_filter"),
        "pii": (None, None),
        "short": ("gopher_quality:gopher_short_doc", "gopher_quality"),
        "mixed.jsonl:7": ("malformed", "reader"),
    }
    assert counts["documents"] == 7 and counts["kept"] == 2
    # language columns: set where the step ran, null where the document was dropped before it
    for k in ("good", "french", "pii", "short"):
        assert rows[k]["language"] == ("fr" if k == "french" else "en")
        assert rows[k]["language_score"] >= 0.65
    for k in ("blocked", "nourl", "mixed.jsonl:7"):
        assert (rows[k]["language"], rows[k]["language_score"]) == (None, None)
    kept = {}
    for part in sorted((out / "docs").glob("*.jsonl")):
        for line in part.read_text().splitlines():
            rec = json.loads(line)
            kept[rec["id"]] = rec
    assert sorted(kept) == ["good", "pii"]
    assert rows["good"]["words"] == len(kept["good"]["text"].split()) > 100  # C4 may drop some lines
    assert "jane.doe@example.net" not in kept["pii"]["text"] and "8.8.8.8" not in kept["pii"]["text"]
    assert "email@example.com" in kept["pii"]["text"]
    assert kept["pii"]["metadata"]["language"] == "en"
    assert kept["pii"]["metadata"]["url"] == "https://law.example.com/contact"


def test_curation_view_reads_old_decisions_without_language(tmp_path):
    old = tmp_path / "curated" / "k1" / "decisions.parquet"
    old.parent.mkdir(parents=True)
    pq.write_table(pa.table({"doc_id": ["a"], "shard": pa.array([0], pa.int32()), "kept": [True],
                             "reason": pa.array([None], pa.string()), "step": pa.array([None], pa.string()),
                             "chars": [5], "words": [1]}), old)
    sql = view_sql(tmp_path, [{"table": "curation", "recipe": "r", "source": "s", "file": "curated/k1/decisions.parquet"}])
    con = duckdb.connect()
    con.execute(f"CREATE VIEW curation AS {sql['curation']}")
    assert con.execute("select doc_id, kept, language, language_score from curation").fetchall() == [
        ("a", True, None, None)]
    empty = view_sql(tmp_path, [])["curation"]
    cols = [d[0] for d in con.execute(empty).description]
    assert cols[-7:] == ["language", "language_score", "file", "url", "domain", "cluster_id", "cluster_size"]
