"""The canary decision: what to do with a canary now, and the one-line reason why.

A pure function of the configuration and the live observations (:func:`decide`); the
controller (:mod:`deploy.canary.controller`) reads the observations and carries the
decision out. Each reason is one line: why, then the test (superiority or
non-inferiority), the estimate and its always-valid interval, the threshold (and margin),
and votes and users per arm, e.g. ``users prefer the canary: lower bound +0.055 > +0;
superiority, threshold 0: canary - stable +0.106, 95% always-valid CI [+0.055, +0.156];
votes stable/canary 2000/2000, users 200/200``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from deploy.canary.stats import (
    ACTIONS,
    CANARY,
    STABLE,
    CanaryConfig,
    Estimate,
    Health,
    Observations,
    confidence_sequence,
    guardrail_breaches,
    rule_actions,
    srm_p_value,
)


@dataclass(frozen=True)
class Decision:
    action: str
    """One of promote | rollback | hold | continue | advance_stage."""
    reason: str
    statistics: dict[str, Any] = field(default_factory=dict)


def _num(x: Any) -> float | None:
    """JSON-safe float (None for NaN and infinities)."""
    value = float(x)
    return value if math.isfinite(value) else None


def _fmt(x: float) -> str:
    return f"{x:+.3f}" if math.isfinite(x) else ("n/a" if math.isnan(x) else f"{x:+}")


def _summary(config: CanaryConfig, est: Estimate) -> str:
    """The test, the always-valid interval, the threshold, votes and users per arm."""
    if config.test == "superiority":
        rule = "superiority, threshold 0"
    else:
        rule = f"non-inferiority, threshold {config.threshold:g} (margin {config.margin:g})"
    return (
        f"{rule}: canary - stable {_fmt(float(est.estimate))}, "
        f"{1 - config.alpha:.0%} always-valid CI [{_fmt(float(est.lower))}, "
        f"{_fmt(float(est.upper))}]; votes stable/canary {int(est.votes[STABLE])}/"
        f"{int(est.votes[CANARY])}, users {int(est.users[STABLE])}/{int(est.users[CANARY])}"
    )


def _waiting_for(
    config: CanaryConfig,
    est: Estimate,
    stage: int,
    elapsed: float,
    stage_elapsed: float,
    stage_votes: float,
) -> list[str]:
    """Why a canary is still collecting: each rule's unmet condition."""
    pending = []
    mins = (
        ("votes", est.votes, config.min_votes_per_arm),
        ("ups", est.ups, config.min_ups_per_arm),
        ("downs", est.votes - est.ups, config.min_downs_per_arm),
        ("users", est.users, config.min_users_per_arm),
    )
    for name, have, need in mins:
        if (have < need).any():
            pending.append(f"{need} {name} per arm (have {int(have[0])}/{int(have[1])})")
    if stage_votes < config.min_stage_votes:
        pending.append(f"{config.min_stage_votes} canary votes in stage {stage}")
    if stage_elapsed < config.min_stage_duration_s:
        pending.append(f"stage {stage} to last {config.min_stage_duration_s:g}s")
    if stage >= len(config.stages) - 1:
        if elapsed < config.min_duration_s:
            pending.append(f"{config.min_duration_s:g}s since the start")
        if est.lower <= config.threshold <= est.upper:
            pending.append(f"the interval to leave {config.threshold:+g}")
    return pending


def decide(
    config: CanaryConfig,
    observations: Observations,
    stage: int,
    started_at: datetime,
    now: datetime,
    *,
    stage_started_at: datetime | None = None,
    held: bool = False,
) -> Decision:
    """What to do with a canary now. Precedence: guardrails (roll back), hold (by an
    operator, nothing else happens), sample-ratio mismatch (hold for a human), then the
    statistical rules of :func:`deploy.canary.stats.rule_actions`. The current ramp
    stage's votes are those of the last stratum. Every reason ends with the same one-line
    summary (:func:`_summary`): the test, the always-valid interval, the threshold, and
    votes and users per arm."""
    obs = observations
    est = confidence_sequence(config, obs.votes, obs.ups)
    elapsed = (now - started_at).total_seconds()
    stage_elapsed = (now - (stage_started_at or started_at)).total_seconds()
    stage_votes = float(obs.votes[:, CANARY, -1].sum()) if obs.votes.shape[-1] else 0.0
    p_srm = float(
        srm_p_value(obs.new_users, obs.weights, config.srm_concentration(), config.srm_min_users)
    )
    breaches = guardrail_breaches(config, obs.health)
    stats = _statistics(config, obs, est, stage, stage_votes, elapsed, stage_elapsed)
    stats.update(
        srm_p_value=p_srm,
        srm_threshold=config.srm_p_value,
        guardrail_breaches=breaches,
        health=_health(obs.health),
    )
    summary = _summary(config, est)
    if breaches and (config.guardrails_override_hold or not held):
        return Decision("rollback", "guardrail: " + "; ".join(breaches) + "; " + summary, stats)
    if held:
        return Decision("hold", f"held by an operator, no automatic action; {summary}", stats)
    if p_srm < config.srm_p_value:
        return Decision("hold", f"{_srm_reason(config, obs, p_srm)}; {summary}", stats)
    code = int(rule_actions(config, est, stage, elapsed, stage_elapsed, stage_votes))
    action = ACTIONS[code]
    if action == "rollback":
        reason = _rollback_reason(config, est, elapsed)
    elif action == "promote":
        why = "users prefer the canary" if config.test == "superiority" else "non-inferior"
        reason = f"{why}: lower bound {_fmt(float(est.lower))} > {config.threshold:+g}"
    elif action == "advance_stage":
        reason = (
            f"stage {stage} minimums met ({int(stage_votes)} canary votes,"
            f" {stage_elapsed:.0f}s); ramping to {config.stages[stage + 1]:.0%}"
        )
    else:
        pending = _waiting_for(config, est, stage, elapsed, stage_elapsed, stage_votes)
        reason = "collecting: waiting for " + ("; ".join(pending) or "the next look")
    return Decision(action, f"{reason}; {summary}", stats)


def _statistics(
    config: CanaryConfig,
    obs: Observations,
    est: Estimate,
    stage: int,
    stage_votes: float,
    elapsed: float,
    stage_elapsed: float,
) -> dict[str, Any]:
    """The decision's numbers, as the audit log stores them (JSON values only)."""
    return {
        "test": config.test,
        "threshold": config.threshold,
        "estimate": _num(est.estimate),
        "lower": _num(est.lower),
        "upper": _num(est.upper),
        "std_error": _num(np.sqrt(est.variance)),
        "margin": config.margin,
        "alpha": config.alpha,
        "superior": bool(est.lower > 0),
        "votes": {"stable": int(est.votes[STABLE]), "canary": int(est.votes[CANARY])},
        "ups": {"stable": int(est.ups[STABLE]), "canary": int(est.ups[CANARY])},
        "users": {"stable": int(est.users[STABLE]), "canary": int(est.users[CANARY])},
        "stage": stage,
        "stage_votes": int(stage_votes),
        "strata_weights": [float(w) for w in obs.weights],
        "elapsed_s": elapsed,
        "stage_elapsed_s": stage_elapsed,
        "srm_new_users": {
            "stable": [int(n) for n in obs.new_users[STABLE]],
            "canary": [int(n) for n in obs.new_users[CANARY]],
        },
    }


def _health(health: Health) -> dict[str, Any]:
    """The guardrails' inputs per arm, as the audit log (and the console) shows them."""

    def arms(pair: tuple[Any, Any] | None) -> dict[str, Any] | None:
        return None if pair is None else {"stable": pair[STABLE], "canary": pair[CANARY]}

    return {
        "requests": arms(health.requests),
        "errors_5xx": arms(health.errors_5xx),
        "failing_principals": arms(health.failing_principals),
        "latency_p95_ms": arms(health.latency_p95_ms),
        "adapter_load_failures": health.adapter_load_failures,
    }


def _srm_reason(config: CanaryConfig, obs: Observations, p_srm: float) -> str:
    per_stratum = ", ".join(
        f"{int(s)}/{int(c)} at {w:.0%}" for s, c, w in zip(*obs.new_users, obs.weights, strict=True)
    )
    return (
        f"sample ratio mismatch: anytime p = {p_srm:.2g} < {config.srm_p_value:g} on new"
        f" users stable/canary {per_stratum}; routing or logging is broken and the"
        " comparison cannot be trusted, a human must look"
    )


def _rollback_reason(config: CanaryConfig, est: Estimate, elapsed: float) -> str:
    """Shown worse (the upper bound below the threshold), or undecided at a limit."""
    theta = config.threshold
    if est.upper < theta:
        why = (
            "users like the canary less"
            if config.test == "superiority"
            else "canary worse than the margin"
        )
        return f"{why}: upper bound {_fmt(float(est.upper))} < {theta:+g}"
    limits = []
    if elapsed >= config.max_duration_s:
        limits.append(f"{elapsed:.0f}s >= max {config.max_duration_s:g}s")
    if est.votes[CANARY] >= config.max_votes_per_arm:
        limits.append(f"{int(est.votes[CANARY])} canary votes >= max {config.max_votes_per_arm}")
    not_shown = (
        "not shown better than stable" if config.test == "superiority" else "not shown non-inferior"
    )
    return f"{not_shown} by the limit ({'; '.join(limits)}): back to stable"
