"""Canary statistics: formulas checked by hand, the decision function branch by branch on
hand-made observations, and the command line's overrides. Error rates by simulation are in
``test_canary_sim.py``."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import numpy as np
import pytest

from deploy.canary.controller import Decision, build_parser, config_from_args, decide
from deploy.canary.stats import (
    CANARY,
    STABLE,
    CanaryConfig,
    Health,
    Observations,
    _optimal_ratio,
    confidence_sequence,
    cs_radius,
    guardrail_breaches,
    srm_e_value,
    srm_p_value,
    stratified_difference,
)

T0 = datetime(2025, 1, 1, tzinfo=UTC)
DEMO = CanaryConfig.demo()
NONINF = dataclasses.replace(DEMO, test="non_inferiority")


def _obs(
    p_stable: float,
    p_canary: float,
    votes_per_arm: int,
    users: int = 200,
    weights: tuple[float, ...] = (0.5,),
    new_users: np.ndarray | None = None,
    health: Health | None = None,
    seed: int = 0,
) -> Observations:
    """Votes spread evenly over users, up-rates drawn per user around the given rates, all
    in the last stratum; by default the SRM counts match the weights exactly."""
    s = len(weights)
    votes = np.zeros((users, 2, s))
    ups = np.zeros((users, 2, s))
    rng = np.random.default_rng(seed)
    for arm, p in ((0, p_stable), (1, p_canary)):
        per_user = np.full(users, votes_per_arm // users)
        votes[:, arm, -1] = per_user
        ups[:, arm, -1] = rng.binomial(per_user.astype(int), p)
    if new_users is None:
        new_users = np.zeros((2, s))
        new_users[STABLE, -1] = 1000 * (1 - weights[-1])
        new_users[CANARY, -1] = 1000 * weights[-1]
    return Observations(votes, ups, new_users, np.array(weights), health or Health())


# --- formulas ------------------------------------------------------------------------------


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


# --- the sample-ratio test on distinct users -------------------------------------------------

# Two strata by hand, k = 10. Stratum 0 at w = 0.5, prior Beta(5, 5), 10 canary users and
# no stable one: E0 = B(15, 5) / B(5, 5) / 0.5^10 with B(5, 5) = 4!4!/9! = 1/630 and
# B(15, 5) = 14!4!/19! = 1/58140. Stratum 1 at w = 0.1, prior Beta(1, 9), 2 canary users and
# 3 stable: E1 = B(3, 12) / B(1, 9) / (0.1^2 0.9^3) with B(1, 9) = 1/9 and
# B(3, 12) = 2!11!/14! = 1/1092.
SRM_USERS = np.array([[0.0, 3.0], [10.0, 2.0]])  # (arm, stratum)
SRM_WEIGHTS = np.array([0.5, 0.1])
E0 = 630 / 58140 * 2**10  # 11.0957
E1 = 9 / 1092 / (0.1**2 * 0.9**3)  # 1.1306


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
    slow = Health(requests=(1000, 1000), latency_p95_ms=(100.0, 180.0))
    assert "latency" in guardrail_breaches(cfg, slow)[0]


def test_config_checks_its_test_name_and_threshold() -> None:
    assert CanaryConfig().test == "superiority" and CanaryConfig().threshold == 0.0
    assert NONINF.threshold == -NONINF.margin
    with pytest.raises(ValueError, match="superiority"):
        CanaryConfig(test="better")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="margin"):
        CanaryConfig(margin=-0.01)


# --- the decision function ------------------------------------------------------------------


def _check_reason(d: Decision, config: CanaryConfig = DEMO) -> None:
    """Every reason carries, in one line: the test, the always-valid interval, the
    threshold (and margin), votes and users per arm, all as in the statistics."""
    s = d.statistics
    assert "\n" not in d.reason
    assert config.test.replace("_", "-") in d.reason
    assert f"threshold {config.threshold:g}" in d.reason
    assert "95% always-valid CI [" in d.reason
    if s["lower"] is not None:
        assert f"[{s['lower']:+.3f}, {s['upper']:+.3f}]" in d.reason
    assert f"votes stable/canary {s['votes']['stable']}/{s['votes']['canary']}" in d.reason
    assert f"users {s['users']['stable']}/{s['users']['canary']}" in d.reason
    assert s["test"] == config.test and s["threshold"] == config.threshold


def _decide(
    obs: Observations, *, config: CanaryConfig = DEMO, stage: int = 1, minutes: float = 10, **kw
) -> Decision:
    now = T0 + timedelta(minutes=minutes)
    d = decide(config, obs, stage, T0, now, stage_started_at=T0, **kw)
    _check_reason(d, config)
    return d


def test_superiority_promotes_when_users_prefer_the_canary() -> None:
    d = _decide(_obs(0.6, 0.7, 2000))
    assert d.action == "promote", d.reason
    assert d.statistics["lower"] > 0 and d.statistics["votes"]["canary"] == 2000
    assert d.reason.startswith("users prefer the canary: lower bound +0.055 > +0")


def test_superiority_does_not_promote_a_canary_that_is_only_no_worse() -> None:
    """Equal rates, 4,000 votes per arm: the interval [-0.031, +0.045] lies above -margin,
    so non-inferiority promotes, but it contains 0, so superiority keeps collecting."""
    obs = _obs(0.6, 0.6, 4000)
    d = _decide(obs)
    assert d.statistics["lower"] < 0 < d.statistics["upper"]
    assert d.statistics["lower"] > -DEMO.margin
    assert d.action == "continue" and "the interval to leave +0" in d.reason
    d = _decide(obs, config=NONINF)
    assert d.action == "promote" and d.reason.startswith("non-inferior: lower bound")


def test_superiority_rolls_back_what_users_like_less() -> None:
    """4 points worse on 20,000 votes per arm: interval [-0.054, -0.018]. Below 0, so
    superiority rolls back; not below -0.05, so non-inferiority does not (yet)."""
    obs = _obs(0.6, 0.56, 20000)
    roomy = dataclasses.replace(DEMO, max_votes_per_arm=50_000)  # not out of votes
    d = _decide(obs, config=roomy)
    assert d.statistics["upper"] < 0 and d.statistics["lower"] < -DEMO.margin
    assert d.action == "rollback" and d.reason.startswith("users like the canary less")
    assert _decide(obs, config=dataclasses.replace(roomy, test="non_inferiority")).action == (
        "continue"
    )


def test_rollback_of_a_clearly_worse_canary_even_early_in_either_test() -> None:
    for config, why in ((DEMO, "users like the canary less"), (NONINF, "worse than the margin")):
        d = _decide(_obs(0.7, 0.4, 2000), config=config, stage=0, minutes=0.1)
        assert d.action == "rollback" and why in d.reason


def test_margin_zero_non_inferiority_is_superiority() -> None:
    zero = dataclasses.replace(NONINF, margin=0.0)
    assert zero.threshold == 0.0
    for obs in (_obs(0.6, 0.7, 2000), _obs(0.6, 0.6, 4000), _obs(0.6, 0.56, 20000)):
        assert _decide(obs, config=zero).action == _decide(obs).action


def test_warm_up_gate() -> None:
    great = _obs(0.5, 0.9, 60, users=30)  # huge effect, too few votes
    d = _decide(great)
    assert d.action == "continue" and "100 votes per arm (have 60/60)" in d.reason
    enough = _obs(0.5, 0.9, 2000)
    d = _decide(enough, minutes=0.5)  # promotion waits for min_duration
    assert d.action == "continue" and f"{DEMO.min_duration_s:g}s since the start" in d.reason
    assert _decide(enough, minutes=5).action == "promote"
    no_downs = _obs(0.5, 1.0, 2000)
    d = _decide(no_downs)
    assert d.action == "continue" and "10 downs per arm" in d.reason


def test_ramp_advances_then_promotes_only_in_the_last_stage() -> None:
    obs = _obs(0.6, 0.7, 2000, weights=(DEMO.stages[0],))
    d = _decide(obs, stage=0)
    assert d.action == "advance_stage" and f"ramping to {DEMO.stages[1]:.0%}" in d.reason


def test_a_no_better_canary_times_out_to_stable() -> None:
    undecided = _obs(0.6, 0.6, 400)
    assert _decide(undecided).action == "continue"
    d = _decide(undecided, minutes=DEMO.max_duration_s / 60)
    assert d.action == "rollback"
    assert d.reason.startswith(
        f"not shown better than stable by the limit (900s >= max {DEMO.max_duration_s:g}s)"
    )
    big = _obs(0.6, 0.6 - DEMO.margin, DEMO.max_votes_per_arm, users=1000)
    d = _decide(big, config=NONINF)
    assert d.action == "rollback" and "not shown non-inferior" in d.reason
    assert f"canary votes >= max {DEMO.max_votes_per_arm}" in d.reason


def test_srm_holds_and_hold_blocks_promotion() -> None:
    lopsided = np.array([[700.0], [300.0]])  # 30% canary users at weight 50%
    d = _decide(_obs(0.6, 0.7, 2000, new_users=lopsided))
    assert d.action == "hold" and "sample ratio mismatch" in d.reason
    assert "new users stable/canary 700/300 at 50%" in d.reason
    assert d.statistics["srm_new_users"] == {"stable": [700], "canary": [300]}
    assert _decide(_obs(0.6, 0.7, 2000), held=True).action == "hold"


def test_srm_waits_on_a_stratum_of_few_users() -> None:
    """The demo's single client identity: one user in one arm. Not a hold."""
    one = np.array([[0.0], [1.0]])
    d = _decide(_obs(0.6, 0.7, 2000, new_users=one))
    assert d.action == "promote" and d.statistics["srm_p_value"] == 1.0
    # 40 users, all stable, at 50%: extreme, but below srm_min_users (50), so it waits.
    few = np.array([[40.0], [0.0]])
    assert _decide(_obs(0.6, 0.7, 2000, new_users=few)).action == "promote"
    assert _decide(_obs(0.6, 0.7, 2000, new_users=few * 2)).action == "hold"


def test_guardrail_rolls_back_at_once_even_while_held() -> None:
    bad = Health(requests=(1000, 100), errors_5xx=(0, 20))
    obs = _obs(0.6, 0.7, 2000, health=bad)
    assert _decide(obs, minutes=0.1).action == "rollback"
    d = _decide(obs, held=True)
    assert d.action == "rollback" and d.reason.startswith("guardrail: 5xx rate")
    lenient = dataclasses.replace(DEMO, guardrails_override_hold=False)
    assert _decide(obs, config=lenient, held=True).action == "hold"


def test_reason_without_votes_says_so() -> None:
    empty = Observations(
        np.zeros((0, 2, 1)), np.zeros((0, 2, 1)), np.zeros((2, 1)), np.full(1, 0.5)
    )
    d = _decide(empty)
    assert d.action == "continue"
    assert "canary - stable n/a, 95% always-valid CI [-inf, +inf]" in d.reason


# --- the command line -----------------------------------------------------------------------


def _args(*argv: str):
    settings = SimpleNamespace(database_url=None, admin_port=0, admin_host="127.0.0.1")
    return build_parser(settings).parse_args(list(argv))


def test_cli_overrides_honour_zero_and_the_test() -> None:
    assert config_from_args(_args()) == CanaryConfig()
    assert config_from_args(_args("--demo")) == DEMO
    cfg = config_from_args(_args("--demo", "--test", "non_inferiority", "--margin", "0"))
    assert (cfg.test, cfg.margin, cfg.threshold) == ("non_inferiority", 0.0, 0.0)
    assert cfg.min_votes_per_arm == DEMO.min_votes_per_arm
    assert config_from_args(_args("--alpha", "0.01")).alpha == 0.01
    with pytest.raises(SystemExit):
        _args("--test", "better")
