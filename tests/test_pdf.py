"""PDF text-layer extraction: one result per file, drop reasons asserted exactly, OCR routing.

Broken inputs are built in tmp_path from the real sample PDFs under <data root>/pdf.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest
from pydantic import ValidationError

from assets.curation import filtered_spec
from assets.identity import code_version
from assets.recipe import (
    PDF_CURATION,
    SUFFIXES,
    C4QualitySpec,
    CurationSpec,
    GopherQualitySpec,
    GopherRepetitionSpec,
    MinhashSpec,
    PdfExtractionSpec,
    SourceSpec,
    parse_recipe,
    source_files,
)
from assets.settings import data_root
from dataprep.pdf import (
    PAGE_SEPARATOR,
    REASONS,
    PageStats,
    PdfExtractor,
    extract_in_process,
    extract_pdf,
    route_ocr,
)
from dataprep.readers import CHARS_KEY, DROP_KEY, SourceReader, iter_records

PDF = data_root() / "pdf"
pytestmark = pytest.mark.skipif(not PDF.is_dir(), reason=f"sample PDFs not found under {PDF}")

BORN_DIGITAL = PDF / "pypdf_samples"
PAPER = PDF / "pdfplumber" / "issue-982-example.pdf"  # 8-page arXiv paper (pdfTeX)
FOUR_PAGES = BORN_DIGITAL / "pdflatex-4-pages.pdf"
BIG = PDF / "pdfplumber" / "chelsea_pdta.pdf"  # 2.9 MB, 65 pages
SCANNED = ["handwriting_bad_ocr.pdf", "horribleocr.pdf", "newspaper.pdf", "some_ocr1.pdf",
           "most_content_in_image_form.pdf", "small_page_size.pdf"]
GARBLED = ["olmo-page-1.pdf", "dolma-page-1.pdf"]  # text layer in a shifted font encoding


def words(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def extractor():
    with PdfExtractor() as ex:
        yield ex


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> dict[str, Path]:
    """Broken and odd PDFs made from the samples, by name."""
    import pypdf

    out = tmp_path_factory.mktemp("pdfs")
    files: dict[str, Path] = {}

    def write(name: str, data: bytes) -> None:
        files[name] = out / f"{name}.pdf"
        files[name].write_bytes(data)

    write("empty", b"")
    data = BIG.read_bytes()
    write("cut_1mib", data[: 1 << 20])
    paper = PAPER.read_bytes()
    write("cut_half", paper[: len(paper) // 2])
    write("random", b"%PDF-1.7\n" + random.Random(0).randbytes(64_000))
    write("not_pdf", b"<html><body>Not a PDF at all</body></html>\n" * 20)
    for name, password in (("locked", "secret"), ("open_encrypted", "")):
        writer = pypdf.PdfWriter(clone_from=FOUR_PAGES)
        writer.encrypt(user_password=password, owner_password="owner", algorithm="AES-256")
        writer.write(out / f"{name}.pdf")
        files[name] = out / f"{name}.pdf"
    pypdf.PdfWriter().write(out / "zero_pages.pdf")
    files["zero_pages"] = out / "zero_pages.pdf"
    blank = pypdf.PdfWriter()
    blank.add_blank_page(width=612, height=792)
    blank.write(out / "blank.pdf")
    files["blank"] = out / "blank.pdf"
    page = pypdf.PdfReader(BORN_DIGITAL / "minimal-document.pdf").pages[0]
    thousand = pypdf.PdfWriter()
    for _ in range(1000):
        thousand.add_page(page)
    thousand.write(out / "thousand.pdf")
    files["thousand"] = out / "thousand.pdf"
    return files


# --------------------------------------------------------------------- extraction


def test_known_page_sentence_and_page_offsets(extractor):
    result = extractor.extract(PAPER)
    assert result.drop is None and result.error is None
    assert (result.pages, result.producer, result.encrypted, result.needs_ocr) == (8, "pdfTeX-1.40.12", False, False)
    assert len(result.page_offsets) == 8 and result.page_offsets[0] == 0
    sentence = ("Applying a simple neural network on image data directly can work, "
                "but the number of parameters gets extraordinary large.")
    assert sentence in words(result.page_text(1))
    assert sentence not in words(result.page_text(0)) and "Creativity in Machine Learning" in result.page_text(0)
    # pages joined by a blank line, offsets pointing at each page's start
    for i in range(1, 8):
        assert result.text[result.page_offsets[i] - len(PAGE_SEPARATOR):result.page_offsets[i]] == PAGE_SEPARATOR
    assert PAGE_SEPARATOR.join(result.page_text(i) for i in range(8)) == result.text
    assert result.chars == len(result.text) > 20_000
    assert "\r" not in result.text
    assert 0 < result.extraction_seconds < 10
    assert result.sha256 == hashlib.sha256(PAPER.read_bytes()).hexdigest()


def test_line_end_hyphens_are_joined():
    # PDFium marks hyphens it removed at line ends with U+FFFE: "mathemati-/cally" is one word
    result = extract_in_process(PDF / "olmocr" / "gnarly" / "bws_book_ch2.pdf")
    assert "\ufffe" not in result.text
    assert "technique is mathematically valid" in words(result.text)


def test_one_worker_process_serves_many_files():
    files = sorted(BORN_DIGITAL.glob("*.pdf"))
    with PdfExtractor() as ex:
        results = [ex.extract(f) for f in files]
        assert ex.starts == 1
    assert sum(r.drop is None for r in results) == len(files) - 1  # all but the password-protected one


def test_extract_pdf_matches_in_process_extraction():
    assert extract_pdf(FOUR_PAGES).text == extract_in_process(FOUR_PAGES).text


# --------------------------------------------------------------------- one reason each


def test_empty(extractor, broken):
    for path in (broken["empty"], PDF / "pdfplumber" / "empty.pdf"):
        result = extractor.extract(path)
        assert (result.drop, result.pages, result.text) == ("empty", 0, "")


@pytest.mark.parametrize("name", ["cut_1mib", "cut_half"])
def test_truncated(extractor, broken, name):
    result = extractor.extract(broken[name])
    assert result.drop == "truncated", result.error
    assert result.text == ""


@pytest.mark.parametrize("name", ["random", "not_pdf"])
def test_malformed(extractor, broken, name):
    assert extractor.extract(broken[name]).drop == "malformed"


def test_password_protected(extractor, broken):
    for path in (broken["locked"], PDF / "pdfplumber" / "password-example.pdf",
                 BORN_DIGITAL / "libreoffice-writer-password.pdf"):
        result = extractor.extract(path)
        assert (result.drop, result.encrypted, result.text) == ("encrypted", True, "")


def test_encrypted_with_empty_password_is_extracted(extractor, broken):
    result = extractor.extract(broken["open_encrypted"])
    assert (result.drop, result.encrypted, result.pages) == (None, True, 4)
    assert result.text == extractor.extract(FOUR_PAGES).text


def test_zero_pages(extractor, broken):
    assert extractor.extract(broken["zero_pages"]).drop == "zero_pages"


def test_too_many_pages_is_dropped_whole(extractor, broken):
    result = extractor.extract(broken["thousand"])
    assert (result.drop, result.pages, result.text) == ("too_many_pages", 1000, "")
    assert "1000 pages" in result.error


def test_too_many_pages_is_configurable(extractor, broken):
    result = extractor.extract(broken["thousand"], max_pages=1000)
    assert (result.drop, result.pages, len(result.page_offsets)) == (None, 1000, 1000)


def test_timeout_kills_the_worker_and_the_next_file_works(broken):
    with PdfExtractor(max_pages=10_000) as ex:
        ex.start()
        result = ex.extract(broken["thousand"], time_limit_s=0.05)
        assert (result.drop, result.text) == ("timeout", "")
        assert result.sha256 == hashlib.sha256(broken["thousand"].read_bytes()).hexdigest()
        assert 0.05 <= result.extraction_seconds < 5
        assert ex.extract(FOUR_PAGES).drop is None
        assert ex.starts == 2


def test_a_dead_worker_is_replaced(extractor):
    extractor.start()
    extractor._proc.kill()
    extractor._proc.wait()
    assert extractor.extract(FOUR_PAGES).pages == 4


def test_no_text_layer(extractor, broken):
    scan = extractor.extract(PDF / "olmocr" / "bench_sample" / "pdfs" / "lincoln_letter.pdf")
    assert (scan.drop, scan.needs_ocr, scan.pages, scan.text) == ("no_text_layer", True, 1, "")
    blank = extractor.extract(broken["blank"])  # nothing to OCR either
    assert (blank.drop, blank.needs_ocr) == ("no_text_layer", False)


def test_unreadable(extractor, tmp_path):
    assert extractor.extract(tmp_path / "missing.pdf").drop == "unreadable"
    folder = tmp_path / "folder.pdf"
    folder.mkdir()
    assert extractor.extract(folder).drop == "unreadable"


def test_every_reason_is_known(extractor, broken):
    reasons = {extractor.extract(path).drop for path in broken.values()}
    assert reasons - {None} <= set(REASONS)


# --------------------------------------------------------------------- OCR routing


@pytest.mark.parametrize("name", SCANNED + GARBLED)
def test_scanned_and_garbled_documents_need_ocr(extractor, name):
    result = extractor.extract(PDF / "olmocr" / "gnarly" / name)
    assert result.drop is None
    assert result.needs_ocr and result.ocr_score >= 0.5, (result.ocr_score, result.figures)


def test_born_digital_documents_do_not_need_ocr(extractor):
    results = {p.name: extractor.extract(p) for p in sorted(BORN_DIGITAL.glob("*.pdf"))}
    results = {name: r for name, r in results.items() if r.drop is None}
    assert len(results) == 12
    for name, result in results.items():
        assert not result.needs_ocr and result.ocr_score < 0.2, (name, result.ocr_score, result.figures)


def test_routing_figures():
    scan = extract_in_process(PDF / "olmocr" / "gnarly" / "most_content_in_image_form.pdf").figures
    assert scan.image_only_share > 0.8 and scan.chars_per_page < 100
    garbled = extract_in_process(PDF / "olmocr" / "gnarly" / "dolma-page-1.pdf").figures
    assert garbled.vowel_share < 0.15 and garbled.bad_word_share > 0.3
    clean = extract_in_process(PAPER).figures
    assert clean.vowel_share > 0.35 and clean.garbled_share < 0.01 and clean.image_only_share == 0


def _shift(text: str, by: int) -> str:
    return "".join(chr((ord(c) - 97 + by) % 26 + 97) if "a" <= c <= "z" else c for c in text)


def test_route_ocr_on_text_alone():
    def page(text: str) -> list[PageStats]:
        return [PageStats(chars=len(text.replace(" ", "")), image_cover=0.0, largest_image=0.0)]

    text = words(extract_in_process(PAPER).text)[:5000]
    assert route_ocr(text, page(text))[:2] == (False, 0.0)
    shifted = _shift(text, -1)  # a font whose codes are off by one
    assert route_ocr(shifted, page(shifted))[0]
    replaced = "\ufffd" * 50 + text[:1000]  # ~6% replacement characters
    assert route_ocr(replaced, page(replaced))[0]
    pictures = [PageStats(chars=10, image_cover=1.0, largest_image=1.0)] * 3
    assert route_ocr("Figure 1", pictures)[:2] == (True, 1.0)


# --------------------------------------------------------------------- the reader


def test_reader_gives_one_document_per_pdf(broken):
    files = [PAPER, broken["locked"], broken["empty"], broken["cut_1mib"], broken["thousand"],
             PDF / "olmocr" / "gnarly" / "horribleocr.pdf", PDF / "olmocr" / "bench_sample" / "pdfs" / "lincoln_letter.pdf"]
    docs = list(iter_records(files, "pdf", "text", "id"))
    assert [d.metadata.get(DROP_KEY) for d in docs] == [
        None, "encrypted", "empty", "truncated", "too_many_pages", "needs_ocr", "no_text_layer"]
    assert [d.id for d in docs] == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    kept = docs[0]
    assert kept.text == extract_pdf(PAPER).text
    meta = kept.metadata
    assert (meta["pages"], meta["chars"], meta[CHARS_KEY], meta["file"]) == (8, len(kept.text), len(kept.text), PAPER.name)
    assert (meta["producer"], meta["encrypted"], meta["needs_ocr"]) == ("pdfTeX-1.40.12", False, False)
    assert len(meta["page_offsets"]) == 8 and meta["extraction_seconds"] > 0 and 0 <= meta["ocr_score"] < 0.5
    scanned = docs[5]
    assert scanned.metadata["needs_ocr"] and scanned.metadata["ocr_score"] >= 0.5 and scanned.text
    assert docs[1].metadata["encrypted"] and "error" in docs[1].metadata


def test_pdf_sources_in_recipes(tmp_path):
    assert SUFFIXES["pdf"] == (".pdf",)
    src = SourceSpec(kind="pdf", path=str(BORN_DIGITAL))
    assert [p.name for p in source_files(src)] == sorted(p.name for p in BORN_DIGITAL.rglob("*.pdf"))


def test_ocr_threshold_is_a_setting(extractor):
    scan = PDF / "olmocr" / "gnarly" / "horribleocr.pdf"  # scores 0.6: a scan carrying an old OCR layer
    default, strict = extractor.extract(scan), extractor.extract(scan, ocr_threshold=0.7)
    assert default.needs_ocr and not strict.needs_ocr and default.ocr_score == strict.ocr_score
    assert PdfExtractor(ocr_threshold=0.7).ocr_threshold == 0.7
    [doc] = iter_records([scan], "pdf", "text", "id", pdf={"ocr_threshold": 0.7})
    assert DROP_KEY not in doc.metadata and doc.metadata["ocr_score"] == round(default.ocr_score, 4)


def test_the_reader_takes_the_extraction_settings():
    reader = SourceReader([str(FOUR_PAGES), str(PAPER)], "pdf", "text", "id", None, pdf={"max_pages": 5})
    docs = list(reader.run())
    assert [d.metadata.get(DROP_KEY) for d in docs] == [None, "too_many_pages"]
    assert docs[1].metadata["pages"] == 8 and docs[1].metadata["error"] == "8 pages (max_pages=5)"
    with pytest.raises(ValueError, match="unknown PDF extraction option"):
        list(iter_records([FOUR_PAGES], "pdf", "text", "id", pdf={"pages": 3}))


def test_curation_passes_the_extraction_settings_to_the_reader(tmp_path):
    from dataprep.curate import curation_steps, run_curation

    src = SourceSpec(kind="pdf", path=str(BORN_DIGITAL), curation={"pdf": {"max_pages": 5}})
    curation = src.curation.model_dump(mode="json")
    assert curation_steps([PAPER], "pdf", "text", "id", None, curation)[0].pdf == curation["pdf"]
    counts = run_curation([PAPER], "pdf", "text", "id", None, 1, curation, tmp_path / "out", workers=1)
    assert counts["reasons"] == {"too_many_pages": 1}


# --------------------------------------------------------------------- curation defaults of kind pdf


def test_pdf_sources_get_pdf_curation_defaults():
    src = SourceSpec(kind="pdf", path="pdf")
    cur = src.curation
    assert (src.shards, cur.c4_quality, cur.fineweb_quality, cur.pdf) == (1, None, None, PdfExtractionSpec())
    rep, quality = cur.gopher_repetition, cur.gopher_quality
    assert rep.dup_line_frac is None and rep.dup_line_char_frac == 0.2 and rep.dup_para_frac == 0.3
    assert rep.dup_n_grams == {5: 0.25, 6: 0.24, 7: 0.23, 8: 0.22, 9: 0.21, 10: 0.2}
    assert rep.top_n_grams == GopherRepetitionSpec().top_n_grams
    assert quality.max_doc_words is None and quality.max_non_alpha_words_ratio == 0.7
    assert quality.min_doc_words == GopherQualitySpec().min_doc_words and cur.minhash == MinhashSpec()
    # a step given as a mapping is merged key by key; {} brings back a step that is off here; null
    # turns one off; writing the defaults out is the same recipe
    given = SourceSpec(kind="pdf", path="pdf", shards=2, curation={
        "gopher_quality": {"min_doc_words": 20}, "c4_quality": {}, "gopher_repetition": None, "pdf": {"max_pages": 9}})
    g = given.curation
    assert (g.gopher_quality.min_doc_words, g.gopher_quality.max_non_alpha_words_ratio) == (20, 0.7)
    assert (g.c4_quality, g.gopher_repetition, g.fineweb_quality) == (C4QualitySpec(), None, None)
    assert (g.pdf.max_pages, g.pdf.time_limit_s, given.shards) == (9, 30.0, 2)
    written_out = {**PDF_CURATION, "pdf": PdfExtractionSpec().model_dump()}
    spelled = parse_recipe({"name": "p", "sources": {"p": {"kind": "pdf", "path": "pdf", "shards": 1,
                                                           "curation": written_out}},
                            "mixture": {"weights": {"p": 1}, "total_tokens": 10}}).sources["p"]
    assert spelled == src
    assert code_version("filtered", filtered_spec(spelled)) == code_version("filtered", filtered_spec(src))
    assert SourceSpec(kind="pdf", path="pdf", curation=CurationSpec(minhash=None)).curation.c4_quality is None
    # other kinds keep the web defaults, their identity, and have no extraction settings
    web = SourceSpec(kind="jsonl", path="x")
    assert web.curation == CurationSpec() and "pdf" not in web.curation.filter_spec() and web.shards == 2
    with pytest.raises(ValidationError, match="'curation.pdf' applies only to kind pdf"):
        SourceSpec(kind="jsonl", path="x", curation={"pdf": {}})


def test_every_extraction_setting_is_hashed():
    def version(**pdf) -> str:
        return code_version("filtered", filtered_spec(SourceSpec(kind="pdf", path="pdf", curation={"pdf": pdf})))

    base = version()
    assert base == version(time_limit_s=30, max_pages=500, ocr_threshold=0.5)
    changed = [version(time_limit_s=60), version(max_pages=100), version(ocr_threshold=0.7)]
    assert base not in changed and len(set(changed)) == 3
    with pytest.raises(ValidationError):
        SourceSpec(kind="pdf", path="pdf", curation={"pdf": {"ocr_threshold": 0}})


def _first_drop(text: str, curation: CurationSpec) -> str | None:
    """The first filter step that drops the text, as step:reason (None: kept)."""
    from datatrove.data import Document
    from datatrove.pipeline.filters.base_filter import get_filter_result

    from dataprep.curate import FILTERS, build_filter

    spec = curation.model_dump(mode="json")
    for name in FILTERS:
        if spec.get(name) is not None:
            doc = Document(text=text, id="x")
            keep, reason = get_filter_result(build_filter(name, spec[name]).filter(doc))
            if not keep:
                return f"{name}:{reason}"
            text = doc.text
    return None


def test_pdf_defaults_keep_long_documents_that_web_defaults_drop(extractor):
    pdf_defaults = SourceSpec(kind="pdf", path="pdf").curation
    web_defaults = SourceSpec(kind="jsonl", path="x").curation
    # a paper, a 15-page notice with running headers, a 48-page book chapter
    prose = [PAPER, PDF / "pdfplumber" / "federal-register-2020-17221.pdf",
             PDF / "olmocr" / "gnarly" / "bws_book_ch2.pdf"]
    for path in prose:
        text = extractor.extract(path).text
        assert _first_drop(text, web_defaults) is not None
        assert _first_drop(text, pdf_defaults) is None, path.name
    junk = {"pdflatex-4-pages.pdf": "gopher_repetition:dup_line_char_frac",  # blind text, repeated
            "minimal-document.pdf": "gopher_repetition:duplicated_5_n_grams",  # lorem ipsum, repeated
            "pdfkit.pdf": "gopher_repetition:top_2_gram"}  # four words
    for name, reason in junk.items():
        assert _first_drop(extractor.extract(BORN_DIGITAL / name).text, pdf_defaults) == reason
    table = extractor.extract(PDF / "pdfplumber" / "nics-background-checks-2015-11.pdf").text
    assert _first_drop(table, pdf_defaults) == "gopher_repetition:top_3_gram"  # a table of numbers


def test_a_new_extraction_logic_version_rebuilds_pdf_sources_only(monkeypatch):
    """The text comes out of dataprep.pdf, so its logic version is part of a pdf source's identity."""
    import dataprep.pdf
    from assets.curation import curated_spec, filtered_spec
    from assets.identity import code_version
    from assets.recipe import SourceSpec

    pdf = SourceSpec(kind="pdf", path="pdf")
    web = SourceSpec(kind="jsonl", path="web/fineweb_sample")
    before = {name: (code_version("filtered", filtered_spec(s)), code_version("curated", curated_spec(s)))
              for name, s in (("pdf", pdf), ("web", web))}
    monkeypatch.setattr(dataprep.pdf, "LOGIC_VERSION", dataprep.pdf.LOGIC_VERSION + "-next")
    after = {name: (code_version("filtered", filtered_spec(s)), code_version("curated", curated_spec(s)))
             for name, s in (("pdf", pdf), ("web", web))}
    assert after["web"] == before["web"]
    assert after["pdf"][0] != before["pdf"][0] and after["pdf"][1] != before["pdf"][1]
