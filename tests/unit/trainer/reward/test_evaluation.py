"""Tests of :mod:`trainer.reward.evaluation`."""

from __future__ import annotations

from trainer.reward.config import RewardConfig
from trainer.reward.evaluation import gate


def _metrics(accuracy: float | None, thumbs_auc: float | None) -> dict:
    return {"pairwise_accuracy": accuracy, "auc": thumbs_auc}


CONFIG = RewardConfig(min_pairwise_accuracy=0.7, min_auc=0.6, regression_tolerance=0.02)


def test_gate_accepts_a_good_first_version() -> None:
    accepted, reason = gate(_metrics(0.9, 0.8), None, CONFIG)
    assert accepted, reason
    assert "passed" in reason


def test_gate_applies_the_bars() -> None:
    accepted, reason = gate(_metrics(0.6, 0.8), None, CONFIG)
    assert not accepted and "pairwise accuracy 0.6000 < bar 0.7" in reason
    accepted, reason = gate(_metrics(0.9, 0.5), None, CONFIG)
    assert not accepted and "AUC" in reason


def test_gate_refuses_a_regression_beyond_the_tolerance() -> None:
    parent = _metrics(0.95, 0.9)
    accepted, reason = gate(_metrics(0.94, 0.89), parent, CONFIG, "rm-0001")
    assert accepted, reason  # within 0.02
    accepted, reason = gate(_metrics(0.90, 0.9), parent, CONFIG, "rm-0001")
    assert not accepted
    assert "worse than rm-0001's 0.9500" in reason


def test_gate_skips_undefined_metrics_but_needs_one() -> None:
    accepted, _ = gate(_metrics(0.9, None), _metrics(0.9, 0.99), CONFIG)
    assert accepted
    accepted, reason = gate(_metrics(None, None), None, CONFIG)
    assert not accepted and "nothing to evaluate" in reason


def test_gate_needs_evidence_beyond_chance_not_only_the_bar() -> None:
    lucky = {"pairwise_accuracy": 0.75, "n_pairs": 8, "auc": None, "n_labels": 0, "n_up": 0}
    accepted, reason = gate(lucky, None, CONFIG)
    assert not accepted and "not shown better than chance" in reason
    assert "pairwise accuracy 0.7500 on 8 pairs" in reason
    # Noisy live labels: 0.6 is far from perfect but, on 2,000 pairs, surely not chance.
    noisy = {**lucky, "pairwise_accuracy": 0.6, "n_pairs": 2_000}
    accepted, reason = gate(noisy, None, RewardConfig())
    assert accepted and "lower bound 0.58" in reason, reason


def test_gate_judges_a_small_sample_by_its_bounds_not_its_point_value() -> None:
    # 2 of 6 held-out pairs right says little; 400 thumbs with AUC 0.7 say a lot.
    few_pairs = {"pairwise_accuracy": 1 / 3, "n_pairs": 6, "auc": 0.7, "n_labels": 400, "n_up": 200}
    accepted, reason = gate(few_pairs, None, RewardConfig())
    assert accepted, reason
    # The same accuracy on 600 pairs is shown below the bar.
    accepted, reason = gate({**few_pairs, "n_pairs": 600}, None, RewardConfig())
    assert not accepted and "pairwise accuracy 0.3333 < bar 0.55" in reason
