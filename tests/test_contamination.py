"""Contamination: eval items that share a word 13-gram with training text are flagged."""

from __future__ import annotations

from assets.settings import data_root
from evaluation.contamination import eval_items, item_text, ngram_hashes, scan, words
from evaluation.tasks import check_tasks, load_records


def test_words_ignore_case_and_punctuation():
    assert words("The Cat's   hat -- 42!") == ["the", "cat", "s", "hat", "42"]
    assert len(ngram_hashes(words("a b c d e"), 3)) == 3
    assert ngram_hashes(words("a b"), 3) == set()


def test_a_copied_item_is_flagged_and_others_are_not():
    specs = check_tasks(["arc_easy", "winogrande"])
    items = eval_items(specs, data_root(), max_items=20, seed=0, n=13)
    assert len(items) == 40
    arc = load_records(specs[0], data_root())
    target = next(it for it, grams in items if it.task == "arc_easy" and it.ngrams > 0)
    copied = item_text(arc[target.item]).upper().replace(" ", "  ")  # case and spacing do not hide a copy
    clean = ["Completely unrelated text about the weather in spring and the price of bread in markets."] * 3
    docs = scan(items, [("clean", iter(clean)), ("leaky", iter(["Intro words here. " + copied + " trailing"]))], 13)
    assert docs == {"clean": 3, "leaky": 1}
    flagged = [it for it, _ in items if it.matched]
    assert [(it.task, it.item, it.corpus) for it in flagged] == [("arc_easy", target.item, "leaky")]
    assert len(target.matched) == target.ngrams  # the whole item was copied: every n-gram matches


def test_short_items_are_reported_unchecked():
    specs = check_tasks(["copa"])
    items = eval_items(specs, data_root(), max_items=None, seed=0, n=50)
    assert any(it.ngrams == 0 for it, _ in items)  # COPA items are shorter than 50 words
