"""Error rates, power and time to decision of the canary rules, by simulation with the very
functions the controller calls (fixed seeds; every canary is looked at after every batch).

The world is :data:`deploy.canary_sim.DEMO_SCENARIO` (what ``alignloop up`` runs: 300 users
of log-normal activity, sticky routing, 5 votes/s, a look every 30 s, 30 s settle windows)
under :meth:`CanaryConfig.demo`, so these tests also pin down the demo's promise: a canary
users prefer is promoted within minutes, a worse one rolled back sooner, and one that is no
better times out to stable by ``max_duration_s``. Rates are checked against their bound
with the simulation's own sampling error in mind (a binomial 3-sigma allowance where the
bound is tight)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from deploy.canary_controller import decide
from deploy.canary_sim import DEMO_SCENARIO, simulate
from deploy.canary_stats import PROMOTE, ROLLBACK, CanaryConfig, Observations, confidence_sequence

DEMO = CanaryConfig.demo()
NONINF = dataclasses.replace(DEMO, test="non_inferiority")


def _allowance(rate: float, n: int) -> float:
    """3 binomial standard errors: how far a simulated rate may exceed its true value."""
    return 3 * np.sqrt(rate * (1 - rate) / n)


# --- decisions on the thumbs-up difference -------------------------------------------------


def test_no_better_canary_is_promoted_at_most_alpha_and_times_out() -> None:
    """Superiority, true difference 0: a false promotion has probability ≤ α under
    continuous peeking; every other run ends in stable by the maximum duration."""
    result = simulate(DEMO, DEMO_SCENARIO, experiments=1000, seed=11)
    assert result.rate(PROMOTE) <= DEMO.alpha
    assert result.rate(PROMOTE) + result.rate(ROLLBACK) == 1.0  # always decided
    assert result.seconds.max() <= DEMO.max_duration_s


def test_false_promotion_at_the_non_inferiority_margin_is_below_alpha() -> None:
    sc = dataclasses.replace(DEMO_SCENARIO, effect=-NONINF.margin)
    result = simulate(NONINF, sc, experiments=600, seed=12)
    assert result.rate(PROMOTE) <= NONINF.alpha


def test_demo_promotes_a_preferred_canary_within_minutes() -> None:
    """Users prefer the canary by 20 points (and 15): promoted nearly always, in about
    4 minutes of simulated time, well inside the demo's 5–8 minute promise."""
    for effect, power, median_s in ((0.20, 0.99, 300), (0.15, 0.95, 360)):
        result = simulate(DEMO, dataclasses.replace(DEMO_SCENARIO, effect=effect), 400, seed=13)
        promoted = result.action == PROMOTE
        assert promoted.mean() >= power, (effect, promoted.mean())
        assert np.median(result.seconds[promoted]) <= median_s
        assert np.quantile(result.seconds[promoted], 0.9) <= 480


def test_demo_rolls_back_a_canary_users_like_less_within_minutes() -> None:
    result = simulate(DEMO, dataclasses.replace(DEMO_SCENARIO, effect=-0.20), 400, seed=14)
    assert result.rate(ROLLBACK) == 1.0
    assert np.median(result.seconds) <= 240 and result.seconds.max() <= 480


# --- the sample-ratio test on sticky users --------------------------------------------------


def test_srm_false_holds_with_sticky_users_of_uneven_activity() -> None:
    """Correct sticky routing, very uneven activity (log-normal sigma 1.5: the busiest users
    send hundreds of requests, most a handful), weights 10% → 50%, a look every 30 s for
    15 minutes. At the configured level false holds are ≤ 1% per canary; and at looser
    levels a the rate of ever crossing a stays ≤ a, which is what anytime validity means.
    No minimum users per stratum here: small counts would show a flaw first."""
    n = 1000
    sc = dataclasses.replace(DEMO_SCENARIO, activity_sigma=1.5)
    result = simulate(dataclasses.replace(DEMO, srm_min_users=0), sc, n, seed=15)
    assert result.srm_flagged.mean() <= 0.01
    for a in (0.01, 0.05, 0.2):
        assert np.mean(result.srm_min_p < a) <= a + _allowance(a, n), a


def test_srm_catches_a_router_that_loses_canary_users() -> None:
    """A broken router: half of the canary's users never reach the logs (3,000 users,
    10 minutes). Detected in nearly every canary; with correct routing, never."""
    sc = dataclasses.replace(DEMO_SCENARIO, users=3000, max_batches=20)
    broken = simulate(DEMO, dataclasses.replace(sc, srm_loss=0.5), 100, seed=17)
    assert broken.srm_flagged.mean() >= 0.95
    fine = simulate(DEMO, sc, 100, seed=17)
    assert not fine.srm_flagged.any()


# --- the simulator and the controller apply the same rules ---------------------------------


def test_simulator_and_decide_agree() -> None:
    """The vectorized rules the simulator applies are the ones decide() applies."""
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    rng = np.random.default_rng(5)
    for _ in range(20):
        users = 50
        votes = rng.integers(0, 8, size=(users, 2, 2)).astype(float)
        ups = rng.binomial(votes.astype(int), 0.6).astype(float)
        obs = Observations(votes, ups, np.zeros((2, 2)), np.array(DEMO.stages))
        d = decide(DEMO, obs, 1, t0, t0 + timedelta(minutes=5), stage_started_at=t0)
        est = confidence_sequence(DEMO, votes[None], ups[None])
        assert d.statistics["lower"] == pytest.approx(float(est.lower[0]))
