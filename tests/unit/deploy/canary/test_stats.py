"""Canary statistics: formulas checked by hand. Error rates by simulation are in
``tests/unit/fixtures/test_canary_sim.py``."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from deploy.canary.stats import (
    CANARY,
    STABLE,
    CanaryConfig,
    Health,
    _optimal_ratio,
    confidence_sequence,
    cs_radius,
    guardrail_breaches,
    srm_e_value,
    srm_p_value,
    stratified_difference,
)

DEMO = CanaryConfig.demo()


NONINF = dataclasses.replace(DEMO, test="non_inferiority")


# Two strata by hand, k = 10. Stratum 0 at w = 0.5, prior Beta(5, 5), 10 canary users and
# no stable one: E0 = B(15, 5) / B(5, 5) / 0.5^10 with B(5, 5) = 4!4!/9! = 1/630 and
# B(15, 5) = 14!4!/19! = 1/58140. Stratum 1 at w = 0.1, prior Beta(1, 9), 2 canary users and
# 3 stable: E1 = B(3, 12) / B(1, 9) / (0.1^2 0.9^3) with B(1, 9) = 1/9 and
# B(3, 12) = 2!11!/14! = 1/1092.
SRM_USERS = np.array([[0.0, 3.0], [10.0, 2.0]])  # (arm, stratum)


SRM_WEIGHTS = np.array([0.5, 0.1])


E0 = 630 / 58140 * 2**10  # 11.0957


E1 = 9 / 1092 / (0.1**2 * 0.9**3)  # 1.1306


def test_mixture_radius_formula_and_tuning() -> None:
    assert _optimal_ratio(0.05) == pytest.approx(8.2, abs=0.2)
    v, tau2, alpha = 1e-4, 8e-4, 0.05
    expected = np.sqrt(v * (v + tau2) / tau2 * np.log((v + tau2) / (v * alpha**2)))
    assert cs_radius(v, alpha, tau2) == pytest.approx(expected)
    # Wider than the fixed-sample 95% interval (the price of peeking), and about 3 SE at
    # the tuning point rather than 1.96.
    cfg = CanaryConfig()
    v_star = 0.5 / cfg.tuning_votes_per_arm
    ratio = cs_radius(v_star, cfg.alpha, cfg.mixture_variance()) / np.sqrt(v_star)
    assert 2.9 < ratio < 3.2
    assert cs_radius(np.inf, 0.05, tau2) == np.inf


def test_stratified_difference_one_stratum_is_the_plain_difference() -> None:
    votes = np.array([[[10], [10]], [[20], [5]]], dtype=float)  # 2 users
    ups = np.array([[[6], [8]], [[10], [2]]], dtype=float)
    est, var = stratified_difference(votes, ups)
    assert est == pytest.approx(10 / 15 - 16 / 30)
    assert var > 0


def test_stratification_removes_simpson_bias() -> None:
    """Baseline moves from 0.3 to 0.8 between strata while the canary share goes 10% → 50%:
    pooling would credit the canary with the baseline's rise; stratifying does not."""
    users = 400
    votes = np.zeros((users, 2, 2))
    ups = np.zeros((users, 2, 2))
    votes[:, 0, 0], votes[:, 1, 0] = 9, 1  # stratum 0: 10% canary, baseline 0.3
    votes[:, 0, 1], votes[:, 1, 1] = 5, 5  # stratum 1: 50% canary, baseline 0.8
    ups[:, 0, 0], ups[:, 1, 0] = 9 * 0.3, 1 * 0.3
    ups[:, 0, 1], ups[:, 1, 1] = 5 * 0.8, 5 * 0.8
    est, _ = stratified_difference(votes, ups)
    pooled = ups[:, 1].sum() / votes[:, 1].sum() - ups[:, 0].sum() / votes[:, 0].sum()
    assert est == pytest.approx(0.0, abs=1e-12)
    assert pooled > 0.1


def test_cluster_robust_variance_grows_with_correlated_users() -> None:
    """Sticky users (each in one arm), same totals. In one world each user's votes all
    agree (perfectly clustered), in the other they are mixed: the clustered world must
    report a much larger variance. (A user in *both* arms with the same taste cancels out
    of the difference: the influence is per user over both arms, as it should be.)"""
    users, k = 100, 20
    votes = np.zeros((users, 2, 1))
    votes[:50, 0, 0] = k
    votes[50:, 1, 0] = k
    mixed = votes * 0.5
    clustered = votes.copy()
    clustered[25:50] = 0  # within each arm half the users always up, half always down
    clustered[75:] = 0
    _, v_mixed = stratified_difference(votes, mixed)
    _, v_clustered = stratified_difference(votes, clustered)
    assert v_clustered > 10 * v_mixed


def test_no_data_gives_infinite_bounds() -> None:
    est = confidence_sequence(DEMO, np.zeros((0, 2, 1)), np.zeros((0, 2, 1)))
    assert np.isnan(est.estimate) and est.lower == -np.inf and est.upper == np.inf


def test_srm_e_value_by_hand() -> None:
    assert srm_e_value(SRM_USERS, SRM_WEIGHTS, 10.0) == pytest.approx(E0 * E1, rel=1e-12)
    assert srm_p_value(SRM_USERS, SRM_WEIGHTS, 10.0) == pytest.approx(1 / (E0 * E1), rel=1e-12)
    # Vectorised over leading dimensions: each experiment on its own.
    both = np.stack([SRM_USERS, SRM_USERS[:, ::-1]])
    flipped = srm_e_value(SRM_USERS[:, ::-1], SRM_WEIGHTS, 10.0)
    assert srm_e_value(both, SRM_WEIGHTS, 10.0) == pytest.approx([E0 * E1, float(flipped)])


def test_srm_stratum_with_too_few_users_waits() -> None:
    """Stratum 1 has 5 users: with a minimum of 6 it contributes 1 (neither evidence for nor
    against); with 11 neither stratum qualifies and the p-value is 1."""
    assert srm_e_value(SRM_USERS, SRM_WEIGHTS, 10.0, min_users=6) == pytest.approx(E0)
    assert srm_p_value(SRM_USERS, SRM_WEIGHTS, 10.0, min_users=11) == 1.0


def test_srm_first_user_is_no_evidence_and_balance_is_none() -> None:
    """One user (however many requests it sends) is a single count, and the mixture's first
    prediction is the null's w: E = 1 exactly. Counts right at the weights give E < 1."""
    for w in (0.05, 0.5):
        for arm in (STABLE, CANARY):
            one = np.zeros((2, 1))
            one[arm, 0] = 1
            assert srm_e_value(one, np.array([w]), 11.0) == pytest.approx(1.0)
    fine = np.array([[9500.0, 5000.0], [500.0, 5000.0]])
    assert srm_p_value(fine, np.array([0.05, 0.5]), DEMO.srm_concentration()) == 1.0
    broken = np.array([[9500.0, 5300.0], [500.0, 4700.0]])  # canary users missing at 50%
    assert srm_p_value(broken, np.array([0.05, 0.5]), DEMO.srm_concentration()) < 1e-3


def test_srm_concentration_follows_the_tuning_users() -> None:
    cfg = CanaryConfig()
    assert cfg.srm_concentration() == pytest.approx(
        cfg.srm_tuning_users / _optimal_ratio(cfg.srm_p_value) - 1
    )
    assert dataclasses.replace(cfg, srm_tuning_users=1).srm_concentration() == 1.0


def test_guardrails() -> None:
    cfg = CanaryConfig()
    assert guardrail_breaches(cfg, Health()) == []
    assert guardrail_breaches(cfg, Health(adapter_load_failures=1)) == ["adapter load failures 1"]
    errors = Health(requests=(1000, 1000), errors_5xx=(5, 30))
    assert "5xx rate" in guardrail_breaches(cfg, errors)[0]
    few = Health(requests=(1000, 10), errors_5xx=(0, 5))  # below the minimum sample
    assert guardrail_breaches(cfg, few) == []
    # 3% excess, but from one or two API keys: below the floor of 3 principals.
    for who, fires in ((1, False), (2, False), (3, True)):
        one = Health(requests=(1000, 1000), errors_5xx=(0, 30), failing_principals=(0, who))
        assert bool(guardrail_breaches(cfg, one)) is fires, who
    assert (
        "from 3 principals"
        in guardrail_breaches(
            cfg, Health(requests=(1000, 1000), errors_5xx=(0, 30), failing_principals=(0, 3))
        )[0]
    )
    slow = Health(requests=(1000, 1000), latency_p95_ms=(100.0, 180.0))
    assert "latency" in guardrail_breaches(cfg, slow)[0]


def test_config_checks_its_test_name_and_threshold() -> None:
    assert CanaryConfig().test == "superiority" and CanaryConfig().threshold == 0.0
    assert NONINF.threshold == -NONINF.margin
    with pytest.raises(ValueError, match="superiority"):
        CanaryConfig(test="better")  # type: ignore[arg-type]  # the refusal tested
    with pytest.raises(ValueError, match="margin"):
        CanaryConfig(margin=-0.01)
