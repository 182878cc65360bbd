"""The fused curation path decides exactly what datatrove's own filters decide.

Checked at three levels, each against the plain datatrove classes on the same input:
- the stand-ins (`dataprep.fused_filters`) against the datatrove helpers they replace, on
  random inputs made to collide (words with spaces, n-grams that concatenate alike);
- the filter chain document by document (result, drop reason, and the text C4 leaves) on the
  FineWeb sample, the raw Common Crawl sample and bad inputs, for the default configuration
  and for seeded random draws of every threshold the recipe can set (filters on and off);
- `run_curation` end to end: decision rows, counts, kept documents and exclusions, with and
  without the URL filter and language ID.

The plain side runs in a second process (spawned once for the module), beside the fused side:
it uses both cores, and the reference never shares spaCy's state with the fused path (which
keeps common strings in spaCy's vocabulary and tokenizer cache).

The slow sweep (`-m slow`) runs the whole samples and more draws.
"""

from __future__ import annotations

import gzip
import json
import multiprocessing
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from datatrove.data import Document
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from datatrove.pipeline.filters import gopher_repetition_filter as gopher_rep
from datatrove.pipeline.filters.base_filter import get_filter_result
from datatrove.utils.text import split_into_words

from assets.recipe import CurationSpec
from dataprep import fused_filters as fused
from dataprep.curate import FILTERS, build_filter, run_curation

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "web"
FINEWEB = DATA / "fineweb_sample" / "fineweb_legal_dedup.jsonl.gz"
COMMONCRAWL = DATA / "commoncrawl_raw"

needs_samples = pytest.mark.skipif(not FINEWEB.is_file(), reason="sample data not found")
# datatrove's URLFilter reads tldextract's renamed property (both paths alike)
pytestmark = pytest.mark.filterwarnings("ignore:The 'registered_domain' property is deprecated:DeprecationWarning")


# --------------------------------------------------------------------- inputs


def sample_records(path: Path, limit: int | None = None) -> list[dict]:
    records = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(records) == limit:
                break
            records.append(json.loads(line))
    return records


def commoncrawl_files() -> list[Path]:
    return sorted(p for p in COMMONCRAWL.iterdir() if p.name.endswith((".jsonl.gz", ".json.gz")))


def sample_texts(fineweb: int | None, per_commoncrawl_file: int | None) -> list[str]:
    texts = [r["text"] for r in sample_records(FINEWEB, fineweb)]
    for path in commoncrawl_files():
        texts += [r["text"] for r in sample_records(path, per_commoncrawl_file)]
    return texts


WORDS = ("the of and to in that with have be court state law case order party judge rule claim time year "
         "people report public office market price water city school family health policy house river").split()


def sentences(seed: int, count: int, low: int, high: int) -> list[str]:
    """Distinct-looking English sentences of low..high words from a small vocabulary."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "." for _ in range(count)]


SENTENCE = "The court held that the contract was void and the parties had to return what they had received. "
BAD_INPUTS: dict[str, str] = {
    "empty": "",
    "whitespace_only": " \n\n\t \r\n \u00a0\u2028 ",
    "one_char": "a",
    "very_short": "Hi.",
    "short_sentence": "This is the end of it.",
    "chinese": "数据处理是机器学习的重要组成部分。我们需要清洗、过滤和去重。" * 20,
    "arabic": "هذا نص باللغة العربية لاختبار المرشحات. " * 30,
    "russian": "Это текст на русском языке для проверки фильтров и токенизации. " * 30,
    "hindi": "यह फ़िल्टर की जाँच के लिए हिंदी में एक पाठ है। " * 30,
    "japanese": "これはフィルターをテストするための日本語の文章です。" * 20,
    "giant_line": (SENTENCE * 3000).strip(),  # ~290k characters, no newline
    "no_punctuation": " ".join(["the quick brown fox jumps over the lazy dog and then it runs"] * 40),
    "no_punctuation_lines": "\n".join(["the quick brown fox jumps over the lazy dog and it runs away"] * 40),
    "repeated_lines": "\n".join(["This is the same line that repeats, again and again."] * 30),
    "repeated_paragraphs": "\n\n".join([SENTENCE * 2] * 10),
    "list_like": "\n".join(f"Item {i} of the list." for i in range(200)),
    "many_newlines": "The end of the text. " + "\n" * 300 + "It goes on and on, and the parties had to pay.",
    "crlf": "\r\n".join([SENTENCE] * 20),
    "unicode_line_breaks": "\u2028".join([SENTENCE] * 10) + "\n" + "\x85".join([SENTENCE] * 10),
    "lorem_ipsum": "\n".join([SENTENCE] * 8 + ["Lorem ipsum dolor sit amet, consectetur adipiscing elit."]),
    "curly_bracket": "\n".join([SENTENCE] * 8 + ["function f() { return the value of it; }."]),
    "javascript_and_policy": "\n".join([SENTENCE] * 6 + ["Please enable JavaScript to view the page, it is needed."]
                                       + ["By using this site you agree to our privacy policy and terms."]),
    "citations": "\n".join([SENTENCE.strip() + " [1]", SENTENCE + "[citation needed]", SENTENCE + "[edit]"] * 5),
    "ellipses": "\n".join(["And so it went on and on and on..."] * 10 + [SENTENCE] * 5),
    "bullets": "\n".join(["• the first point of the list is here."] * 20 + ["- and the other one is here."] * 5),
    "hashes": "# # # the title of the page #tag #tag\n" + SENTENCE * 3,
    "is_alpha": "\n".join([SENTENCE + "The flag IS_ALPHA is set for the word."] * 8),
    "emoticons_urls": "\n".join([SENTENCE + "See https://example.com/a.b?c=d :) and ¯\\_(ツ)_/¯ e.g. U.S.A. ok."] * 8),
    "nbsp_and_tabs": "\n".join([SENTENCE.replace(" ", "\u00a0") + "\tand\u3000more\u200bwords here."] * 8),
    "long_word": "\n".join([SENTENCE + "x" * 1500 + " is a long word."] * 6 + [SENTENCE] * 6),
    "digits_and_symbols": "\n".join(["12 34 56 78 90 !! ?? ** && %% $$ ## @@ == ++ -- ..."] * 20),
    "ngram_collisions": " ".join(["ab c", "a bc", "abc"] * 60) + ".",
    # past Gopher and C4, dropped by FineWeb (char_dup_ratio, short_line_ratio, line_punct_ratio)
    "fineweb_char_dup": "\n".join(sentences(1, 40, 10, 16) + sentences(1, 2, 10, 16)),
    "fineweb_short_lines": "\n".join(sentences(2, 60, 5, 5)),
    "fineweb_quoted_lines": "\n".join(s[:-1] + '."' if i % 10 else s for i, s in enumerate(sentences(3, 40, 8, 14))),
}


def tricky_texts() -> list[str]:
    return list(BAD_INPUTS.values())


# --------------------------------------------------------------------- configurations


def random_curation(seed: int) -> dict:
    """A CurationSpec as a recipe could write it: every threshold drawn, filters sometimes off."""
    rng = random.Random(seed)

    def maybe(value, p_none: float = 0.15):
        return None if rng.random() < p_none else value

    spec = CurationSpec(
        gopher_repetition=maybe({
            "dup_line_frac": maybe(rng.uniform(0.05, 0.5)),
            "dup_para_frac": maybe(rng.uniform(0.05, 0.5)),
            "dup_line_char_frac": maybe(rng.uniform(0.02, 0.4)),
            "dup_para_char_frac": maybe(rng.uniform(0.02, 0.4)),
            "top_n_grams": {n: rng.uniform(0.03, 0.3) for n in rng.sample(range(1, 6), rng.randint(0, 3))},
            "dup_n_grams": {n: rng.uniform(0.02, 0.25) for n in rng.sample(range(2, 13), rng.randint(0, 6))},
        }, 0.2),
        gopher_quality=maybe({
            "min_doc_words": maybe(rng.randint(1, 150)),
            "max_doc_words": maybe(rng.randint(300, 100_000)),
            "min_avg_word_length": maybe(rng.randint(1, 4)),
            "max_avg_word_length": maybe(rng.randint(6, 14)),
            "max_symbol_word_ratio": maybe(rng.uniform(0.01, 0.3)),
            "max_bullet_lines_ratio": maybe(rng.uniform(0.1, 1.0)),
            "max_ellipsis_lines_ratio": maybe(rng.uniform(0.05, 0.6)),
            "max_non_alpha_words_ratio": maybe(rng.uniform(0.4, 0.95)),
            "min_stop_words": maybe(rng.randint(0, 6)),
        }, 0.2),
        c4_quality=maybe({
            "split_paragraph": rng.random() < 0.8,
            "remove_citations": rng.random() < 0.5,
            "filter_no_terminal_punct": rng.random() < 0.7,
            "min_num_sentences": rng.choice([-1, 0, 1, 3, 5, 8, 15]),
            "min_words_per_line": rng.choice([-1, 1, 3, 6]),
            "max_word_length": rng.choice([-1, 20, 1000]),
            "filter_lorem_ipsum": rng.random() < 0.5,
            "filter_javascript": rng.random() < 0.5,
            "filter_curly_bracket": rng.random() < 0.5,
            "filter_policy": rng.random() < 0.5,
        }, 0.2),
        fineweb_quality=maybe({
            "line_punct_thr": rng.uniform(0.0, 0.4),
            "line_punct_exclude_zero": rng.random() < 0.5,
            "short_line_thr": rng.uniform(0.3, 1.0),
            "short_line_length": rng.randint(5, 60),
            "char_duplicates_ratio": rng.uniform(0.001, 0.2),
            "new_line_ratio": rng.uniform(0.01, 0.5),
        }, 0.2),
    )
    return spec.model_dump(mode="json")


def chain(curation: dict, path: str) -> list[tuple[str, object]]:
    return [(name, build_filter(name, curation[name], path)) for name in FILTERS if curation.get(name) is not None]


def judge(filters: list[tuple[str, object]], text: str) -> tuple:
    """What the chain does to one document: (step, raw result, text after), or the exception raised."""
    doc = Document(text=text, id="doc")
    for name, step in filters:
        try:
            result = step.filter(doc)
        except Exception as err:  # both sides must fail alike
            return name, ("raised", type(err).__name__, str(err)), doc.text
        if not get_filter_result(result)[0]:
            return name, result, doc.text
    return None, True, doc.text


def judge_all(curation: dict, texts: list[str], path: str) -> list[tuple]:
    filters = chain(curation, path)
    return [judge(filters, text) for text in texts]


def _warm_up() -> None:
    from datatrove.utils.word_tokenizers import load_word_tokenizer

    load_word_tokenizer("en").word_tokenize("warm up")


@pytest.fixture(scope="module")
def plain_side():
    """One process, kept for the module, that runs the plain datatrove side."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(_warm_up)
        yield pool


def assert_same_decisions(pool: ProcessPoolExecutor, curation: dict, texts: list[str]) -> dict[str, int]:
    """Fused and plain chains agree on every text; returns how many each step dropped (and kept)."""
    plain = pool.submit(judge_all, curation, texts, "datatrove")
    fast = chain(curation, "fused")
    assert [type(f).__mro__[1] for _, f in fast] == [type(f) for _, f in chain(curation, "datatrove")]
    fused_results = [judge(fast, text) for text in texts]
    outcomes: dict[str, int] = {}
    for i, (text, got, expected) in enumerate(zip(texts, fused_results, plain.result())):
        assert got == expected, f"text {i} ({text[:80]!r}): fused {got[:2]} vs datatrove {expected[:2]}"
        outcome = f"{expected[0]}:{get_filter_result(expected[1])[1]}" if expected[0] else "kept"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return outcomes


# --------------------------------------------------------------------- the stand-ins


def test_every_stand_in_is_on_for_this_datatrove():
    """The installed datatrove's sources are the reviewed ones (else a stand-in falls back, slower)."""
    assert all(fused.FAST_PATHS.values()), fused.FAST_PATHS
    assert fused.plain_spacy("en") and fused.whitespace_bound_holds("en")
    assert FILTERS == {name: cls.__mro__[1] for name, cls in fused.FUSED_FILTERS.items()}


def test_curation_path_knob(monkeypatch):
    monkeypatch.delenv(fused.PATH_ENV, raising=False)
    assert fused.curation_path() == "fused"
    monkeypatch.setenv(fused.PATH_ENV, " DataTrove ")
    assert fused.curation_path() == "datatrove"
    assert type(build_filter("c4_quality", {})) is C4QualityFilter
    assert fused.curation_path("fused") == "fused"
    assert type(build_filter("c4_quality", {}, "fused")) is fused.FusedC4Quality
    monkeypatch.setenv(fused.PATH_ENV, "fast")
    with pytest.raises(ValueError, match="FOUNDRY_CURATION_PATH"):
        fused.curation_path()


def test_rebind_runs_datatrove_code_and_refuses_unknown_names():
    rebound = fused.rebind(gopher_rep.find_duplicates)
    assert rebound.__code__ is gopher_rep.find_duplicates.__code__
    assert rebound(["a", "b", "a"]) == (1, 1)
    with pytest.raises(ValueError, match="does not call"):
        fused.rebind(GopherRepetitionFilter.filter, split_into_sentences=len)


def random_words(rng: random.Random) -> list[str]:
    alphabet = rng.choice(["ab", "abc", "a b", "xyz ", "ab\u00a0"])
    vocabulary = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 3))) for _ in range(rng.randint(1, 8))]
    return [rng.choice(vocabulary) for _ in range(rng.randint(0, 60))]


@pytest.mark.parametrize("hashed", [True, False])
def test_ngram_stand_ins_equal_datatrove_helpers(monkeypatch, hashed):
    if not hashed:  # texts above HASHED_TEXT_CHARS: every position scanned
        monkeypatch.setattr(fused, "HASHED_TEXT_CHARS", -1)
    rng = random.Random(7)
    for _ in range(3000):
        words = random_words(rng)
        n = rng.randint(1, 11)
        grams = fused.ngram_sequence(words, n)
        expected = gopher_rep.get_n_grams(words, n)
        assert len(grams) == len(expected) and bool(grams) == bool(expected)
        assert fused.repeated_ngram_chars(words, n) == gopher_rep.find_all_duplicate(words, n), (words, n)
        if expected:
            assert fused.top_duplicate_chars(fused.ngram_sequence(words, n)) == gopher_rep.find_top_duplicate(
                expected), (words, n)
            assert list(grams) == expected and grams[0] == expected[0] and grams == expected
    assert fused.ngram_sequence(("a", "b"), 1) == ["a", "b"]  # not a list: datatrove's own helper


@needs_samples
def test_ngram_stand_ins_on_sample_words():
    """Exact values (not only decisions) on real documents' words, every n the recipe might use."""
    for text in sample_texts(20, 4):
        words = split_into_words(text, "en")
        for n in range(1, 11):
            assert fused.repeated_ngram_chars(words, n) == gopher_rep.find_all_duplicate(words, n)
            if len(words) >= n:
                grams = gopher_rep.get_n_grams(words, n)
                assert fused.top_duplicate_chars(fused.ngram_sequence(words, n)) == gopher_rep.find_top_duplicate(grams)


def test_shared_words_are_datatrove_words(monkeypatch):
    texts = tricky_texts() + ["word " * 10, "Mr. O'Neil's co-op isn't (e.g.) 3.5% cheaper—really?!"]
    for text in texts:
        assert fused.shared_words(text, "en") == split_into_words(text, "en"), text[:60]
        assert len(text.split()) <= len(split_into_words(text, "en"))  # the bound FineWeb's first run uses
    monkeypatch.setattr(fused, "PERMANENT_STRINGS", 0)  # every text inside spaCy's memory zone
    fused.shared_words.cache_clear()
    for text in texts:
        assert fused.shared_words(text, "en") == split_into_words(text, "en")


@needs_samples
def test_shared_words_and_bound_on_samples():
    for text in sample_texts(40, 10):
        words = split_into_words(text, "en")
        assert fused.shared_words(text, "en") == words
        assert len(text.split()) <= len(words)


def test_c4_bound_is_a_lower_bound():
    from datatrove.utils.text import split_into_sentences

    for line in [" ", "a", "Hi.", "One. Two! Three? Four.", "e.g. this... and that", "\u2028", SENTENCE * 5]:
        assert len(split_into_sentences(line, "en")) >= len(fused.at_least_one_sentence(line, "en"))


# --------------------------------------------------------------------- the chain, document by document


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return sample_texts(60, 15) + tricky_texts()


@needs_samples
def test_default_chain_same_decisions(plain_side, texts):
    outcomes = assert_same_decisions(plain_side, CurationSpec().model_dump(mode="json"), texts)
    steps = {o.split(":")[0] for o in outcomes}
    assert {"kept", "gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality"} <= steps, outcomes


@needs_samples
@pytest.mark.parametrize("seed", [2, 3, 4, 9])  # draws whose decisions spread over all four filters
def test_random_thresholds_same_decisions(plain_side, texts, seed):
    assert_same_decisions(plain_side, random_curation(seed), texts[::3] + tricky_texts())


def test_bounds_fall_back_where_they_decide(plain_side):
    """FineWeb's list_ratio and C4's too_few_sentences come from the exact counts."""
    fineweb = {"new_line_ratio": 0.05, "short_line_thr": 1.0, "line_punct_thr": 0.0, "char_duplicates_ratio": 1.0}
    c4 = {"min_num_sentences": 4, "min_words_per_line": 1}
    texts = [
        "\n".join(["Word word word."] * 3),  # 1 sentence per line, 3 lines < 4 sentences
        "\n".join(["One. Two. Three."] * 2),  # 2 lines, 6 sentences
        "\n".join(["e.g. U.S. is one."] * 3),
        "a.b.c.d.e.f\n" * 5,  # one chunk per line, more words: list ratio from the exact count only
        "x, y, z, w\n" * 5,
    ]
    for curation in [{"c4_quality": c4}, {"fineweb_quality": fineweb}, {"c4_quality": c4, "fineweb_quality": fineweb}]:
        assert_same_decisions(plain_side, curation, texts)


def test_fused_c4_counts_line_statistics_once():
    text = "\n".join(["Word word word."] * 3 + ["no end"])
    plain, quick = C4QualityFilter(min_num_sentences=4), fused.FusedC4Quality(min_num_sentences=4)
    assert plain.filter(Document(text=text, id="a")) == quick.filter(Document(text=text, id="a"))
    counted = {k: v for k, v in quick.stats.to_dict().items() if k != "time_stats"}
    assert counted == {k: v for k, v in plain.stats.to_dict().items() if k != "time_stats"}
    assert counted["stats"]["line-total"] == 4


def test_fused_filters_pickle_with_their_parameters():
    import dill

    step = build_filter("gopher_repetition", {"top_n_grams": {2: 0.1}, "dup_n_grams": {}}, "fused")
    copy = dill.loads(dill.dumps(step))
    assert type(copy) is fused.FusedGopherRepetition and copy.top_n_grams == ((2, 0.1),) and copy.dup_n_grams == ()
    for cls in (fused.FusedGopherQuality, fused.FusedC4Quality, fused.FusedFineWebQuality):
        assert type(dill.loads(dill.dumps(cls()))) is cls
    assert isinstance(fused.FusedGopherQuality(), GopherQualityFilter)
    assert isinstance(fused.FusedFineWebQuality(), FineWebQualityFilter)


# --------------------------------------------------------------------- run_curation, end to end


def write_jsonl(path: Path, records: list[dict]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def curate(files: list[Path], curation: dict, folder: Path, shards: int, path: str) -> dict:
    """run_curation on one path: its counts, decision rows (by id) and every jsonl it wrote."""
    counts = run_curation(files=files, kind="jsonl", text_key="text", id_key="id", limit=None, shards=shards,
                          curation=curation, out_dir=folder, workers=1, path=path)
    rows = pq.read_table(folder / "decisions.parquet").to_pylist()
    return {
        "counts": counts,
        "rows": sorted(rows, key=lambda r: r["doc_id"]),
        "files": {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.jsonl"))},
    }


def curate_both(pool: ProcessPoolExecutor, files: list[Path], curation: dict, tmp: Path,
                shards: int) -> dict[str, dict]:
    plain = pool.submit(curate, files, curation, tmp / "datatrove", shards, "datatrove")
    quick = curate(files, curation, tmp / "fused", shards, "fused")
    return {"datatrove": plain.result(), "fused": quick}


def assert_same_run(both: dict[str, dict]) -> None:
    plain, quick = both["datatrove"], both["fused"]
    assert quick["counts"] == plain["counts"]
    assert quick["rows"] == plain["rows"]
    assert quick["files"].keys() == plain["files"].keys()
    for name, data in plain["files"].items():
        assert quick["files"][name] == data, name


@needs_samples
def test_run_curation_same_rows_counts_and_files(plain_side, tmp_path):
    """Default chain: FineWeb + Common Crawl + bad inputs, two shards."""
    records = sample_records(FINEWEB, 40) + sample_records(commoncrawl_files()[0], 40)
    records += [{"id": f"bad-{name}", "text": text} for name, text in BAD_INPUTS.items()]
    files = [write_jsonl(tmp_path / "input.jsonl.gz", records)]
    both = curate_both(plain_side, files, CurationSpec().model_dump(mode="json"), tmp_path, shards=2)
    assert_same_run(both)
    steps = {r["step"] for r in both["fused"]["rows"]}
    assert {"gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality"} <= steps, steps
    assert both["fused"]["counts"]["kept"] > 10


@needs_samples
def test_run_curation_web_chain_same(plain_side, tmp_path):
    """URL filter and language ID before the quality filters, with a random draw of thresholds."""
    records = [{"id": f"bad-{name}", "text": text, "url": f"https://example.org/{name}"}
               for name, text in BAD_INPUTS.items()]
    for r in sample_records(commoncrawl_files()[1], 50) + sample_records(FINEWEB, 330)[270:]:
        r["url"] = r.get("url") or r.get("metadata", {}).get("url")
        records.append(r)
    files = [write_jsonl(tmp_path / "input.jsonl.gz", records)]
    curation = {**random_curation(11), **CurationSpec(url_filter={}, language={}).model_dump(
        mode="json", include={"url_filter", "language"})}
    both = curate_both(plain_side, files, curation, tmp_path, shards=1)
    assert_same_run(both)
    assert {"language", "url_filter"} <= {r["step"] for r in both["fused"]["rows"]}


# --------------------------------------------------------------------- the slow sweep


@pytest.mark.slow
@pytest.mark.exhaustive
@needs_samples
def test_whole_samples_default_chain_same_decisions(plain_side):
    assert_same_decisions(plain_side, CurationSpec().model_dump(mode="json"), sample_texts(None, None))


@pytest.mark.slow
@pytest.mark.exhaustive
@needs_samples
@pytest.mark.parametrize("seed", range(100, 112))
def test_whole_samples_random_thresholds_same_decisions(plain_side, seed):
    texts = sample_texts(None, None)
    assert_same_decisions(plain_side, random_curation(seed), texts[seed % 4::4] + tricky_texts())


@pytest.mark.slow
@pytest.mark.exhaustive
@needs_samples
@pytest.mark.parametrize("web", [False, True])
def test_run_curation_on_whole_samples_same(plain_side, tmp_path, web):
    records = sample_records(FINEWEB)
    for path in commoncrawl_files():
        for r in sample_records(path):
            r["url"] = r.get("metadata", {}).get("url")
            records.append(r)
    files = [write_jsonl(tmp_path / "input.jsonl.gz", records)]
    spec = CurationSpec(url_filter={}, language={}) if web else CurationSpec()
    assert_same_run(curate_both(plain_side, files, spec.model_dump(mode="json"), tmp_path, shards=3))
