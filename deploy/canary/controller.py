"""The canary controller: ``alignloop canary``.

Each tick (every ``--poll-seconds``):

1. no canary, not held, a candidate waiting → start the oldest candidate as canary at the
   first ramp weight;
2. a canary running → read its live votes (:mod:`deploy.canary.data`), :func:`decide`,
   write the decision with its statistics to the audit log, and carry it out through the
   registry: promote, roll back, advance the ramp, or hold for a human.

Each decision's reason (audit log and log line) is one line: why, then the test
(superiority or non-inferiority), the estimate and its always-valid interval, the
threshold (and margin), and votes and users per arm, e.g. ``users prefer the canary: lower
bound +0.055 > +0; superiority, threshold 0: canary - stable +0.106, 95% always-valid CI
[+0.055, +0.156]; votes stable/canary 2000/2000, users 200/200``.

Every registry command carries the routing generation the decision was made on, so if an
operator changed anything in between, the command fails with ``ConcurrentChange`` and the
next tick decides again on fresh data. While the registry is held the controller starts,
advances and promotes nothing; guardrail rollbacks still happen unless
``CanaryConfig.guardrails_override_hold`` is off.

One HTTP port (``--port``, ``ALIGNLOOP_ADMIN_PORT``, default 9103) serves ``/metrics`` and
the admin API ``/admin/...`` (:mod:`deploy.ops.admin_api`; disabled without
``ALIGNLOOP_ADMIN_TOKEN``), from a uvicorn thread beside the control loop.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import numpy as np
import psycopg
from prometheus_client import Counter, Gauge

from deploy.canary import data as canary_data
from deploy.canary.stats import (
    ACTIONS,
    CANARY,
    STABLE,
    TESTS,
    CanaryConfig,
    Estimate,
    Observations,
    confidence_sequence,
    guardrail_breaches,
    rule_actions,
    srm_p_value,
)
from deploy.policies import registry

log = logging.getLogger(__name__)

DECISIONS = Counter("alignloop_canary_decisions_total", "Controller decisions.", ["action"])
BOUNDS = Gauge(
    "alignloop_canary_difference",
    "Canary − stable thumbs-up rate: estimate, always-valid bounds, the decision threshold "
    "(0 for superiority, −m for non-inferiority) and −m.",
    ["which"],
)
VOTES = Gauge("alignloop_canary_votes", "Current ratings in the canary test.", ["arm"])
STAGE = Gauge("alignloop_canary_stage", "Ramp stage of the active canary (−1: none).")
SRM_P = Gauge("alignloop_canary_srm_p_value", "Sample-ratio-mismatch test p-value.")
CONFLICTS = Counter(
    "alignloop_canary_conflicts_total", "Decisions not applied: the registry changed meanwhile."
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
    k = config.srm_concentration()
    p_srm = float(srm_p_value(obs.new_users, obs.weights, k, config.srm_min_users))
    breaches = guardrail_breaches(config, obs.health)
    stats: dict[str, Any] = {
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
        "srm_p_value": p_srm,
        "srm_new_users": {
            "stable": [int(n) for n in obs.new_users[STABLE]],
            "canary": [int(n) for n in obs.new_users[CANARY]],
        },
        "guardrail_breaches": breaches,
    }
    summary = _summary(config, est)
    if breaches and (config.guardrails_override_hold or not held):
        return Decision("rollback", "guardrail: " + "; ".join(breaches) + "; " + summary, stats)
    if held:
        return Decision("hold", f"held by an operator, no automatic action; {summary}", stats)
    if p_srm < config.srm_p_value:
        per_stratum = ", ".join(
            f"{int(s)}/{int(c)} at {w:.0%}"
            for s, c, w in zip(*obs.new_users, obs.weights, strict=True)
        )
        return Decision(
            "hold",
            f"sample ratio mismatch: anytime p = {p_srm:.2g} < {config.srm_p_value:g} on new"
            f" users stable/canary {per_stratum}; routing or logging is broken and the"
            f" comparison cannot be trusted, a human must look; {summary}",
            stats,
        )
    code = int(rule_actions(config, est, stage, elapsed, stage_elapsed, stage_votes))
    action = ACTIONS[code]
    theta = config.threshold
    if action == "rollback":
        if est.upper < theta:
            why = (
                "users like the canary less"
                if config.test == "superiority"
                else "canary worse than the margin"
            )
            reason = f"{why}: upper bound {_fmt(float(est.upper))} < {theta:+g}"
        else:
            limits = []
            if elapsed >= config.max_duration_s:
                limits.append(f"{elapsed:.0f}s >= max {config.max_duration_s:g}s")
            if est.votes[CANARY] >= config.max_votes_per_arm:
                limits.append(
                    f"{int(est.votes[CANARY])} canary votes >= max {config.max_votes_per_arm}"
                )
            not_shown = (
                "not shown better than stable"
                if config.test == "superiority"
                else "not shown non-inferior"
            )
            reason = f"{not_shown} by the limit ({'; '.join(limits)}): back to stable"
    elif action == "promote":
        why = "users prefer the canary" if config.test == "superiority" else "non-inferior"
        reason = f"{why}: lower bound {_fmt(float(est.lower))} > {theta:+g}"
    elif action == "advance_stage":
        reason = (
            f"stage {stage} minimums met ({int(stage_votes)} canary votes,"
            f" {stage_elapsed:.0f}s); ramping to {config.stages[stage + 1]:.0%}"
        )
    else:
        pending = _waiting_for(config, est, stage, elapsed, stage_elapsed, stage_votes)
        reason = "collecting: waiting for " + ("; ".join(pending) or "the next look")
    return Decision(action, f"{reason}; {summary}", stats)


class CanaryController:
    """Drives the registry from live data; one tick at a time (see the module docstring)."""

    def __init__(
        self,
        config: CanaryConfig,
        *,
        model_name: str = "alignloop",
        settle_seconds: float = 30.0,
        actor: str = registry.CONTROLLER,
    ) -> None:
        self.config = config
        self.model_name = model_name
        self.settle_seconds = settle_seconds
        self.actor = actor

    def tick(self, conn: psycopg.Connection) -> Decision | None:
        """One look. Returns the decision about the active canary (None when there was
        none, or one was just started)."""
        routing = registry.routing_table(conn)
        if routing.canary_version is None:
            STAGE.set(-1)
            self._maybe_start(conn, routing)
            return None
        canary = routing.canary_version
        assert routing.canary_started_at is not None
        now = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
        strata = registry.canary_strata(conn, canary, routing.canary_started_at)
        obs = canary_data.load_observations(
            conn,
            canary,
            routing.stable_version,
            strata,
            now,
            model_name=self.model_name,
            settle_seconds=self.settle_seconds,
        )
        stage = min(int(routing.canary_stage or 0), len(self.config.stages) - 1)
        decision = decide(
            self.config,
            obs,
            stage,
            routing.canary_started_at,
            now,
            stage_started_at=routing.stage_started_at,
            held=routing.held,
        )
        self._export(decision, stage)
        registry.record_decision(
            conn, canary, decision.action, decision.reason, decision.statistics
        )
        log.info("canary %s: %s (%s)", canary, decision.action, decision.reason)
        try:
            self._apply(conn, routing, decision, stage)
        except registry.ConcurrentChange as exc:
            CONFLICTS.inc()
            log.warning("decision on %s not applied: %s", canary, exc)
        return decision

    def _maybe_start(self, conn: psycopg.Connection, routing: registry.Routing) -> None:
        if routing.held:
            return
        candidates = registry.list_versions(conn, "candidate")
        if not candidates:
            return
        version = candidates[0].version
        try:
            registry.start_canary(
                conn,
                version,
                self.config.stages[0],
                actor=self.actor,
                reason="new candidate: canary at the first ramp stage",
                stage=0,
                expect_state="candidate",
                expect_generation=routing.generation,
                respect_hold=True,
            )
            log.info("canary %s started at %.0f%%", version, 100 * self.config.stages[0])
        except registry.ConcurrentChange as exc:
            CONFLICTS.inc()
            log.warning("did not start %s: %s", version, exc)

    def _apply(
        self, conn: psycopg.Connection, routing: registry.Routing, d: Decision, stage: int
    ) -> None:
        canary = routing.canary_version
        assert canary is not None
        common = {"actor": self.actor, "expect_generation": routing.generation}
        if d.action == "promote":
            registry.promote(
                conn, canary, reason=d.reason, stats=d.statistics, expect_state="canary",
                respect_hold=True, **common,
            )  # fmt: skip
        elif d.action == "rollback":
            registry.rollback(
                conn, reason=d.reason, stats=d.statistics, expect_canary=canary, **common
            )
        elif d.action == "advance_stage":
            registry.set_canary_weight(
                conn, canary, self.config.stages[stage + 1], reason=d.reason, stage=stage + 1,
                respect_hold=True, **common,
            )  # fmt: skip
        elif d.action == "hold" and not routing.held:
            registry.hold(conn, actor=self.actor, reason=d.reason)

    def _export(self, d: Decision, stage: int) -> None:
        DECISIONS.labels(d.action).inc()
        s = d.statistics
        for which in ("estimate", "lower", "upper"):
            value = s.get(which)
            BOUNDS.labels(which).set(math.nan if value is None else value)
        BOUNDS.labels("threshold").set(self.config.threshold)
        BOUNDS.labels("margin").set(-self.config.margin)
        VOTES.labels("stable").set(s["votes"]["stable"])
        VOTES.labels("canary").set(s["votes"]["canary"])
        SRM_P.set(s["srm_p_value"])
        STAGE.set(stage)

    def run(self, database_url: str, stop: threading.Event, poll_seconds: float) -> None:
        """Tick until ``stop`` is set; reconnects with backoff when Postgres goes away."""
        from feedback.db import connect, migrate

        backoff = 1.0
        while not stop.is_set():
            try:
                with connect(database_url, autocommit=True) as conn:
                    migrate(conn)
                    backoff = 1.0
                    while not stop.is_set():
                        self.tick(conn)
                        stop.wait(poll_seconds)
            except psycopg.OperationalError as exc:
                log.warning("Postgres unavailable (%s); retrying in %.0fs", exc, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 60.0)


def config_from_args(args: argparse.Namespace) -> CanaryConfig:
    """The demo or production config with the command line's overrides (an explicit 0 is
    an override too)."""
    config = CanaryConfig.demo() if args.demo else CanaryConfig()
    overrides = {
        name: value
        for name in ("test", "margin", "alpha")
        if (value := getattr(args, name, None)) is not None
    }
    return replace(config, **overrides) if overrides else config


def build_parser(settings: Any) -> argparse.ArgumentParser:
    """The ``alignloop canary`` command line (``settings``: a :class:`Settings`)."""
    ap = argparse.ArgumentParser(prog="alignloop canary", description=main.__doc__)
    ap.add_argument("--database-url", default=settings.database_url)
    ap.add_argument("--poll-seconds", type=float, default=30.0)
    ap.add_argument(
        "--port",
        "--metrics-port",
        dest="port",
        type=int,
        default=settings.admin_port,
        help="HTTP port of /metrics and /admin; 0 disables both",
    )
    ap.add_argument("--host", default=settings.admin_host, help="interface of that port")
    ap.add_argument("--demo", action="store_true", help="small demo thresholds")
    ap.add_argument(
        "--test",
        choices=TESTS,
        help="superiority (default): promote only when users prefer the candidate;"
        " non_inferiority: promote when it is at most --margin worse",
    )
    ap.add_argument(
        "--margin", type=float, help="non-inferiority margin (default 0.02; 0 is honoured)"
    )
    ap.add_argument("--alpha", type=float, help="error probability (default 0.05)")
    ap.add_argument("--model-name", default="alignloop", help="the routed model name")
    ap.add_argument("--once", action="store_true", help="one tick, print it, exit")
    return ap


def main(argv: list[str] | None = None) -> int:
    """``alignloop canary``: run the canary controller until SIGTERM / Ctrl-C."""
    from schemas.settings import Settings

    settings = Settings()
    ap = build_parser(settings)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if not args.database_url:
        print("alignloop canary: set ALIGNLOOP_DATABASE_URL or --database-url", file=sys.stderr)
        return 2
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"alignloop canary: {exc}", file=sys.stderr)
        return 2
    controller = CanaryController(config, model_name=args.model_name)
    if args.once:
        from feedback.db import connect, migrate

        with connect(args.database_url, autocommit=True) as conn:
            migrate(conn)
            decision = controller.tick(conn)
        print(decision if decision else "no active canary")
        return 0
    http = None
    if args.port:
        from deploy.ops.admin_api import create_app, serve_in_thread

        app = create_app(args.database_url, settings.admin_token)
        http = serve_in_thread(app, args.host, args.port)
        log.info("/metrics and /admin on http://%s:%d", args.host, args.port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    started = time.monotonic()
    try:
        controller.run(args.database_url, stop, args.poll_seconds)
    finally:
        if http is not None:
            server, thread = http
            server.should_exit = True
            thread.join(10)
    log.info("canary controller stopped after %.0fs", time.monotonic() - started)
    return 0
