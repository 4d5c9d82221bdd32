"""Canary statistics: formulas, the decision function, and validity by simulation (fixed
seeds, 1,000 experiments each, a look after every batch of 200 votes)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from deploy.canary_controller import decide
from deploy.canary_sim import Scenario, simulate
from deploy.canary_stats import (
    PROMOTE,
    ROLLBACK,
    CanaryConfig,
    Health,
    Observations,
    _optimal_ratio,
    confidence_sequence,
    cs_radius,
    guardrail_breaches,
    srm_p_value,
    stratified_difference,
)

T0 = datetime(2025, 1, 1, tzinfo=UTC)
DEMO = CanaryConfig.demo()


def _obs(
    p_stable: float,
    p_canary: float,
    votes_per_arm: int,
    users: int = 200,
    weights: tuple[float, ...] = (0.5,),
    served: np.ndarray | None = None,
    health: Health | None = None,
    seed: int = 0,
) -> Observations:
    """Votes spread evenly over users, up-rates exactly as given, all in the last stratum."""
    s = len(weights)
    votes = np.zeros((users, 2, s))
    ups = np.zeros((users, 2, s))
    rng = np.random.default_rng(seed)
    for arm, p in ((0, p_stable), (1, p_canary)):
        per_user = np.full(users, votes_per_arm // users)
        votes[:, arm, -1] = per_user
        up = rng.binomial(per_user.astype(int), p)
        ups[:, arm, -1] = up
    if served is None:
        served = votes.sum(axis=0)
        served[:, :] = 0
        served[0, -1] = 1000 * (1 - weights[-1])
        served[1, -1] = 1000 * weights[-1]
    return Observations(votes, ups, served, np.array(weights), health or Health())


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


def test_srm_p_value() -> None:
    weights = np.array([0.05, 0.5])
    fine = np.array([[9500, 5000], [500, 5000]])
    broken = np.array([[9500, 5300], [500, 4700]])  # canary under-served at 50%
    assert srm_p_value(fine, weights) > 0.5
    assert srm_p_value(broken, weights) < 1e-3
    assert srm_p_value(np.array([[5], [1]]), np.array([0.5]), min_served=100) == 1.0


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


# --- the decision function ------------------------------------------------------------------


def _decide(obs: Observations, *, stage: int = 1, minutes: float = 30, **kw) -> str:
    now = T0 + timedelta(minutes=minutes)
    return decide(DEMO, obs, stage, T0, now, stage_started_at=T0, **kw).action


def test_decide_promotes_a_clearly_fine_canary() -> None:
    d = decide(DEMO, _obs(0.6, 0.7, 2000), 1, T0, T0 + timedelta(hours=1))
    assert d.action == "promote", d.reason
    assert d.statistics["lower"] > -DEMO.margin and d.statistics["votes"]["canary"] == 2000


def test_decide_rolls_back_a_clearly_worse_canary_even_early() -> None:
    d = decide(DEMO, _obs(0.7, 0.4, 2000), 0, T0, T0 + timedelta(seconds=5))
    assert d.action == "rollback" and "worse than the margin" in d.reason


def test_warm_up_gate() -> None:
    great = _obs(0.5, 0.9, 60, users=30)  # huge effect, too few votes
    assert _decide(great) == "continue"
    enough = _obs(0.5, 0.9, 2000)
    assert _decide(enough, minutes=0.5) == "continue"  # promotion waits for min_duration
    assert _decide(enough, minutes=5) == "promote"
    no_downs = _obs(0.5, 1.0, 2000)
    assert _decide(no_downs) == "continue"


def test_ramp_advances_then_promotes_only_in_the_last_stage() -> None:
    obs = _obs(0.6, 0.7, 2000, weights=(0.05,))
    assert _decide(obs, stage=0) == "advance_stage"


def test_max_duration_and_size_fall_back_to_stable() -> None:
    undecided = _obs(0.6, 0.58, 400)
    assert _decide(undecided) == "continue"
    d = decide(DEMO, undecided, 1, T0, T0 + timedelta(seconds=DEMO.max_duration_s))
    assert d.action == "rollback" and "undecided" in d.reason
    big = _obs(0.6, 0.6 - DEMO.margin, DEMO.max_votes_per_arm, users=1000)
    assert _decide(big) == "rollback"


def test_srm_holds_and_hold_blocks_promotion() -> None:
    served = np.array([[5600.0], [4400.0]])
    d = decide(DEMO, _obs(0.6, 0.7, 2000, served=served), 1, T0, T0 + timedelta(hours=1))
    assert d.action == "hold" and "sample ratio mismatch" in d.reason
    assert _decide(_obs(0.6, 0.7, 2000), held=True) == "hold"


def test_guardrail_rolls_back_at_once_even_while_held() -> None:
    bad = Health(requests=(1000, 100), errors_5xx=(0, 20))
    obs = _obs(0.6, 0.7, 2000, health=bad)
    assert _decide(obs, minutes=0.1) == "rollback"
    assert _decide(obs, held=True) == "rollback"
    lenient = CanaryConfig.demo().__class__(**{**DEMO.__dict__, "guardrails_override_hold": False})
    d = decide(lenient, obs, 1, T0, T0 + timedelta(hours=1), held=True)
    assert d.action == "hold"


# --- validity by simulation ---------------------------------------------------------------
# Demo config (m = 0.05, alpha = 0.05, at most 5,000 canary votes), 1,000 users with
# log-normal activity (a few vote dozens of times), bounded per-user offsets, a baseline
# drifting 0.60 → 0.70, ramp 5% → 50%, a look after every 200 votes.

SIM = Scenario(effect=0.0, batch_seconds=10, max_batches=200)


@pytest.mark.parametrize("sticky", [False, True], ids=["per-request", "sticky-users"])
def test_false_promotion_at_the_null_boundary_is_below_alpha(sticky: bool) -> None:
    sc = Scenario(**{**SIM.__dict__, "effect": -DEMO.margin, "sticky": sticky})
    result = simulate(DEMO, sc, experiments=1000, seed=11)
    assert result.rate(PROMOTE) <= DEMO.alpha
    assert result.rate(PROMOTE) + result.rate(ROLLBACK) == 1.0  # always decided in the end


def test_power_at_the_margin() -> None:
    sc = Scenario(**{**SIM.__dict__, "effect": DEMO.margin})
    result = simulate(DEMO, sc, experiments=1000, seed=12)
    assert result.rate(PROMOTE) >= 0.8
    assert np.median(result.votes) < 2 * DEMO.max_votes_per_arm


def test_srm_detection_by_simulation() -> None:
    broken = Scenario(**{**SIM.__dict__, "effect": DEMO.margin, "srm_loss": 0.15})
    assert simulate(DEMO, broken, experiments=200, seed=13).srm_flagged.mean() > 0.9
    fine = Scenario(**{**SIM.__dict__, "effect": DEMO.margin})
    assert simulate(DEMO, fine, experiments=200, seed=13).srm_flagged.mean() < 0.05


def test_simulator_and_decide_agree() -> None:
    """The vectorized rules the simulator applies are the ones decide() applies."""
    cfg = DEMO
    rng = np.random.default_rng(5)
    for _ in range(20):
        users = 50
        votes = rng.integers(0, 8, size=(users, 2, 2)).astype(float)
        ups = rng.binomial(votes.astype(int), 0.6).astype(float)
        obs = Observations(votes, ups, votes.sum(axis=0) * 0, np.array([0.05, 0.5]))
        d = decide(cfg, obs, 1, T0, T0 + timedelta(hours=2), stage_started_at=T0)
        est = confidence_sequence(cfg, votes[None], ups[None])
        assert d.statistics["lower"] == pytest.approx(float(est.lower[0]))
