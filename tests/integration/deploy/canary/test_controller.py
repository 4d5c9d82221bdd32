"""The canary controller end to end on real Postgres: candidates become canaries, votes
written by the ingestor's own batch writer are read back per user and stratum, the ramp
advances, and decisions (with their statistics and one-line reasons) land in the registry
and the audit log. The sample-ratio check is on, as in production: users are sticky (each
user name always lands in one arm, as serving's hash routing does), and the test counts
distinct users by their first routed interaction, so one heavy user is one user."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator

import psycopg
import pytest

from deploy.canary.controller import CanaryController
from deploy.canary.stats import CanaryConfig
from deploy.policies import registry
from feedback.db import connect
from feedback.ingest.writer import prepare_session, store_events
from tests.fixtures.postgres import make_feedback, make_interaction

# Demo thresholds without time minimums, so the test needs no sleeping. SRM check on.
CONFIG = dataclasses.replace(CanaryConfig.demo(), min_stage_duration_s=0, min_duration_s=0)
FIRST, LAST = CONFIG.stages[0], CONFIG.stages[-1]


@pytest.fixture
def conn(migrated_url: str) -> Iterator[psycopg.Connection]:
    with connect(migrated_url, autocommit=True) as c:
        prepare_session(c)  # the ingestor's scratch tables, for store_events
        yield c


def _users(prefix: str, start: int, count: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(start, start + count)]


def _votes(
    conn: psycopg.Connection, policy: str, n: int, up_rate: float, users: list[str], seed: int
) -> None:
    """n answers of ``policy``, each rated once by the user it was served to; the users
    take turns, so each of them appears (in this order) when n >= len(users)."""
    rng = random.Random(seed)
    events = []
    for i in range(n):
        user = users[i % len(users)]
        interaction = make_interaction(policy=policy, user=user, answers=(f"a{i}",))
        rating = "up" if rng.random() < up_rate else "down"
        events += [interaction, make_feedback(interaction.response_id, rating, user=user)]
    store_events(conn, events)


def _requests(conn: psycopg.Connection, policy: str, n: int, user: str) -> None:
    """n unrated answers of ``policy`` to one user."""
    store_events(conn, [make_interaction(policy=policy, user=user) for _ in range(n)])


def _start(conn: psycopg.Connection, controller: CanaryController) -> None:
    registry.register_candidate(conn, "v1", "/adapters/v1", actor="trainer")
    assert controller.tick(conn) is None  # starts the canary


def test_candidate_ramps_and_is_promoted(conn: psycopg.Connection) -> None:
    controller = CanaryController(CONFIG, settle_seconds=0)
    assert controller.tick(conn) is None  # nothing to do
    _start(conn, controller)
    routing = registry.routing_table(conn)
    assert (routing.canary_version, routing.canary_weight, routing.canary_stage) == ("v1", FIRST, 0)

    # Stage 0 at 10%: 54 stable users, 6 canary users.
    _votes(conn, "base", 400, 0.6, _users("s", 0, 54), seed=1)
    _votes(conn, "v1", 60, 0.8, _users("c", 0, 6), seed=2)
    decision = controller.tick(conn)
    assert decision is not None and decision.action == "advance_stage", decision
    routing = registry.routing_table(conn)
    assert (routing.canary_weight, routing.canary_stage) == (LAST, 1)

    # Stage 1 at 50%: returning users of stage 0 plus 30 new users in each arm.
    _votes(conn, "base", 400, 0.6, _users("s", 24, 60), seed=3)
    _votes(conn, "v1", 400, 0.8, _users("c", 0, 36), seed=4)
    decision = controller.tick(conn)
    assert decision is not None and decision.action == "promote", decision
    s = decision.statistics
    assert s["votes"] == {"stable": 800, "canary": 460}
    assert s["users"] == {"stable": 84, "canary": 36}
    assert s["strata_weights"] == [FIRST, LAST]
    assert s["srm_new_users"] == {"stable": [54, 30], "canary": [6, 30]}
    assert s["srm_p_value"] > CONFIG.srm_p_value and s["lower"] > 0
    assert registry.get(conn, "v1").state == "stable"
    assert registry.routing_table(conn).stable_version == "v1"

    trail = [(a.actor, a.action) for a in registry.audit_log(conn, "v1")]
    assert ("controller", "decision:advance_stage") in trail
    assert trail[-2:] == [("controller", "decision:promote"), ("controller", "promote")]
    promote = [a for a in registry.audit_log(conn, "v1") if a.action == "promote"][-1]
    assert promote.statistics is not None and promote.statistics["lower"] > 0
    assert promote.reason is not None and promote.reason.startswith("users prefer the canary")
    assert "votes stable/canary 800/460, users 84/36" in promote.reason


def test_worse_canary_is_rolled_back_and_hold_is_respected(conn: psycopg.Connection) -> None:
    controller = CanaryController(CONFIG, settle_seconds=0)
    _start(conn, controller)
    registry.set_canary_weight(conn, "v1", LAST, actor="alice", stage=1)
    _votes(conn, "base", 400, 0.8, _users("s", 0, 30), seed=5)
    _votes(conn, "v1", 400, 0.5, _users("c", 0, 30), seed=6)

    registry.hold(conn, actor="alice", reason="looking at it")
    decision = controller.tick(conn)
    assert decision is not None and decision.action == "hold"
    assert registry.get(conn, "v1").state == "canary"

    registry.resume(conn, actor="alice")
    decision = controller.tick(conn)
    assert decision is not None and decision.action == "rollback", decision
    assert decision.reason.startswith("users like the canary less: upper bound")
    assert "superiority, threshold 0" in decision.reason
    assert registry.get(conn, "v1").state == "rolled_back"
    routing = registry.routing_table(conn)
    assert (routing.stable_version, routing.canary_version) == ("base", None)


def test_one_heavy_user_does_not_hold_the_canary(conn: psycopg.Connection) -> None:
    """The demo's single client identity sends every request to one arm: one user, so no
    evidence of a mismatch. Then a population joins, one of them busy (300 requests, all
    stable, as sticky routing must): 390 stable requests against 10 canary ones would fail
    a request-count test at 10% by far; by users (46 stable, 5 canary) routing is fine."""
    controller = CanaryController(CONFIG, settle_seconds=0)
    _start(conn, controller)
    _requests(conn, "base", 200, "key:demo-client")
    decision = controller.tick(conn)
    assert decision is not None and decision.action == "continue", decision
    assert decision.statistics["srm_new_users"] == {"stable": [1], "canary": [0]}
    assert decision.statistics["srm_p_value"] == 1.0

    _requests(conn, "base", 100, "key:demo-client")
    _votes(conn, "base", 90, 0.6, _users("s", 0, 45), seed=7)
    _votes(conn, "v1", 10, 0.6, _users("c", 0, 5), seed=8)
    decision = controller.tick(conn)
    assert decision is not None and decision.action == "continue", decision
    assert decision.statistics["srm_new_users"] == {"stable": [46], "canary": [5]}
    assert decision.statistics["srm_p_value"] > CONFIG.srm_p_value
    assert registry.get(conn, "v1").state == "canary"
    assert not registry.routing_table(conn).held


def test_missing_canary_users_hold_for_a_human(conn: psycopg.Connection) -> None:
    """At 50%, 80 users were first served stable and 20 canary: the router (or the log) is
    losing canary users. The controller holds the registry and says why."""
    controller = CanaryController(CONFIG, settle_seconds=0)
    _start(conn, controller)
    registry.set_canary_weight(conn, "v1", LAST, actor="alice", stage=1)
    _votes(conn, "base", 160, 0.6, _users("s", 0, 80), seed=9)
    _votes(conn, "v1", 40, 0.9, _users("c", 0, 20), seed=10)
    decision = controller.tick(conn)
    assert decision is not None and decision.action == "hold", decision
    assert decision.reason.startswith("sample ratio mismatch: anytime p = ")
    assert "new users stable/canary 0/0 at 10%, 80/20 at 50%" in decision.reason
    routing = registry.routing_table(conn)
    assert routing.held and routing.canary_version == "v1"


def test_pinned_requests_do_not_count(conn: psycopg.Connection) -> None:
    """Answers a client asked for by version name are not part of the randomized test."""
    controller = CanaryController(CONFIG, settle_seconds=0)
    _start(conn, controller)
    events = []
    for i in range(50):
        interaction = make_interaction(policy="v1", user=f"u{i}")
        interaction = interaction.model_copy(update={"model": "v1"})
        events += [interaction, make_feedback(interaction.response_id, "up", user=f"u{i}")]
    store_events(conn, events)
    decision = controller.tick(conn)
    assert decision is not None and decision.statistics["votes"]["canary"] == 0
    assert decision.statistics["srm_new_users"] == {"stable": [0], "canary": [0]}
