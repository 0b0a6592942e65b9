"""Judge-free scoring does not depend on phrasing (issue 23, point 4): on the real MUSIC-AVQA and
NExT-QA excerpts, an always-right model scores 100 % however it phrases the right answer (digits,
words, letters, option texts with an article) and an always-wrong one scores 0 %."""

from __future__ import annotations

import pytest

from nemo_avllm.evaluation import benchmarks as B
from nemo_avllm.evaluation import metrics as M
from tests.evaluation.test_readers_metrics import FIXTURES

L = "ABCDE"


def _digits(answer: str) -> str:
    return " ".join(M.NUMBERS.get(w, w) for w in answer.split())


MUSIC_PHRASINGS = {
    "word": lambda a: a, "digits": _digits, "digits.": lambda a: _digits(a) + ".",
    "There are 2.": lambda a: f"There are {_digits(a)}.", "Two.": lambda a: a.capitalize() + ".",
    "The answer is two": lambda a: f"The answer is {a}",
}


@pytest.mark.parametrize("phrasing", sorted(MUSIC_PHRASINGS))
def test_music_avqa_always_right_scores_100(phrasing):
    items = B.read("music_avqa", annotations=FIXTURES / "music_avqa/avqa-test.head150.json")
    r = M.exact_accuracy({it.qid: MUSIC_PHRASINGS[phrasing](str(it.answer)) for it in items}, items)
    assert r["n"] == 150 and r["accuracy"] == 1.0


def test_music_avqa_always_wrong_scores_0():
    items = B.read("music_avqa", annotations=FIXTURES / "music_avqa/avqa-test.head150.json")
    rival = {"yes": "no", "no": "yes", "one": "2", "left": "right"}
    wrong = {it.qid: rival.get(str(it.answer), "one") for it in items}
    r = M.exact_accuracy(wrong, items)
    assert r["accuracy"] == 0.0
    # naming both answers, or a second number, is wrong whatever the reference
    both = {it.qid: f"{it.answer} or {'no' if it.answer == 'yes' else 'yes'}" for it in items if it.answer in ("yes", "no")}
    assert M.exact_accuracy(both, items)["accuracy"] == 0.0
    assert not M.closed_match("two or three", "two") and not M.closed_match("2 or 3", "three")
    assert M.closed_match("Two.", "2") and M.closed_match("more than 10", "more than ten")


CHOICE_PHRASINGS = {
    "B": lambda it, k: L[k], "(B)": lambda it, k: f"({L[k]})", "b": lambda it, k: L[k].lower(),
    "B.": lambda it, k: f"{L[k]}.", "[B]": lambda it, k: f"[{L[k]}]", "Answer: b": lambda it, k: f"Answer: {L[k].lower()}",
    "The answer is B.": lambda it, k: f"The answer is {L[k]}.", "B) text": lambda it, k: f"{L[k]}) {it.options[k]}",
    "(b) text": lambda it, k: f"({L[k].lower()}) {it.options[k]}", "text": lambda it, k: it.options[k],
    "A text.": lambda it, k: f"A {it.options[k]}.", "The answer is a text": lambda it, k: f"The answer is a {it.options[k]}",
    "The Text!": lambda it, k: f"The {it.options[k].capitalize()}!",
}


@pytest.mark.parametrize("split", ["val", "test"])
def test_nextqa_always_right_scores_100_in_every_phrasing(split):
    items = B.read("nextqa", annotations=FIXTURES / f"nextqa/{split}.head150.csv")
    for name, phrase in CHOICE_PHRASINGS.items():
        r = M.choice_accuracy({it.qid: phrase(it, it.meta["answer_index"]) for it in items}, items)
        assert (name, r["accuracy"], r["unparseable"]) == (name, 1.0, 0)
        wrong = M.choice_accuracy({it.qid: phrase(it, (it.meta["answer_index"] + 1) % 5) for it in items}, items)
        assert (name, wrong["accuracy"]) == (name, 0.0)


@pytest.mark.parametrize("text,want", [
    ("A cloth hanging on his shirt.", 1), ("The answer is a cloth hanging on his shirt", 1), ("b", 1),
    ("a", 0), ("(a)", 0), ("A) man", 0), ("a man", 2), ("Answer: a man", 2), ("the man in red", 3),
    ("I do not know", None), ("Both a man and a woman", None), ("Answering the phone.", 4), ("Option E", 4)])
def test_extract_choice_articles_and_lone_letters(text, want):
    assert M.extract_choice(text, ["a woman", "cloth hanging on his shirt", "man", "a man in red", "answering the phone"]) == want


def test_no_answers_is_no_score():
    """Nothing scored reads as None, not 0.0 (issue 23, point 2)."""
    items = B.read("music_avqa", annotations=FIXTURES / "music_avqa/avqa-test.head150.json")
    assert M.exact_accuracy({}, items) == {"accuracy": None, "n": 0, "by_type": {}, "correct": {}}
    assert M.choice_accuracy({}, [])["accuracy"] is None
