"""The canary's view of the live data (deploy/canary/data.py) against real Postgres rows
written by the ingestor's writer: votes per principal-qualified user, one key's weight
capped, server faults counted by principal."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import psycopg

from deploy.canary.data import load_observations
from feedback.ingest.writer import store_events
from tests.fixtures.postgres import make_feedback, make_interaction


def _served(policy: str, user: str, principal: str, rating: str) -> list:
    answer = make_interaction(policy=policy, user=user).model_copy(update={"principal": principal})
    vote = make_feedback(answer.response_id, rating, user=user).model_copy(
        update={"principal": principal}
    )
    return [answer, vote]


def _traffic() -> list:
    """`web`: 20 users, canary and stable liked alike (10 up of 20 each). `flood`: one key
    posing as 200 users, each liking every canary answer and disliking every stable one."""
    events = []
    for i in range(20):
        for policy in ("v2", "v1"):
            events += _served(policy, f"u{i}", "web", "up" if i % 2 else "down")
    for i in range(200):
        events += _served("v2", f"bot{i}", "flood", "up")
        events += _served("v1", f"bot{i}", "flood", "down")
    return events


def _observe(conn: psycopg.Connection, cap: float):
    now = datetime.now(UTC)
    strata = [(0, 0, 0.5, now - timedelta(hours=1))]
    return load_observations(conn, "v2", "v1", strata, now, settle_seconds=0, principal_cap=cap)


def _difference(obs) -> float:
    votes, ups = obs.votes.sum(axis=(0, 2)), obs.ups.sum(axis=(0, 2))
    return float(ups[1] / votes[1] - ups[0] / votes[0])


def test_one_key_cannot_carry_more_than_its_share(conn: psycopg.Connection) -> None:
    store_events(conn, _traffic())
    uncapped, capped = _observe(conn, 1.0), _observe(conn, 0.5)
    # Uncapped the flood decides: 210 of 220 canary votes up vs 10 of 220 stable.
    assert np.isclose(_difference(uncapped), 210 / 220 - 10 / 220)
    # Capped at half: the flood's 400 votes weigh as web's 40, so each arm has 20 web votes
    # (10 up) and 20 flood votes: canary (10 + 20) / 40, stable 10 / 40.
    totals = capped.votes.sum(axis=(0, 2))
    assert np.allclose(totals, [40.0, 40.0])
    assert np.isclose(_difference(capped), 30 / 40 - 10 / 40)
    assert _difference(capped) < _difference(uncapped)
    # Users are counted per key: web's u0 and a flood user named u0 would be two clusters.
    assert capped.votes.shape[0] == 220


def test_a_single_key_is_not_capped(conn: psycopg.Connection) -> None:
    events = [e for e in _traffic() if getattr(e, "principal", None) == "web"]
    store_events(conn, events)
    obs = _observe(conn, 0.5)
    assert np.allclose(obs.votes.sum(axis=(0, 2)), [20.0, 20.0])
