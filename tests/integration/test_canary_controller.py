"""The canary controller end to end on real Postgres: candidates become canaries, votes
written by the ingestor's own batch writer are read back per user and stratum, the ramp
advances, and decisions (with their statistics) land in the registry and the audit log."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator

import psycopg
import pytest

from deploy import registry
from deploy.canary_controller import CanaryController
from deploy.canary_stats import CanaryConfig
from feedback.db import connect
from feedback.ingestor import prepare_session, store_events
from tests.fixtures.postgres import make_feedback, make_interaction

# Demo thresholds without time minimums, so the test needs no sleeping; SRM is exercised
# by the unit tests (here the served counts are whatever the test writes).
CONFIG = dataclasses.replace(
    CanaryConfig.demo(), min_stage_duration_s=0, min_duration_s=0, srm_min_served=10**9
)


@pytest.fixture
def conn(migrated_url: str) -> Iterator[psycopg.Connection]:
    with connect(migrated_url, autocommit=True) as c:
        prepare_session(c)  # the ingestor's scratch tables, for store_events
        yield c


def _votes(
    conn: psycopg.Connection, policy: str, n: int, up_rate: float, users: int, seed: int
) -> None:
    """n answers of ``policy``, each rated once by the user it was served to."""
    rng = random.Random(seed)
    events = []
    for i in range(n):
        user = f"user{rng.randrange(users)}"
        interaction = make_interaction(policy=policy, user=user, answers=(f"a{i}",))
        rating = "up" if rng.random() < up_rate else "down"
        events += [interaction, make_feedback(interaction.response_id, rating, user=user)]
    store_events(conn, events)


def test_candidate_ramps_and_is_promoted(conn: psycopg.Connection) -> None:
    controller = CanaryController(CONFIG, settle_seconds=0)
    assert controller.tick(conn) is None  # nothing to do
    registry.register_candidate(conn, "v1", "/adapters/v1", actor="trainer")
    assert controller.tick(conn) is None  # starts the canary
    routing = registry.routing_table(conn)
    assert (routing.canary_version, routing.canary_weight, routing.canary_stage) == ("v1", 0.05, 0)

    _votes(conn, "base", 400, 0.6, users=60, seed=1)
    _votes(conn, "v1", 60, 0.8, users=60, seed=2)
    decision = controller.tick(conn)
    assert decision is not None and decision.action == "advance_stage", decision
    routing = registry.routing_table(conn)
    assert (routing.canary_weight, routing.canary_stage) == (0.5, 1)

    _votes(conn, "base", 400, 0.6, users=60, seed=3)
    _votes(conn, "v1", 400, 0.8, users=60, seed=4)
    decision = controller.tick(conn)
    assert decision is not None and decision.action == "promote", decision
    assert decision.statistics["votes"] == {"stable": 800, "canary": 460}
    assert decision.statistics["strata_weights"] == [0.05, 0.5]
    assert registry.get(conn, "v1").state == "stable"
    assert registry.routing_table(conn).stable_version == "v1"

    trail = [(a.actor, a.action) for a in registry.audit_log(conn, "v1")]
    assert ("controller", "decision:advance_stage") in trail
    assert trail[-2:] == [("controller", "decision:promote"), ("controller", "promote")]
    promote = [a for a in registry.audit_log(conn, "v1") if a.action == "promote"][-1]
    assert promote.statistics is not None and promote.statistics["lower"] > -CONFIG.margin


def test_worse_canary_is_rolled_back_and_hold_is_respected(conn: psycopg.Connection) -> None:
    controller = CanaryController(CONFIG, settle_seconds=0)
    registry.register_candidate(conn, "v1", "/adapters/v1", actor="trainer")
    controller.tick(conn)
    registry.set_canary_weight(conn, "v1", 0.5, actor="alice", stage=1)
    _votes(conn, "base", 400, 0.8, users=60, seed=5)
    _votes(conn, "v1", 400, 0.5, users=60, seed=6)

    registry.hold(conn, actor="alice", reason="looking at it")
    decision = controller.tick(conn)
    assert decision is not None and decision.action == "hold"
    assert registry.get(conn, "v1").state == "canary"

    registry.resume(conn, actor="alice")
    decision = controller.tick(conn)
    assert decision is not None and decision.action == "rollback", decision
    assert "worse than the margin" in decision.reason
    assert registry.get(conn, "v1").state == "rolled_back"
    routing = registry.routing_table(conn)
    assert (routing.stable_version, routing.canary_version) == ("base", None)


def test_pinned_requests_do_not_count(conn: psycopg.Connection) -> None:
    """Answers a client asked for by version name are not part of the randomized test."""
    controller = CanaryController(CONFIG, settle_seconds=0)
    registry.register_candidate(conn, "v1", "/adapters/v1", actor="trainer")
    controller.tick(conn)
    events = []
    for i in range(50):
        interaction = make_interaction(policy="v1", user=f"u{i}")
        interaction = interaction.model_copy(update={"model": "v1"})
        events += [interaction, make_feedback(interaction.response_id, "up", user=f"u{i}")]
    store_events(conn, events)
    decision = controller.tick(conn)
    assert decision is not None and decision.statistics["votes"]["canary"] == 0
