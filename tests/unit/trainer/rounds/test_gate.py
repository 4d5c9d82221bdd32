"""Tests of :mod:`trainer.rounds.gate`."""

from __future__ import annotations

from trainer.rounds.config import RoundConfig
from trainer.rounds.gate import gate


def _evaluation(**overrides):
    base = {"win_rate": 0.7, "kl_to_reference": 2.0, "distinct_2_ratio": 0.95, "reward_gain": 0.4}
    return {**base, **overrides}


def test_gate_passes_and_names_every_failure():
    config = RoundConfig(gate_min_win_rate=0.5, gate_max_kl=5.0, gate_min_distinct_ratio=0.8)
    ok, reason = gate(_evaluation(), config)
    assert ok and reason.startswith("passed")
    ok, reason = gate(_evaluation(win_rate=0.4, kl_to_reference=7.5, distinct_2_ratio=0.5), config)
    assert not ok
    assert "win rate 0.400" in reason and "KL to reference 7.500" in reason
    assert "distinct-2 ratio 0.500" in reason
