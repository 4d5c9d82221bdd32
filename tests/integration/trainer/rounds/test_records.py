"""trainer.rounds.records against a real Postgres (migration 0006): a round's lifecycle, one
running round at most, final records, per-iteration upserts, non-finite metrics, and the
new-feedback count the scheduler reads."""

from __future__ import annotations

import math
import threading
import uuid
from pathlib import Path

import numpy as np
import psycopg
import pytest
from psycopg.types.json import Jsonb

from deploy.policies import registry
from feedback import datasets
from feedback.datasets import Watermark, capture_watermark
from feedback.db import connect
from feedback.ingest.writer import store_events
from schemas.events import PreferenceSubmitted
from tests.fixtures.postgres import make_feedback, make_interaction
from trainer.rounds import records as rr
from trainer.rounds.records import RoundAlreadyRunning, RoundFinished, UnknownRound

CONFIG = {"rollout_batch_size": 8, "clip_range": 0.2}


def _reward_model(conn: psycopg.Connection, version: str = "rm-0001") -> str:
    """A reward_models row, so the foreign key has something to point at."""
    conn.execute(
        """INSERT INTO reward_models (version, number, status, kind, path, manifest_sha256,
               watermark, metrics, reason, config, train_stats)
           VALUES (%s, 1, 'current', 'lora', '/rm', 'sha', %s, %s, 'test', %s, %s)""",
        (version, Jsonb({}), Jsonb({}), Jsonb({}), Jsonb({})),
    )
    return version


def _preference() -> PreferenceSubmitted:
    return PreferenceSubmitted(
        producer="test", preference_id=uuid.uuid4(), chosen="a", rejected="b"
    )


def _rate(conn: psycopg.Connection, n_ratings: int, n_preferences: int = 0) -> None:
    interaction = make_interaction()
    store_events(
        conn,
        [
            interaction,
            *(make_feedback(interaction.response_id, "up", user=f"u{i}") for i in range(n_ratings)),
            *(_preference() for _ in range(n_preferences)),
        ],
    )


def test_a_round_from_start_to_registered(conn: psycopg.Connection) -> None:
    assert rr.running_round(conn) is None and rr.last_round(conn) is None
    _rate(conn, 3, 1)
    started = rr.start_round(
        conn, trigger="first round: 4 new ratings >= 1", config=CONFIG, parent_version="base"
    )
    assert started.status == "running" and not started.finished
    assert (started.trigger, started.parent_version, started.config) == (
        "first round: 4 new ratings >= 1",
        "base",
        CONFIG,
    )
    assert started.finished_at is None and started.reason is None and started.metrics == {}
    # Every round marks where the next trigger counts from, even before it reads data.
    assert started.watermark == {"interactions": 1, "feedback": 3, "preferences": 1}
    assert rr.running_round(conn) == started == rr.last_round(conn)

    rm = _reward_model(conn)
    registry.register_candidate(conn, "ppo-0001", "/adapters/ppo-0001", actor="trainer")
    rr.update_round(
        conn,
        started.id,
        reward_model_version=rm,
        watermark=Watermark(interactions=1, feedback=2, preferences=0),
    )
    rr.update_round(conn, started.id)  # nothing to set: a no-op
    after = rr.get_round(conn, started.id)
    assert after.reward_model_version == rm
    assert after.watermark == {"interactions": 1, "feedback": 2, "preferences": 0}
    assert after.parent_version == "base"  # None fields are left alone

    rr.record_step(conn, started.id, 0, {"kl": 0.5, "reward_mean": 0.1})
    rr.record_step(conn, started.id, 1, {"kl": 0.7})
    rr.record_step(conn, started.id, 0, {"kl": 0.4, "resumed": True})  # re-recorded
    assert rr.steps(conn, started.id) == [(0, {"kl": 0.4, "resumed": True}), (1, {"kl": 0.7})]

    finished = rr.finish_round(
        conn,
        started.id,
        "registered",
        "passed every gate",
        metrics={"win_rate": 0.62},
        candidate_version="ppo-0001",
    )
    assert finished.status == "registered" and finished.finished
    assert (finished.reason, finished.candidate_version) == ("passed every gate", "ppo-0001")
    assert finished.metrics == {"win_rate": 0.62}
    assert finished.finished_at is not None and finished.finished_at >= finished.started_at
    assert rr.running_round(conn) is None
    assert rr.last_round(conn) == finished == rr.get_round(conn, started.id)
    assert finished.to_json()["finished_at"] == finished.finished_at.isoformat()


def test_at_most_one_running_round(conn: psycopg.Connection) -> None:
    first = rr.start_round(conn, trigger="t1", config={}, parent_version=None)
    with pytest.raises(RoundAlreadyRunning, match=f"round {first.id} is already running") as err:
        rr.start_round(conn, trigger="t2", config={}, parent_version=None)
    assert err.value.running == first
    assert [r.id for r in rr.list_rounds(conn)] == [first.id]  # nothing half-written

    rr.finish_round(conn, first.id, "failed", "not enough data: 3 pairs < 64")
    second = rr.start_round(conn, trigger="t2", config={}, parent_version=None)
    rr.finish_round(conn, second.id, "aborted", "KL 42 > 10")
    third = rr.start_round(conn, trigger="t3", config={}, parent_version=None)
    assert [r.id for r in rr.list_rounds(conn)] == [third.id, second.id, first.id]
    assert [r.id for r in rr.list_rounds(conn, limit=2)] == [third.id, second.id]
    assert rr.last_round(conn) == third == rr.running_round(conn)


def test_racing_starts_let_exactly_one_through(migrated_url: str) -> None:
    barrier = threading.Barrier(6)
    started: list[int] = []
    refused: list[RoundAlreadyRunning] = []
    errors: list[BaseException] = []

    def start(i: int) -> None:
        try:
            with connect(migrated_url, autocommit=True) as c:
                barrier.wait()
                started.append(
                    rr.start_round(c, trigger=f"t{i}", config={}, parent_version=None).id
                )
        except RoundAlreadyRunning as exc:
            refused.append(exc)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(started) == 1 and len(refused) == 5


def test_a_finished_round_is_final(conn: psycopg.Connection) -> None:
    r = rr.start_round(conn, trigger="t", config={}, parent_version=None)
    rr.record_step(conn, r.id, 0, {"kl": 0.1})
    done = rr.finish_round(
        conn,
        r.id,
        "rejected",
        "win rate 0.41 < 0.5",
        metrics={"win_rate": 0.41},
        candidate_version="ppo-x",
    )
    with pytest.raises(RoundFinished, match="already finished as rejected"):
        rr.finish_round(conn, r.id, "registered", "again", candidate_version="ppo-x")
    with pytest.raises(RoundFinished):
        rr.update_round(conn, r.id, reward_model_version="rm-0009")
    with pytest.raises(RoundFinished):
        rr.record_step(conn, r.id, 1, {"kl": 0.2})
    assert rr.get_round(conn, r.id) == done
    assert rr.steps(conn, r.id) == [(0, {"kl": 0.1})]


def test_refusals_for_bad_calls(conn: psycopg.Connection) -> None:
    with pytest.raises(UnknownRound):
        rr.finish_round(conn, 999, "failed", "x")
    with pytest.raises(UnknownRound):
        rr.record_step(conn, 999, 0, {})
    with pytest.raises(UnknownRound):
        rr.update_round(conn, 999, parent_version="base")
    with pytest.raises(UnknownRound):
        rr.get_round(conn, 999)
    r = rr.start_round(conn, trigger="t", config={}, parent_version=None)
    with pytest.raises(ValueError, match="not 'running'"):
        rr.finish_round(conn, r.id, "running", "x")  # type: ignore[arg-type]  # the refusal tested
    with pytest.raises(ValueError, match="candidate_version"):
        rr.finish_round(conn, r.id, "registered", "x")
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        rr.update_round(conn, r.id, parent_version="no-such-policy")
    with pytest.raises(ValueError, match="keys interactions, feedback, preferences"):
        rr.update_round(conn, r.id, watermark={"feedback": 1})
    assert rr.running_round(conn) == r  # still running, unchanged


def test_non_finite_and_non_json_values_are_stored_safely(conn: psycopg.Connection) -> None:
    config = {"path": Path("/tmp/x"), "betas": (0.9, 0.95), "lr": np.float32(1e-5)}
    r = rr.start_round(conn, trigger="t", config=config, parent_version=None)
    assert r.config == {"path": "/tmp/x", "betas": [0.9, 0.95], "lr": pytest.approx(1e-5)}

    metrics = {
        "policy_loss": math.nan,
        "kl": math.inf,
        "value_loss": -math.inf,
        "per_token": [1.0, np.float64("nan")],
        "nested": {"entropy": np.float32("inf"), "steps": np.int64(3)},
    }
    rr.record_step(conn, r.id, 0, metrics)
    [(iteration, stored)] = rr.steps(conn, r.id)
    assert iteration == 0
    assert stored == {
        "policy_loss": "NaN",
        "kl": "Infinity",
        "value_loss": "-Infinity",
        "per_token": [1.0, "NaN"],
        "nested": {"entropy": "Infinity", "steps": 3},
    }
    # SQL reads them back as the float values.
    row = conn.execute(
        "SELECT (metrics ->> 'policy_loss')::float8, (metrics ->> 'kl')::float8,"
        " (metrics ->> 'value_loss')::float8 FROM training_steps WHERE round_id = %s",
        (r.id,),
    ).fetchone()
    assert row is not None and math.isnan(row[0]) and row[1:] == (math.inf, -math.inf)

    done = rr.finish_round(
        conn, r.id, "aborted", "policy loss is NaN", metrics={"last_kl": float("nan")}
    )
    assert done.metrics == {"last_kl": "NaN"}


def test_new_ratings_since_counts_ratings_and_preferences(conn: psycopg.Connection) -> None:
    assert datasets.new_ratings_since(conn, None) == 0
    _rate(conn, 4, 2)
    store_events(conn, [make_interaction() for _ in range(3)])  # no feedback: not counted
    assert datasets.new_ratings_since(conn, None) == 6

    mark = capture_watermark(conn)
    assert datasets.new_ratings_since(conn, mark) == 0
    _rate(conn, 2, 0)
    assert datasets.new_ratings_since(conn, mark) == 2
    store_events(conn, [_preference()])
    assert datasets.new_ratings_since(conn, mark) == 3

    # The scheduler's way: from the last round's watermark (a dict), taken at its start.
    r = rr.start_round(conn, trigger="t", config={}, parent_version=None)
    assert datasets.new_ratings_since(conn, r.watermark) == 0
    interaction = make_interaction()
    store_events(conn, [interaction, make_feedback(interaction.response_id, "down")])
    store_events(conn, [make_feedback(interaction.response_id, "up")])  # a re-rating counts
    last = rr.last_round(conn)
    assert last is not None
    assert datasets.new_ratings_since(conn, last.watermark) == 2
