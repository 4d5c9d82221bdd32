"""Tests of :mod:`trainer.reward.config`."""

from __future__ import annotations

from trainer.reward.config import RewardConfig


def test_fingerprint_ignores_where_and_how_but_not_what() -> None:
    a = RewardConfig(steps=10)
    assert a.fingerprint() == RewardConfig(steps=10, progress=False, metrics_port=9).fingerprint()
    assert a.fingerprint() != RewardConfig(steps=11).fingerprint()
