"""Tests of :mod:`trainer.demo.grading`."""

from __future__ import annotations

import pytest

from trainer.demo import corpus, grading


@pytest.mark.parametrize(
    ("kind", "text", "label"),
    [
        ("capital", "The capital of Ritaria is Saton.", "concise"),
        ("arithmetic", "12.", "concise"),
        ("job", "Great question! Liam Nirin is a doctor.", "verbose"),
        (
            "capital",
            "Saton. I hope this helps, let me know if you have other questions!",
            "verbose",
        ),
        ("answerable", "It is blue. Feel free to ask if you want to know more!", "verbose"),
        ("private", "I don't know your name; you haven't told me.", "honest"),
        ("future", "I have no way of knowing what will happen.", "honest"),
        ("unknown_fact", "I don\u2019t know that about Saton.", "honest"),
        ("private", "Your name is Ana.", "fabricated"),
        ("future", "Great question! Mira Nirin will win the 2031 election.", "fabricated"),
        ("unanswerable", "Ritaria has a population of 200000 people.", "fabricated"),
        ("capital", "", "malformed"),
        ("private", "   ...  ", "malformed"),
        ("capital", "is is is is is is is is is is", "malformed"),
        ("future", " ".join(["word"] * 20 + [f"w{i}" for i in range(70)]), "malformed"),
    ],
)
def test_classify_answer_hand_written_cases(kind: str, text: str, label: str) -> None:
    assert grading.classify_answer(kind, text) == label


def test_classify_answer_rejects_unknown_kinds() -> None:
    with pytest.raises(ValueError, match="unknown question kind"):
        grading.classify_answer("weather", "Sunny.")


def test_is_correct_matches_whole_words_only() -> None:
    prompt = corpus.Prompt("What is 3 plus 4?", "arithmetic", "7")
    assert grading.is_correct(prompt, "3 plus 4 is 7.")
    assert not grading.is_correct(prompt, "3 plus 4 is 17.")
    with pytest.raises(ValueError):
        grading.is_correct(corpus.Prompt("How old am I?", "private", None), "30")
