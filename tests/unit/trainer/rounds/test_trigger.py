"""trainer.rounds.trigger: every way should_start answers, and config validation."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest

from trainer.rounds.trigger import TriggerConfig, should_start

CFG = TriggerConfig(min_new_ratings=200, max_interval_s=3600.0, min_ratings_for_timer=5)


def test_defaults_and_every_field_documented() -> None:
    default = TriggerConfig()
    assert (default.min_new_ratings, default.max_interval_s, default.min_ratings_for_timer) == (
        200,
        3600.0,
        1,
    )
    for f in fields(TriggerConfig):
        assert len(f.metadata.get("help", "")) > 20, f.name


def test_count_reached_starts_with_the_count_as_reason() -> None:
    assert should_start(250, 10.0, CFG) == "250 new ratings >= 200"
    assert should_start(200, 0.0, CFG) == "200 new ratings >= 200"  # boundary is inclusive


def test_first_round_starts_on_the_count_and_says_so() -> None:
    assert should_start(250, None, CFG) == "first round: 250 new ratings >= 200"


def test_first_round_never_starts_on_the_timer() -> None:
    assert should_start(199, None, CFG) is None
    assert should_start(0, None, CFG) is None


def test_below_count_and_before_the_interval_waits() -> None:
    assert should_start(199, 3599.9, CFG) is None


def test_timer_start_with_enough_ratings() -> None:
    assert should_start(12, 3600.0, CFG) == "3600 s since the last round and 12 new ratings"
    assert should_start(5, 7200.4, CFG) == "7200 s since the last round and 5 new ratings"


def test_timer_needs_min_ratings_for_timer() -> None:
    assert should_start(4, 10_000.0, CFG) is None
    assert should_start(0, 10_000.0, TriggerConfig()) is None  # never on zero new feedback
    assert should_start(1, 3600.0, TriggerConfig()) == (
        "3600 s since the last round and 1 new rating"
    )


def test_count_wins_over_timer_when_both_hold() -> None:
    assert should_start(300, 99_999.0, CFG) == "300 new ratings >= 200"


def test_infinite_interval_disables_the_timer() -> None:
    no_timer = TriggerConfig(max_interval_s=math.inf)
    assert should_start(150, 1e12, no_timer) is None
    assert should_start(200, 1e12, no_timer) == "200 new ratings >= 200"


def test_negative_interval_counts_as_just_now() -> None:
    assert should_start(50, -5.0, CFG) is None


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="new_ratings"):
        should_start(-1, 10.0, CFG)
    with pytest.raises(ValueError, match="NaN"):
        should_start(10, math.nan, CFG)


@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [
        ({"min_new_ratings": 0}, "min_new_ratings"),
        ({"min_new_ratings": 2.5}, "min_new_ratings"),
        ({"max_interval_s": 0.0}, "max_interval_s"),
        ({"max_interval_s": -1.0}, "max_interval_s"),
        ({"max_interval_s": math.nan}, "max_interval_s"),
        ({"min_ratings_for_timer": 0}, "min_ratings_for_timer"),
        ({"min_new_ratings": 10, "min_ratings_for_timer": 11}, "min_ratings_for_timer"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict, field_name: str) -> None:
    with pytest.raises(ValueError, match=f"TriggerConfig.{field_name} "):
        TriggerConfig(**kwargs)


def test_valid_edge_configs_are_accepted() -> None:
    TriggerConfig(min_new_ratings=1, max_interval_s=1e-3, min_ratings_for_timer=1)
    TriggerConfig(min_new_ratings=10, min_ratings_for_timer=10)
