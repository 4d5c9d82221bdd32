"""The canary decision function, branch by branch on hand-made observations."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import numpy as np

from deploy.canary.decision import Decision, decide
from deploy.canary.stats import (
    CANARY,
    STABLE,
    CanaryConfig,
    Health,
    Observations,
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
