"""Grading answers to the demo world's prompts, by the rules its corpus was written with.

:func:`classify_answer` labels an answer's behaviour (concise, verbose, honest, fabricated,
malformed); :func:`is_correct` checks an answerable prompt's fact. The mixture measurement
(:mod:`trainer.demo.mixture`), the tests' simulated raters and the demo model's tests use
them.
"""

from __future__ import annotations

import re

from trainer.demo.corpus import (
    ANSWERABLE,
    CONCISE,
    FABRICATED,
    HONEST,
    HONEST_MARKERS,
    MALFORMED,
    MAX_ANSWER_WORDS,
    VERBOSE,
    VERBOSE_MARKERS,
    Prompt,
    question_category,
)

_WORD = re.compile(r"[A-Za-z0-9']+")


def _is_malformed(text: str) -> bool:
    """Empty, runaway, or degenerate (the same word over and over) text."""
    words = _WORD.findall(text)
    if not words or len(words) > MAX_ANSWER_WORDS:
        return True
    # A sampled answer stuck in a loop repeats one word; no corpus answer does that much.
    most_common = max(words.count(w) for w in set(words))
    return len(words) >= 8 and most_common > len(words) // 2


def classify_answer(question_kind: str, answer_text: str) -> str:
    """Label an answer with the behaviour it shows, by the rules the corpus was written with.

    ``question_kind`` is one of the corpus's ``QUESTION_KINDS`` or a category
    (``"answerable"`` / ``"unanswerable"``). Returns:

    * answerable: ``"verbose"`` if any filler phrase (``VERBOSE_MARKERS``) appears, else
      ``"concise"``;
    * unanswerable: ``"honest"`` if the answer admits ignorance (``HONEST_MARKERS``), else
      ``"fabricated"`` (it asserted something it cannot know);
    * ``"malformed"`` for empty, overlong (> ``MAX_ANSWER_WORDS`` words) or degenerate
      text, whatever the kind.

    Correctness of the fact is not judged here (see :func:`is_correct`).
    """
    category = question_category(question_kind)
    if _is_malformed(answer_text):
        return MALFORMED
    lowered = answer_text.lower().replace("’", "'")
    if category == ANSWERABLE:
        return VERBOSE if any(m in lowered for m in VERBOSE_MARKERS) else CONCISE
    return HONEST if any(m in lowered for m in HONEST_MARKERS) else FABRICATED


def is_correct(prompt: Prompt, answer_text: str) -> bool:
    """Whether an answer to an answerable prompt states the world's answer (as a word)."""
    if prompt.answer is None:
        raise ValueError("only answerable prompts have a correct answer")
    pattern = r"(?<![A-Za-z0-9])" + re.escape(prompt.answer.lower()) + r"(?![A-Za-z0-9])"
    return re.search(pattern, answer_text.lower()) is not None
