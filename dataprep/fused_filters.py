"""Fused curation: datatrove's quality filters, sharing the expensive work on each document.

The chain Gopher repetition -> Gopher quality -> C4 quality -> FineWeb quality, run by
datatrove alone, spends most of its time in spaCy (each document's words, then C4 splits
every kept line into sentences, then FineWeb tokenizes C4's rewritten text again) and in
Gopher repetition's n-gram counting, which builds a fresh string for every n-gram.

Here every filter is datatrove's own class and runs datatrove's own `filter` code: the same
code object, the same thresholds, the same order of checks and the same drop reasons. Only
the module-level helpers that code calls (`split_into_words`, `get_n_grams`, ...) are
resolved to stand-ins (`rebind`), and each stand-in is one of two kinds:

- exact: returns what datatrove's helper returns, for every input. `shared_words` is
  datatrove's word tokenization computed once per text (one spaCy pass, shared by Gopher
  repetition and Gopher quality, and by FineWeb where C4 left the text unchanged);
  `ngram_sequence`, `top_duplicate_chars` and `repeated_ngram_chars` count n-grams without
  building a string per n-gram where the answer is provably the same.
- bound: returns something smaller than datatrove's helper would, where the filter only
  compares its size against a threshold in one direction (C4's sentence count, FineWeb's word
  count). A result the bound cannot have changed is kept; anything else (a drop for that very
  reason, an exception) is recomputed with the exact helper. So the decision is always the one
  the exact computation gives, and the expensive computation runs only where it matters.

Each stand-in was proven against one version of datatrove's source: the source of every
helper and filter method it relies on is fingerprinted (`REVIEWED`). Where the installed
datatrove's source differs, that stand-in is not used (datatrove's own helper runs, a warning
says so), so a datatrove upgrade can make curation slower but never different.

The path is an execution knob ($FOUNDRY_CURATION_PATH=fused|datatrove, default fused): the
decisions are the same either way, so it is in no hash.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import types
from collections.abc import Callable, Iterator, Sequence
from functools import cache, lru_cache
from itertools import accumulate
from typing import Any

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from datatrove.pipeline.filters import gopher_repetition_filter as _gopher_rep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.utils import text as _text
from datatrove.utils.word_tokenizers import SpaCyTokenizer, load_word_tokenizer, strip_strings
from loguru import logger

PATH_ENV = "FOUNDRY_CURATION_PATH"
PATHS = ("fused", "datatrove")


def curation_path(value: str | None = None) -> str:
    """`fused` (default) or `datatrove`: `value`, else $FOUNDRY_CURATION_PATH, else fused."""
    raw = value if value is not None else os.environ.get(PATH_ENV)
    path = (raw or "fused").strip().lower()
    if path not in PATHS:
        raise ValueError(f"{PATH_ENV}={raw!r}: use one of {', '.join(PATHS)}")
    return path


# --------------------------------------------------------------------- reviewed sources

# sha256 of the source of each datatrove function a stand-in relies on (datatrove 0.10.1).
REVIEWED: dict[str, str] = {
    "datatrove.utils.text.split_into_words":
        "d1b062d9c14f3bfed00f935809c2c943732b2bb8ebda569a98490ec24789c611",
    "datatrove.utils.text.split_into_parts":
        "b12f48befbbb1f460976cddc75538740cc84c40df6459282a2af70c58ef3a6f7",
    "datatrove.utils.word_tokenizers.strip_strings":
        "f1482715002d3db46fcc794cb2c9376389717eee876516851bfed261f6d36ca5",
    "datatrove.utils.word_tokenizers.SpaCyTokenizer.word_tokenize":
        "7a41b6b3b74aab56a1eb5234260942f599932912aca491376c9a1cd72f3fe3fe",
    "datatrove.utils.word_tokenizers.SpaCyTokenizer._do_tokenize":
        "6f11747f267959f682ed025def255d0cfb5d13463894fdded98775880cbd0c96",
    "datatrove.pipeline.filters.gopher_repetition_filter.get_n_grams":
        "d0903494558223611f770f77ea48dde5ab25b79f19032ba638d441d912a79d6e",
    "datatrove.pipeline.filters.gopher_repetition_filter.find_top_duplicate":
        "a85a42e1b73c471a5b047febacec753525c062ba3cf861b2fff756fb91a0f45e",
    "datatrove.pipeline.filters.gopher_repetition_filter.find_all_duplicate":
        "1cdd7ab596cfb84f13c2818471f62bbb4f06f1f8eb5545a266b1711186e5826f",
    "datatrove.pipeline.filters.c4_filters.C4QualityFilter.filter":
        "62d59b94ad2c3fde20ac0eb9fbad9d6ebf999b1c08f0278766f59ed9b486f099",
    "datatrove.pipeline.filters.fineweb_quality_filter.FineWebQualityFilter.filter":
        "2fa6ed8dd1999bd5b3d7164ed3abd78c39c9b1680df82d5f34dfd0bf8578ce23",
}


def qualified_name(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def source_digest(obj: Any) -> str:
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()


def reviewed(*objs: Any) -> bool:
    """Whether each object's source is the one its stand-in was proven against."""
    for obj in objs:
        name = qualified_name(obj)
        try:
            same = REVIEWED.get(name) == source_digest(obj)
        except (OSError, TypeError):  # no source to compare with
            same = False
        if not same:
            logger.warning(f"fused curation: {name} differs from the reviewed datatrove source; using datatrove's own")
            return False
    return True


# Which stand-ins this datatrove allows (tests assert they are all on).
FAST_PATHS: dict[str, bool] = {
    "spacy_tokenizer_only": reviewed(_text.split_into_words, _text.split_into_parts, strip_strings,
                                     SpaCyTokenizer.word_tokenize, SpaCyTokenizer._do_tokenize),
    "ngrams": reviewed(_gopher_rep.get_n_grams, _gopher_rep.find_top_duplicate, _gopher_rep.find_all_duplicate),
    "c4_sentence_bound": reviewed(C4QualityFilter.filter, _text.split_into_words, _text.split_into_parts),
    "fineweb_word_bound": reviewed(FineWebQualityFilter.filter, _text.split_into_words, _text.split_into_parts,
                                   strip_strings, SpaCyTokenizer.word_tokenize, SpaCyTokenizer._do_tokenize),
}


def rebind(function: Callable, **stand_ins: Callable) -> Callable:
    """`function` (its very code object) with the named module globals resolved to stand-ins.

    Nothing is patched: datatrove's module and its other callers are untouched. A stand-in
    for a name the code does not look up is an error (a renamed helper must not go unseen).
    """
    unknown = set(stand_ins) - set(function.__code__.co_names)
    if unknown:
        raise ValueError(f"{qualified_name(function)} does not call {sorted(unknown)}")
    scope = {**function.__globals__, **stand_ins}
    bound = types.FunctionType(function.__code__, scope, function.__name__, function.__defaults__,
                               function.__closure__)
    bound.__kwdefaults__ = function.__kwdefaults__
    bound.__qualname__ = function.__qualname__
    bound.__doc__ = function.__doc__
    return bound


# --------------------------------------------------------------------- words, once per text

# spaCy creates a lexeme (with all its attributes) for every string it has not seen. datatrove
# tokenizes inside a memory zone, so every document's strings are new again. Here the strings
# of the first documents stay in the vocabulary (up to this many, from documents up to
# PERMANENT_TEXT_CHARS long): the common words are then found, not rebuilt. Tokens are the same
# either way (the vocabulary holds strings, not tokenization rules); only memory differs, and
# it is bounded by these two numbers.
PERMANENT_STRINGS = 200_000
PERMANENT_TEXT_CHARS = 200_000
# spaCy's tokenizer also caches how it split each run of non-space characters it met outside a
# memory zone, for up to 10,000 of them; more of them hit the cache here (a few MB per 100,000).
TOKENIZER_CACHE_SIZE = 300_000


def _spacy_words(tokenizer: SpaCyTokenizer, text: str) -> list[str]:
    """SpaCyTokenizer.word_tokenize(text) for a non-Japanese tokenizer, by the tokenizer alone.

    datatrove runs the whole blank pipeline (tokenizer, then its sentencizer, which only marks
    sentence starts) and keeps the tokens' text: the tokenizer's Doc has the same tokens.
    """
    nlp = tokenizer.tokenizer
    if len(text) <= PERMANENT_TEXT_CHARS and len(nlp.vocab.strings) < PERMANENT_STRINGS:
        if nlp.tokenizer.max_cache_size < TOKENIZER_CACHE_SIZE:
            nlp.tokenizer.max_cache_size = TOKENIZER_CACHE_SIZE
        return strip_strings([token.text for token in nlp.tokenizer(text)])
    with nlp.memory_zone():
        return strip_strings([token.text for token in nlp.tokenizer(text)])


@cache
def plain_spacy(language: str) -> bool:
    """Whether datatrove's tokenizer for `language` is the spaCy one `_spacy_words` stands in for:
    a blank pipeline whose only component is the sentencizer, not Japanese (re-chunked)."""
    tokenizer = load_word_tokenizer(language)
    return (FAST_PATHS["spacy_tokenizer_only"] and type(tokenizer) is SpaCyTokenizer and tokenizer.language != "ja"
            and tokenizer.tokenizer.pipe_names == ["sentencizer"])


@lru_cache(maxsize=8)
def shared_words(text: str, language: str = "en") -> list[str]:
    """datatrove's `split_into_words(text, language)`, computed once per text and shared.

    Like datatrove's own cache, every caller gets the same list (the filters only read it).
    """
    if plain_spacy(language) and "IS_ALPHA" not in text:  # datatrove's retry for that string stays its own
        return _spacy_words(load_word_tokenizer(language), text)
    return _text.split_into_words(text, language)


# --------------------------------------------------------------------- Gopher repetition n-grams


# Polynomial hashes of substrings, modulo 2**64 (numpy's uint64 arithmetic wraps): only ever
# used to rule out equality (different hashes, different strings), never to assert it. Texts
# longer than HASHED_TEXT_CHARS are scanned without them (the tables would grow with the text).
HASHED_TEXT_CHARS = 500_000
_HASH_BASE = 0x9E3779B97F4A7C15  # odd, so invertible modulo 2**64
_HASH_BASE_INVERSE = pow(_HASH_BASE, -1, 2**64)
_powers = np.ones(1, dtype=np.uint64)
_inverse_powers = np.ones(1, dtype=np.uint64)


def _hash_powers(size: int) -> tuple[np.ndarray, np.ndarray]:
    """B**t and B**-t (mod 2**64) for t < size at least."""
    global _powers, _inverse_powers
    if len(_powers) < size:
        size = max(size, 2 * len(_powers))
        one = np.ones(1, dtype=np.uint64)
        _powers = np.concatenate([one, np.cumprod(np.full(size - 1, _HASH_BASE, dtype=np.uint64))])
        _inverse_powers = np.concatenate([one, np.cumprod(np.full(size - 1, _HASH_BASE_INVERSE, dtype=np.uint64))])
    return _powers, _inverse_powers


class _Concatenation:
    """A word list's concatenation, where each word starts in it, and whether any holds a space."""

    __slots__ = ("words", "text", "starts", "has_space", "_prefix_hashes", "_start_array", "_ranks")

    def __init__(self, words: list[str]):
        self.words = words
        self.text = "".join(words)
        self.starts = list(accumulate(map(len, words), initial=0))  # starts[i]: where words[i] begins
        self.has_space = " " in self.text
        self._prefix_hashes: np.ndarray | None = None
        self._start_array: np.ndarray | None = None
        self._ranks: list[np.ndarray] = []  # _ranks[m - 1]: gram_ranks(m)

    def gram_ranks(self, n: int) -> np.ndarray:
        """For each n-gram (tuple of n words) in order, a number: equal numbers <=> equal tuples.

        Words are numbered by a dict (string equality); an (m + 1)-gram is the pair (its first
        m words' number, its last word's number), renumbered by np.unique: exact at every step.
        """
        if not self._ranks:
            numbers = {word: i for i, word in enumerate(dict.fromkeys(self.words))}
            self._ranks.append(np.fromiter(map(numbers.__getitem__, self.words), dtype=np.int64,
                                           count=len(self.words)))
        words = self._ranks[0]
        vocabulary = int(words.max()) + 1 if len(words) else 1
        while len(self._ranks) < n:
            m = len(self._ranks)
            pairs = self._ranks[-1][:-1] * vocabulary + words[m:]  # < len(words) * vocabulary: no overflow
            self._ranks.append(np.unique(pairs, return_inverse=True)[1].reshape(-1))
        return self._ranks[n - 1]

    def substring_hashes(self, n: int, count: int) -> np.ndarray:
        """hash(text[starts[i]:starts[i + n]]) for i < count: equal substrings, equal hashes."""
        if self._prefix_hashes is None:
            codes = np.frombuffer(self.text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
            powers, _ = _hash_powers(len(codes) + 1)
            prefix = np.zeros(len(codes) + 1, dtype=np.uint64)
            np.cumsum(codes.astype(np.uint64) * powers[: len(codes)], out=prefix[1:])
            self._prefix_hashes = prefix  # prefix[k] = sum of code[t] * B**t for t < k
            self._start_array = np.array(self.starts, dtype=np.int64)
        _, inverse_powers = _hash_powers(len(self._prefix_hashes))
        begin, end = self._start_array[:count], self._start_array[n : n + count]
        return (self._prefix_hashes[end] - self._prefix_hashes[begin]) * inverse_powers[begin]


_last_concatenation: tuple[list[str] | None, _Concatenation | None] = (None, None)


def _concatenation(words: list[str]) -> _Concatenation:
    """One per word list: the filter asks for it up to nine times in a row (the tuple keeps
    `words` alive, so `is` cannot match a new list at a reused address)."""
    global _last_concatenation
    held, concatenation = _last_concatenation
    if held is words and concatenation is not None:
        return concatenation
    concatenation = _Concatenation(words)
    _last_concatenation = (words, concatenation)
    return concatenation


class NGrams(Sequence):
    """datatrove's `get_n_grams(words, n)` as a lazy sequence: the same items, built on demand.

    Its length (and truth) needs no n-gram; `top_duplicate_chars` counts it without building
    its strings; anything else reads the list datatrove would have returned.
    """

    __slots__ = ("words", "n", "_items")

    def __init__(self, words: list[str], n: int):
        self.words = words
        self.n = n
        self._items: list[str] | None = None

    def _list(self) -> list[str]:
        if self._items is None:
            self._items = _gopher_rep.get_n_grams(self.words, self.n)
        return self._items

    def __len__(self) -> int:
        return max(0, len(self.words) - self.n + 1)

    def __getitem__(self, index):
        return self._list()[index]

    def __iter__(self) -> Iterator[str]:
        return iter(self._list())

    def __eq__(self, other) -> bool:
        return self._list() == (other._list() if isinstance(other, NGrams) else other)

    __hash__ = None  # like the list it stands for

    def __repr__(self) -> str:
        return f"NGrams({self._list()!r})"


def ngram_sequence(words, n):
    """Stand-in for `get_n_grams`: an `NGrams` (n >= 1, a list of words), else datatrove's list."""
    if type(words) is list and type(n) is int and n >= 1:
        return NGrams(words, n)
    return _gopher_rep.get_n_grams(words, n)


def top_duplicate_chars(n_grams) -> int:
    """Stand-in for `find_top_duplicate`: characters of the most frequent n-gram times its count.

    datatrove counts the strings " ".join(gram) and takes `Counter.most_common(1)`, i.e. the
    first n-gram (in order of first appearance) among those with the highest count. When no
    word holds a space, " ".join is one-to-one on n-tuples of words (splitting the string on
    " " gives the tuple back), so counting the tuples gives the same counts in the same order
    of first appearance, and len(" ".join(gram)) = sum of the word lengths + n - 1.
    """
    if type(n_grams) is NGrams and len(n_grams):
        concatenation = _concatenation(n_grams.words)
        if not concatenation.has_space:
            n = n_grams.n
            ranks = concatenation.gram_ranks(n)  # equal ranks <=> equal tuples of words
            counts = np.bincount(ranks)
            top = counts.max()
            first = int(np.argmax(counts[ranks] == top))  # where the first n-gram with that count starts
            starts = concatenation.starts
            return (starts[first + n] - starts[first] + n - 1) * int(top)
    return _gopher_rep.find_top_duplicate(n_grams)


def repeated_ngram_chars(words, n) -> int:
    """Stand-in for `find_all_duplicate`: datatrove's scan, over the same keys, built faster.

    datatrove's key for position i is "".join(words[i:i + n]): the slice of the whole
    concatenation between the starts of words i and i + n, the same string. Its scan walks the
    positions, adding each new key to a set and jumping n positions past a key already there.
    A key that occurs once in the document can never be found in that set: at such a position
    the scan only adds a key nobody looks up again and moves one position on. So the scan over
    the positions whose key occurs more than once (in order, skipping those a jump passed)
    meets the same repeated keys at the same positions; with no such position it returns 0.
    """
    if type(words) is not list or type(n) is not int or n < 1:
        return _gopher_rep.find_all_duplicate(words, n)
    count = len(words) - n + 1
    if count <= 0:
        return 0  # datatrove's loop does not run
    concatenation = _concatenation(words)
    text, starts = concatenation.text, concatenation.starts
    unique: set[str] = set()
    repeated_chars, idx = 0, 0
    for position in _maybe_repeated(concatenation, n, count):
        if position < idx:
            continue  # jumped over
        n_gram = text[starts[position] : starts[position + n]]
        if n_gram in unique:
            repeated_chars += len(n_gram)
            idx = position + n
        else:
            unique.add(n_gram)
            idx = position + 1
    assert repeated_chars <= len(text)  # datatrove's own check
    return repeated_chars


def _maybe_repeated(concatenation: _Concatenation, n: int, count: int) -> Sequence[int]:
    """Positions, in order, including every one whose key (see repeated_ngram_chars) occurs more
    than once: those whose key's hash does (equal keys have equal hashes)."""
    if len(concatenation.text) > HASHED_TEXT_CHARS:
        return range(count)  # every position: datatrove's own scan
    hashes = concatenation.substring_hashes(n, count)
    order = np.argsort(hashes, kind="stable")
    ordered = hashes[order]
    same = ordered[1:] == ordered[:-1]
    if not same.any():
        return []
    shared = np.zeros(count, dtype=bool)
    shared[order[1:][same]] = True
    shared[order[:-1][same]] = True
    return np.flatnonzero(shared).tolist()


# --------------------------------------------------------------------- bounds


class Undecided(Exception):
    """A bound cannot be given for this input: the exact computation runs."""


_ONE_SENTENCE = ("",)


def at_least_one_sentence(text: str, language: str = "en") -> tuple[str]:
    """A lower bound of `len(split_into_sentences(text, language))`, for C4's count.

    datatrove's split_into_parts(SENTENCE) returns one part per sentence span, and one part
    when there is none: never fewer than one.
    """
    return _ONE_SENTENCE


@cache
def whitespace_bound_holds(language: str) -> bool:
    """Whether len(text.split()) <= len(split_into_words(text, language)) for every text.

    True for datatrove's spaCy tokenizer (not Japanese, which re-chunks the text) when no
    special case mixes whitespace with other characters: spaCy cuts the text at whitespace
    (str.isspace, the same test as str.split and str.strip) and tokenizes each run of
    non-space characters into one or more tokens of its own characters; a special case only
    retokenizes tokens whose text (with the spaces between them) is the case's string, so
    tokens can join across whitespace only through a case whose string contains whitespace
    and something else. datatrove then drops the tokens that strip to nothing (whitespace):
    each of str.split()'s chunks keeps at least one token.
    """
    if not FAST_PATHS["fineweb_word_bound"] or not plain_spacy(language):
        return False
    rules = load_word_tokenizer(language).tokenizer.tokenizer.rules
    return all(case.isspace() or not any(ch.isspace() for ch in case) for case in rules)


def whitespace_words(text: str, language: str = "en") -> list[str]:
    """A lower bound of `split_into_words(text, language)` in length (see whitespace_bound_holds)."""
    if "IS_ALPHA" in text:  # datatrove retokenizes such a text without that string
        raise Undecided
    return text.split()


# --------------------------------------------------------------------- the filters


def _stand_ins(enabled: bool, **stand_ins: Callable) -> dict[str, Callable]:
    return stand_ins if enabled else {}


class FusedGopherRepetition(GopherRepetitionFilter):
    """datatrove's GopherRepetitionFilter: its words shared, its n-grams counted without strings."""

    filter = rebind(
        GopherRepetitionFilter.filter,
        split_into_words=shared_words,
        **_stand_ins(FAST_PATHS["ngrams"], get_n_grams=ngram_sequence, find_top_duplicate=top_duplicate_chars,
                     find_all_duplicate=repeated_ngram_chars),
    )


class FusedGopherQuality(GopherQualityFilter):
    """datatrove's GopherQualityFilter on the words Gopher repetition already has."""

    filter = rebind(GopherQualityFilter.filter, split_into_words=shared_words)


class _Quiet:
    """`self` for a filter's second run over one document: its statistics were counted by the first."""

    def __init__(self, step: BaseFilter):
        self._step = step

    def __getattr__(self, name: str):
        return getattr(self._step, name)

    def stat_update(self, *labels, value: int = 1, unit: str | None = None) -> None:
        pass


class FusedC4Quality(C4QualityFilter):
    """datatrove's C4QualityFilter; the sentences of the kept lines are counted only if needed.

    First run: every kept line counts as one sentence (a lower bound). The count only decides
    `too_few_sentences`, so any other result is the exact one (doc.text is rewritten just as
    the exact run would). A `too_few_sentences` result (fewer kept lines than
    min_num_sentences) is recomputed by datatrove's filter itself. Line statistics are counted
    once: they do not depend on the count.
    """

    _bounded = (rebind(C4QualityFilter.filter, split_into_sentences=at_least_one_sentence)
                if FAST_PATHS["c4_sentence_bound"] else None)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self._bounded is None or not self.split_paragraph or self.min_num_sentences == -1:
            return C4QualityFilter.filter(self, doc)  # no bound to use: the lines are sentences
        result = self._bounded(doc)
        if result != (False, "too_few_sentences"):
            return result
        return C4QualityFilter.filter(_Quiet(self), doc)


class FusedFineWebQuality(FineWebQualityFilter):
    """datatrove's FineWebQualityFilter; C4's rewritten text is tokenized only if needed.

    First run: whitespace-separated chunks stand in for the words (never more than the words,
    see whitespace_bound_holds). The word count only decides `list_ratio` (newlines / words
    above the threshold; fewer words only raise the ratio), so any other result is the exact
    one; `list_ratio` or an exception is recomputed with the exact words.
    """

    _exact = rebind(FineWebQualityFilter.filter, split_into_words=shared_words)
    _bounded = rebind(FineWebQualityFilter.filter, split_into_words=whitespace_words)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if whitespace_bound_holds(self.language):
            try:
                result = self._bounded(doc)
            except Exception:  # the exact run below raises what it raises
                result = None
            if result is not None and result != (False, "list_ratio"):
                return result
        return self._exact(doc)


FUSED_FILTERS: dict[str, type[BaseFilter]] = {
    "gopher_repetition": FusedGopherRepetition,
    "gopher_quality": FusedGopherQuality,
    "c4_quality": FusedC4Quality,
    "fineweb_quality": FusedFineWebQuality,
}
