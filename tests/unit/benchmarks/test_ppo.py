"""The PPO benchmark's pure helpers: the alternating run order and the ratio against the
better of TRL's configurations (benchmarks/ppo.py)."""

from __future__ import annotations

import pytest

from benchmarks.ppo import against_better, alternating_order


def test_order_alternates_so_no_side_always_runs_first() -> None:
    order = alternating_order(["alignloop", "trl_full", "trl_lora"], 4)
    assert order == [
        ["alignloop", "trl_full", "trl_lora"],
        ["trl_lora", "trl_full", "alignloop"],
        ["alignloop", "trl_full", "trl_lora"],
        ["trl_lora", "trl_full", "alignloop"],
    ]
    assert alternating_order(["alignloop"], 3) == [["alignloop"]] * 3


def test_speed_ratio_is_against_the_faster_configuration() -> None:
    ratio, against = against_better(90.0, {"trl_full": 40.0, "trl_lora": 45.0}, True)
    assert against == "trl_lora"
    assert ratio == pytest.approx(2.0)


def test_memory_ratio_is_against_the_smaller_configuration() -> None:
    ratio, against = against_better(100.0, {"trl_full": 400.0, "trl_lora": 250.0}, False)
    assert against == "trl_lora"
    assert ratio == pytest.approx(0.4)
