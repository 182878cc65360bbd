"""`extractive`: question-answer and cloze items cut from the text by fixed rules, no model.

This is a heuristic, not a language model: it copies sentences and blanks or questions one
part of them. It exists so the demo and the tests run with no model, and as a floor that a
real rephraser must beat. Rules, applied to sentences of 6 to 60 words, in text order:

- definition ("X is/are/was/were Y."):  Question: What is X?  Answer: X is Y.
- cloze: blank the first number, else the first capitalised word after the first word, else
  the longest word of 7+ letters:  Fill in the blank: ... ____ ...  Answer: <word>

Style `qa` gives definitions first, then cloze items phrased as questions; style `cloze`
gives cloze items only. At most `max_items` items per chunk. Deterministic.
"""

from __future__ import annotations

import re
import time

from .types import OnResult, Request, Result

STYLES = ("qa", "cloze")
RULES_VERSION = "extractive-v1"  # bump when a rule changes: it is the "model" in every cache key

_SENTENCES = re.compile(r"(?<=[.!?])\s+(?=[\"'(A-Z0-9])")
_DEFINITION = re.compile(
    r"^(?P<subject>(?:(?:The|A|An) )?[A-Z][\w'’-]*(?: [\w'’-]+){0,7}?) "
    r"(?P<verb>is|are|was|were) (?P<rest>[^?!]{8,400})\.$"
)
_NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?![\w])")
_PRONOUNS = {"It", "This", "That", "These", "Those", "There", "He", "She", "They", "We", "I", "You"}
_PARTICIPLES = {"built", "made", "born", "held", "found", "given", "taken", "seen", "done", "sold", "written",
                "known", "shown", "run", "put", "set", "kept", "led", "brought", "thought", "not", "also"}
_WORD = re.compile(r"[A-Za-z][A-Za-z'’-]*")


def sentences(text: str) -> list[str]:
    out = []
    for s in _SENTENCES.split(" ".join(text.split())):
        if 6 <= len(s.split()) <= 60:
            out.append(s.strip())
    return out


def definition_item(sentence: str) -> str | None:
    m = _DEFINITION.match(sentence)
    if m is None:
        return None
    subject, first = m["subject"], m["subject"].split()[0]
    if first in _PRONOUNS:
        return None  # a pronoun subject makes a question nobody can answer out of context
    predicate = m["rest"].split()[0].lower()
    if predicate.endswith("ed") or predicate in _PARTICIPLES:
        return None  # passive voice ("was built in 1889") is an event, not a definition
    if first in ("The", "A", "An"):
        subject = subject[0].lower() + subject[1:]
    return f"Question: What {m['verb']} {subject}?\nAnswer: {sentence}"


def blank(sentence: str) -> tuple[str, str] | None:
    """(sentence with one salient token replaced by ____, the token), or None."""
    m = _NUMBER.search(sentence)
    if m is None:
        words = list(_WORD.finditer(sentence))
        capitalised = [w for w in words[1:] if w.group()[0].isupper() and len(w.group()) >= 3]
        if capitalised:
            m = capitalised[0]
        else:
            long_words = [w for w in words if len(w.group()) >= 7]
            if not long_words:
                return None
            m = max(long_words, key=lambda w: len(w.group()))  # first of the longest
    return sentence[:m.start()] + "____" + sentence[m.end():], m.group()


def extract_items(text: str, style: str, max_items: int) -> list[str]:
    items: list[str] = []
    candidates = sentences(text)
    if style == "qa":
        items.extend(item for s in candidates if (item := definition_item(s)))
    for s in candidates:
        if len(items) >= max_items:
            break
        cloze = blank(s)
        if cloze is None:
            continue
        question, answer = cloze
        if style == "qa":
            items.append(f"Question: Which word or number fills the blank? {question}\nAnswer: {answer}")
        else:
            items.append(f"Fill in the blank: {question}\nAnswer: {answer}")
    return items[:max_items]


class ExtractiveBackend:
    name = "extractive"
    model = RULES_VERSION

    def __init__(self, max_items: int = 8):
        self.max_items = max_items

    def generate(self, requests: list[Request], on_result: OnResult) -> None:
        for i, req in enumerate(requests):
            start = time.perf_counter()
            if req.style not in STYLES:
                on_result(i, Result(status="failed", reason=f"extractive backend has no style '{req.style}'"))
                continue
            items = extract_items(req.source_text, req.style, self.max_items)
            elapsed = time.perf_counter() - start
            if not items:
                on_result(i, Result(status="empty", reason="no sentence fits an extractive rule",
                                    tokens_in=len(req.source_text.split()), latency_s=elapsed))
                continue
            text = "\n\n".join(items)
            on_result(i, Result(status="ok", text=text, tokens_in=len(req.source_text.split()),
                                tokens_out=len(text.split()), latency_s=elapsed))
