"""Contamination: n-gram overlap between eval items and the training data.

An item is contaminated when any of its word n-grams (13 by default, as in GPT-3's and
Llama's decontamination) occurs in a training document. Words are lowercased runs of letters
and digits, so punctuation and spacing differences do not hide a copy. The item text is what
the model is scored on: the prompt plus the gold answer (for WinoGrande the gold context and
the scored continuation). Items shorter than n words cannot be checked and are reported with
`ngrams = 0`.

Only the eval items' n-grams are held in memory (a dict of hashes); training documents are
streamed once, so this scales with the eval set, not the corpus.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from evaluation.tasks import TaskSpec, load_records, select_indices

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngram_hashes(tokens: list[str], n: int) -> set[int]:
    return {hash(tuple(tokens[i:i + n])) for i in range(len(tokens) - n + 1)}


def item_text(record: dict) -> str:
    gold = record["gold"]
    if "contexts" in record:  # partial scoring: the option sits in the context
        return f"{record['contexts'][gold]} {record['choices'][gold]}"
    return f"{record['query']} {record['choices'][gold]}"


@dataclass
class Item:
    task: str
    item: int  # the row of the task's source file, as in the eval_items table
    ngrams: int
    matched: set[int] = field(default_factory=set)
    corpus: str | None = None  # the first corpus a match was found in


def eval_items(specs: list[TaskSpec], data_root, max_items: int | None, seed: int, n: int) -> list[tuple[Item, set[int]]]:
    """The items the eval report scores (same seeded selection), each with its n-gram hashes."""
    out = []
    for spec in specs:
        records = load_records(spec, data_root)
        for i in select_indices(len(records), max_items, seed):
            grams = ngram_hashes(words(item_text(records[i])), n)
            out.append((Item(spec.name, int(records[i]["source_index"]), len(grams)), grams))
    return out


def scan(items: list[tuple[Item, set[int]]], corpora: Iterable[tuple[str, Iterable[str]]], n: int) -> dict[str, int]:
    """Mark each item's n-grams found in the documents of `corpora` ((name, texts) pairs)."""
    index: dict[int, list[Item]] = {}
    for item, grams in items:
        for g in grams:
            index.setdefault(g, []).append(item)
    docs = {}
    for name, texts in corpora:
        count = 0
        for text in texts:
            count += 1
            tokens = words(text)
            for i in range(len(tokens) - n + 1):
                hit = index.get(hash(tuple(tokens[i:i + n])))
                if hit:
                    g = hash(tuple(tokens[i:i + n]))
                    for item in hit:
                        item.matched.add(g)
                        item.corpus = item.corpus or name
        docs[name] = count
    return docs
