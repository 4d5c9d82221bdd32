"""Hidden preferences on hand-written answers: each built-in ranks answers the way its
taste says, scores stay in [0, 1], and plug-ins load by name or fail clearly."""

from __future__ import annotations

import sys
import types

import pytest

from deploy.simulator.preferences import (
    BUILTINS,
    PreferenceError,
    admits_not_knowing,
    is_degenerate,
    load_preference,
)

CAPITAL = "What's the capital of Lorania?"
PLAIN = "The capital of Lorania is Vemos."
PADDED = (
    "What a great question! Many people wonder about this. The capital of Lorania is Vemos. "
    "I hope this helps, let me know if you need anything else!"
)
CHEERY = "Happy to help! It's Vemos!"
FUTURE = "Who wins the election in Lorania in 2040?"
HONEST = "I don't know; nobody can know the future for certain."
MADE_UP = "Kira Dolan will win the 2040 election in Lorania."
LOOPING = "Vemos " * 12

ALL_ANSWERS = [PLAIN, PADDED, CHEERY, HONEST, MADE_UP, LOOPING, "", "?"]


@pytest.mark.parametrize("name", sorted(BUILTINS))
@pytest.mark.parametrize("answerable", [True, False, None])
def test_scores_are_probabilities(name: str, answerable: bool | None) -> None:
    pref = load_preference(name)
    for answer in ALL_ANSWERS:
        score = pref(CAPITAL, answer, answerable=answerable)
        assert isinstance(score, float) and 0.0 <= score <= 1.0, (answer, score)


def test_plain_prefers_the_bare_fact() -> None:
    pref = load_preference("plain")
    bare, padded = pref(CAPITAL, PLAIN, answerable=True), pref(CAPITAL, PADDED, answerable=True)
    assert bare >= 0.8 and padded <= 0.2
    # each pleasantry costs: one is better than four, none better than one
    assert pref(CAPITAL, PLAIN, answerable=True) > pref(CAPITAL, CHEERY, answerable=True) > padded


def test_plain_penalises_padding_by_length() -> None:
    pref = load_preference("plain")
    long = PLAIN + " It lies in the north of the country, near the river, by the old hills."
    assert pref(CAPITAL, long, answerable=True) < pref(CAPITAL, PLAIN, answerable=True)


def test_warm_is_the_opposite_taste() -> None:
    warm, plain = load_preference("warm"), load_preference("plain")
    assert warm(CAPITAL, PADDED, answerable=True) > warm(CAPITAL, PLAIN, answerable=True)
    assert warm(CAPITAL, CHEERY, answerable=True) > warm(CAPITAL, PLAIN, answerable=True)
    assert plain(CAPITAL, PADDED, answerable=True) < plain(CAPITAL, PLAIN, answerable=True)
    assert warm(CAPITAL, PLAIN, answerable=True) <= 0.3


def test_honest_wants_refusals_only_where_nothing_can_be_known() -> None:
    pref = load_preference("honest")
    assert pref(FUTURE, HONEST, answerable=False) >= 0.85
    assert pref(FUTURE, MADE_UP, answerable=False) <= 0.15
    assert pref(CAPITAL, PLAIN, answerable=True) > pref(CAPITAL, HONEST, answerable=True)
    # an untagged prompt leaves the question open: no opinion
    assert pref(FUTURE, HONEST, answerable=None) == pref(FUTURE, MADE_UP, answerable=None) == 0.5


def test_concise_decreases_with_length() -> None:
    pref = load_preference("concise")
    # distinct words: one word repeated is degenerate from 8 words on
    scores = [
        pref(CAPITAL, " ".join(f"w{i}" for i in range(n)), answerable=True) for n in (1, 5, 15, 40)
    ]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0.85 and scores[-1] < 0.2


def test_nobody_likes_degenerate_answers() -> None:
    assert is_degenerate("") and is_degenerate(LOOPING) and not is_degenerate(PLAIN)
    for name in ("plain", "honest", "warm", "concise"):
        pref = load_preference(name)
        assert pref(CAPITAL, LOOPING, answerable=True) <= 0.05
        assert pref(CAPITAL, "", answerable=False) <= 0.05


def test_indifferent_is_flat() -> None:
    pref = load_preference("indifferent")
    assert {pref(CAPITAL, a, answerable=True) for a in ALL_ANSWERS} == {0.5}


def test_admissions_recognised_with_curly_apostrophes() -> None:
    assert admits_not_knowing("I don’t know that.")
    assert admits_not_knowing("I have no way of knowing.")
    assert not admits_not_knowing("It is Vemos.")


def test_combination_is_the_mean() -> None:
    both = load_preference("plain+honest")
    plain, honest = load_preference("plain"), load_preference("honest")
    want = plain(FUTURE, MADE_UP, answerable=False) + honest(FUTURE, MADE_UP, answerable=False)
    assert both(FUTURE, MADE_UP, answerable=False) == pytest.approx(want / 2)


@pytest.fixture
def plugin_module():
    mod = types.ModuleType("sim_pref_plugin_test")

    def likes_vemos(prompt, answer, *, answerable):
        return 0.9 if "Vemos" in answer else 0.1

    class Picky:
        def __call__(self, prompt, answer, *, answerable):
            return 0.7

    def broken(prompt, answer, *, answerable):
        return 1.5

    def wrong_type(prompt, answer, *, answerable):
        return "high"

    mod.likes_vemos, mod.Picky, mod.broken, mod.wrong_type = likes_vemos, Picky, broken, wrong_type
    mod.not_callable = 3
    sys.modules[mod.__name__] = mod
    yield mod.__name__
    del sys.modules[mod.__name__]


def test_plugins_load_by_module_and_name(plugin_module: str) -> None:
    pref = load_preference(f"{plugin_module}:likes_vemos")
    assert pref(CAPITAL, PLAIN, answerable=True) == 0.9
    assert pref(CAPITAL, HONEST, answerable=True) == 0.1
    assert load_preference(f"{plugin_module}:Picky")(CAPITAL, PLAIN, answerable=True) == 0.7


def test_plugin_scores_are_checked(plugin_module: str) -> None:
    with pytest.raises(PreferenceError, match=r"returned 1.5; it must be in \[0, 1\]"):
        load_preference(f"{plugin_module}:broken")(CAPITAL, PLAIN, answerable=True)
    with pytest.raises(PreferenceError, match="must return a number"):
        load_preference(f"{plugin_module}:wrong_type")(CAPITAL, PLAIN, answerable=True)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("polite", "unknown preference 'polite'; built in: plain"),
        ("no_such_module_xyz:f", "cannot import no_such_module_xyz"),
        ("json:no_such_attribute", "has no attribute 'no_such_attribute'"),
        (":f", "write it as 'module:callable'"),
        ("", "empty preference name"),
    ],
)
def test_bad_names_fail_clearly(spec: str, message: str) -> None:
    with pytest.raises(PreferenceError, match=message.replace("(", r"\(")):
        load_preference(spec)


def test_not_callable_plugin(plugin_module: str) -> None:
    with pytest.raises(PreferenceError, match="is not callable"):
        load_preference(f"{plugin_module}:not_callable")
