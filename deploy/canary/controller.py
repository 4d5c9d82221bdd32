"""The canary controller's loop: each tick reads the live A/B data, decides, records the
decision and carries it out through the registry.

Each tick:

1. no canary, not held, a candidate waiting → start the oldest candidate as canary at the
   first ramp weight;
2. a canary running → read its live votes (:mod:`deploy.canary.data`), decide
   (:func:`deploy.canary.decision.decide`), write the decision with its statistics to the
   audit log, and carry it out through the registry: promote, roll back, advance the ramp,
   or hold for a human.

Every registry command carries the routing generation the decision was made on, so if an
operator changed anything in between, the command fails with ``ConcurrentChange`` and the
next tick decides again on fresh data. While the registry is held the controller starts,
advances and promotes nothing; guardrail rollbacks still happen unless
``CanaryConfig.guardrails_override_hold`` is off.
"""

from __future__ import annotations

import logging
import math
import threading

import psycopg
from prometheus_client import Counter, Gauge

from deploy.canary import data as canary_data
from deploy.canary.decision import Decision, decide
from deploy.canary.stats import CanaryConfig
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
# Before the first tick: no canary, no evidence of a mismatch (0 would read as "first
# stage" and "mismatch certain" on dashboards and alerts).
STAGE.set(-1)
SRM_P.set(1.0)


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
        now = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]  # always one row
        strata = registry.canary_strata(conn, canary, routing.canary_started_at)
        obs = canary_data.load_observations(
            conn,
            canary,
            routing.stable_version,
            strata,
            now,
            model_name=self.model_name,
            settle_seconds=self.settle_seconds,
            principal_cap=self.config.max_principal_vote_share,
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
