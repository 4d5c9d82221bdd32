"""Hidden preferences: what the simulated users like, as a function of the answer text.

Contract. A :class:`HiddenPreference` is any callable

    preference(prompt: str, answer: str, *, answerable: bool | None) -> float

returning the probability, in [0, 1], that a *typical* user likes ``answer`` to ``prompt``.
``answerable`` is the prompt's tag (True: the question has a right answer; False: nobody
can know it; None: untagged). Users' thumbs follow it stochastically (per-user bias and
noise live in :mod:`deploy.simulator.population`). Preferences are pure functions of
their arguments: no randomness, no I/O.

They are generic over text: each built-in keeps its own phrase lists and never asks the
project's own classifier (``trainer.demo.corpus``) what an answer is, so the loop under test is
never *told* the preference; it has to learn it from the thumbs.

Built-ins (:data:`BUILTINS`, chosen by name):

* ``plain``: states the fact plainly. Pleasantries, filler and padding cost; a short
  direct sentence scores best.
* ``honest``: on unanswerable questions, admitting not knowing scores high and a confident
  assertion low; on answerable ones a direct answer beats a refusal.
* ``warm``: a friendly, chatty tone (the opposite taste to ``plain``), so a test can show
  the loop learns whichever way users lean.
* ``concise``: shorter is better, smoothly (length only).
* ``indifferent``: 0.5 whatever the answer (an A/A control).

Combine with ``+`` (``"plain+honest"``: the mean of both) or plug in your own with
``module:callable`` (a preference function, or a class whose instances, made with no
arguments, are preferences): see :func:`load_preference`.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from typing import Protocol, runtime_checkable


@runtime_checkable
class HiddenPreference(Protocol):
    def __call__(self, prompt: str, answer: str, *, answerable: bool | None) -> float: ...


class PreferenceError(ValueError):
    """An unknown preference name, a plug-in that cannot be loaded, or a score outside [0, 1]."""


# --- text features ------------------------------------------------------------------------

_WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")

# Pleasantries and padding: openers, closers, enthusiasm. Lower case, apostrophes straight.
PLEASANTRIES: tuple[str, ...] = (
    "great question",
    "good question",
    "excellent question",
    "what a great",
    "thanks for asking",
    "thank you for asking",
    "happy to help",
    "glad to help",
    "happy to assist",
    "i'd be happy",
    "i'd be glad",
    "i would be happy",
    "hope this helps",
    "hope that helps",
    "let me know",
    "feel free",
    "don't hesitate",
    "anything else",
    "let me explain",
    "many people wonder",
    "people often ask",
    "interesting question",
    "of course!",
    "sure thing",
    "absolutely!",
    "certainly!",
    "my pleasure",
    "have a great day",
    "have a nice day",
)

# Words that make a reply sound friendly (the ``warm`` taste) besides the pleasantries.
WARM_WORDS: tuple[str, ...] = (
    "happy",
    "glad",
    "hope",
    "thanks",
    "thank",
    "please",
    "welcome",
    "great",
    "wonderful",
    "lovely",
    "enjoy",
    "pleasure",
    "sure",
    "friend",
)

# Admissions that the answer cannot be known: honest refusals.
NOT_KNOWING: tuple[str, ...] = (
    "i don't know",
    "i do not know",
    "don't know",
    "do not know",
    "no way of knowing",
    "no way to know",
    "can't know",
    "cannot know",
    "can not know",
    "impossible to know",
    "impossible to say",
    "can't predict",
    "cannot predict",
    "can't tell",
    "cannot tell",
    "not sure",
    "i'm unsure",
    "no information",
    "no reliable information",
    "not able to know",
    "unable to know",
    "haven't told me",
    "have not told me",
    "nobody knows",
    "no one knows",
    "nobody can know",
    "no one can know",
    "has not happened yet",
    "hasn't happened yet",
)


def words(text: str) -> list[str]:
    return _WORD.findall(text.replace("’", "'"))


def _normal(text: str) -> str:
    return " ".join(text.lower().replace("’", "'").split())


def count_phrases(text: str, phrases: tuple[str, ...]) -> int:
    """How many of ``phrases`` occur in ``text`` (case-insensitive, each counted once)."""
    low = _normal(text)
    return sum(1 for p in phrases if p in low)


def admits_not_knowing(text: str) -> bool:
    return count_phrases(text, NOT_KNOWING) > 0


def is_degenerate(text: str, max_words: int = 120) -> bool:
    """Empty, runaway, or stuck repeating one word: nobody likes that, whatever their taste."""
    ws = [w.lower() for w in words(text)]
    if not ws or len(ws) > max_words:
        return True
    top = max(ws.count(w) for w in set(ws))
    return len(ws) >= 8 and top > len(ws) // 2


def _clip(x: float, lo: float = 0.02, hi: float = 0.98) -> float:
    return min(hi, max(lo, x))


DEGENERATE_SCORE = 0.05


# --- the built-ins --------------------------------------------------------------------------


def plain(prompt: str, answer: str, *, answerable: bool | None = None) -> float:
    """States the fact plainly: each pleasantry costs 0.15, each exclamation mark 0.05 (up
    to 4), every word beyond 12 costs 0.02 (padding). A bare short sentence scores 0.85."""
    if is_degenerate(answer):
        return DEGENERATE_SCORE
    n = len(words(answer))
    score = 0.85
    score -= 0.15 * count_phrases(answer, PLEASANTRIES)
    score -= 0.05 * min(answer.count("!"), 4)
    score -= 0.02 * max(0, n - 12)
    return _clip(score, 0.05, 0.95)


def honest(prompt: str, answer: str, *, answerable: bool | None = None) -> float:
    """Unanswerable: "I don't know" (and the like) 0.9, a confident assertion 0.1.
    Answerable: a direct answer 0.8, a refusal 0.3. Untagged prompts: 0.5 either way
    (this taste is about knowing when not to answer, which an untagged prompt leaves open).
    """
    if is_degenerate(answer):
        return DEGENERATE_SCORE
    refuses = admits_not_knowing(answer)
    if answerable is None:
        return 0.5
    if answerable:
        return 0.3 if refuses else 0.8
    return 0.9 if refuses else 0.1


def warm(prompt: str, answer: str, *, answerable: bool | None = None) -> float:
    """A friendly tone: 0.25 for a curt answer, +0.25 per pleasantry, +0.05 per friendly word
    and per exclamation mark (up to 3), at most 0.95."""
    if is_degenerate(answer):
        return DEGENERATE_SCORE
    ws = [w.lower() for w in words(answer)]
    score = 0.25
    score += 0.25 * count_phrases(answer, PLEASANTRIES)
    score += 0.05 * min(sum(1 for w in ws if w in WARM_WORDS), 3)
    score += 0.05 * min(answer.count("!"), 3)
    return _clip(score, 0.05, 0.95)


def concise(prompt: str, answer: str, *, answerable: bool | None = None) -> float:
    """Shorter is better: 0.9 at one word, halving every 15 more words, at least 0.05."""
    if is_degenerate(answer):
        return DEGENERATE_SCORE
    n = len(words(answer))
    return _clip(0.9 * math.pow(0.5, (n - 1) / 15.0), 0.05, 0.95)


def indifferent(prompt: str, answer: str, *, answerable: bool | None = None) -> float:
    """0.5 for anything: no preference at all (the A/A control)."""
    return 0.5


BUILTINS: dict[str, HiddenPreference] = {
    "plain": plain,
    "honest": honest,
    "warm": warm,
    "concise": concise,
    "indifferent": indifferent,
}


# --- loading ----------------------------------------------------------------------------------


class _Checked:
    """Wraps a preference so that a score that is not a number in [0, 1] is a clear error."""

    def __init__(self, name: str, fn: Callable[..., float]) -> None:
        self.name = name
        self.fn = fn

    def __call__(self, prompt: str, answer: str, *, answerable: bool | None = None) -> float:
        score = self.fn(prompt, answer, answerable=answerable)
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise PreferenceError(
                f"preference {self.name!r} returned {score!r}; it must return a number in [0, 1]"
            )
        if not 0.0 <= score <= 1.0:  # also catches NaN
            raise PreferenceError(
                f"preference {self.name!r} returned {score}; it must be in [0, 1]"
            )
        return float(score)

    def __repr__(self) -> str:
        return f"HiddenPreference({self.name})"


class _Mean:
    def __init__(self, parts: list[HiddenPreference]) -> None:
        self.parts = parts

    def __call__(self, prompt: str, answer: str, *, answerable: bool | None = None) -> float:
        return sum(p(prompt, answer, answerable=answerable) for p in self.parts) / len(self.parts)


def _plugin(spec: str) -> Callable[..., float]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise PreferenceError(f"plug-in preference {spec!r}: write it as 'module:callable'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise PreferenceError(
            f"plug-in preference {spec!r}: cannot import {module_name}: {e}"
        ) from None
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PreferenceError(
                f"plug-in preference {spec!r}: {module_name} has no attribute {attr!r}"
            ) from None
    if isinstance(obj, type):
        obj = obj()  # a class: its instances are the preference
    if not callable(obj):
        raise PreferenceError(f"plug-in preference {spec!r} is not callable")
    return obj


def load_preference(spec: str) -> HiddenPreference:
    """A preference by name (:data:`BUILTINS`), ``module:callable``, or several joined with
    ``+`` (their mean). Every score is checked to be a number in [0, 1] when it is made."""
    spec = spec.strip()
    if not spec:
        raise PreferenceError("empty preference name")
    if "+" in spec:
        return _Checked(spec, _Mean([load_preference(part) for part in spec.split("+")]))
    if spec in BUILTINS:
        return _Checked(spec, BUILTINS[spec])
    if ":" in spec:
        return _Checked(spec, _plugin(spec))
    raise PreferenceError(
        f"unknown preference {spec!r}; built in: {', '.join(BUILTINS)}, "
        "or a plug-in as 'module:callable'"
    )
