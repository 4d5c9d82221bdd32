"""The Postgres half of the ingestor against a real server: migrations, idempotent batch
writes, latest-wins ratings, late interactions, and the A/B counters."""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from feedback.ab_counters import PolicyCounts, policy_counts, recount_policy_counts
from feedback.db import connect, load_migrations, migrate
from feedback.ingest.writer import store_events
from tests.fixtures.postgres import make_feedback, make_interaction

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def _current(conn: psycopg.Connection, response_id: str) -> list[tuple]:
    return conn.execute(
        "SELECT choice_index, user_key, rating FROM feedback_current WHERE response_id = %s"
        " ORDER BY 1, 2",
        (response_id,),
    ).fetchall()


def test_migrations_are_idempotent(pg_url: str) -> None:
    versions = [m.version for m in load_migrations()]
    with connect(pg_url, autocommit=True) as conn:
        assert migrate(conn) == versions
        assert migrate(conn) == []
        recorded = conn.execute("SELECT version FROM schema_migrations ORDER BY 1").fetchall()
    assert [r[0] for r in recorded] == versions


def test_concurrent_migrations_do_not_race(pg_url: str) -> None:
    """Eight processes' worth of connections migrating at once: exactly one applies each
    file, nobody fails (without the advisory lock, CREATE TABLE collides)."""
    barrier = threading.Barrier(8)
    results: list[list[int]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with connect(pg_url, autocommit=True) as c:
                barrier.wait()
                results.append(migrate(c))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(results, key=len) == [[]] * 7 + [[m.version for m in load_migrations()]]


def test_redelivered_batch_inserts_nothing_and_counts_nothing(conn: psycopg.Connection) -> None:
    interaction = make_interaction(answers=("a", "b"))
    up = make_feedback(interaction.response_id, "up", at=T0)
    first = store_events(conn, [interaction, up])
    again = store_events(conn, [interaction, up, interaction])
    assert (first.interactions, first.feedback) == (1, 1)
    assert (again.interactions, again.feedback) == (0, 0)
    assert policy_counts(conn) == {"v1": PolicyCounts(served=2, rated=1, ups=1, downs=0)}
    n_choices = conn.execute("SELECT count(*) FROM interaction_choices").fetchone()
    assert n_choices == (2,)


def test_rerating_latest_wins_history_keeps_both_counters_flip(
    conn: psycopg.Connection,
) -> None:
    interaction = make_interaction()
    store_events(conn, [interaction, make_feedback(interaction.response_id, "up", at=T0)])
    assert policy_counts(conn)["v1"] == PolicyCounts(served=1, rated=1, ups=1, downs=0)

    store_events(conn, [make_feedback(interaction.response_id, "down", at=T0 + timedelta(1))])
    assert _current(conn, interaction.response_id) == [(0, "u1", "down")]
    history = conn.execute("SELECT rating FROM feedback_events ORDER BY occurred_at").fetchall()
    assert history == [("up",), ("down",)]
    assert policy_counts(conn)["v1"] == PolicyCounts(served=1, rated=1, ups=0, downs=1)


def test_out_of_order_older_rating_does_not_replace_newer(conn: psycopg.Connection) -> None:
    interaction = make_interaction()
    newer = make_feedback(interaction.response_id, "down", at=T0 + timedelta(minutes=5))
    older = make_feedback(interaction.response_id, "up", at=T0)
    store_events(conn, [interaction, newer])
    store_events(conn, [older])
    assert _current(conn, interaction.response_id) == [(0, "u1", "down")]
    assert conn.execute("SELECT count(*) FROM feedback_events").fetchone() == (2,)
    assert policy_counts(conn)["v1"] == PolicyCounts(served=1, rated=1, ups=0, downs=1)


def test_both_orders_in_one_batch_keep_the_newer(conn: psycopg.Connection) -> None:
    interaction = make_interaction()
    newer = make_feedback(interaction.response_id, "up", at=T0 + timedelta(seconds=1))
    older = make_feedback(interaction.response_id, "down", at=T0)
    store_events(conn, [newer, interaction, older])
    assert _current(conn, interaction.response_id) == [(0, "u1", "up")]
    assert policy_counts(conn)["v1"] == PolicyCounts(served=1, rated=1, ups=1, downs=0)


def test_feedback_before_interaction_is_kept_and_counted_when_it_arrives(
    conn: psycopg.Connection,
) -> None:
    interaction = make_interaction(policy="canary-7", answers=("x", "y"))
    rid = interaction.response_id
    store_events(conn, [make_feedback(rid, "up", at=T0, user="a")])
    store_events(conn, [make_feedback(rid, "down", at=T0, user="b", choice_index=1)])
    store_events(conn, [make_feedback(rid, "down", at=T0 + timedelta(1), user="a")])  # re-rate
    assert _current(conn, rid) == [(0, "a", "down"), (1, "b", "down")]
    assert policy_counts(conn, ["canary-7"]) == {"canary-7": PolicyCounts()}

    store_events(conn, [interaction])
    assert policy_counts(conn, ["canary-7"])["canary-7"] == PolicyCounts(
        served=2, rated=2, ups=0, downs=2
    )
    joined = conn.execute(
        "SELECT count(*) FROM feedback_current f JOIN interactions i USING (response_id)"
    ).fetchone()
    assert joined == (2,)


def test_anonymous_and_named_users_rate_separately(conn: psycopg.Connection) -> None:
    interaction = make_interaction()
    rid = interaction.response_id
    store_events(
        conn,
        [
            interaction,
            make_feedback(rid, "up", user=None, at=T0),
            make_feedback(rid, "down", user="u9", at=T0),
        ],
    )
    assert _current(conn, rid) == [(0, "", "up"), (0, "u9", "down")]
    assert policy_counts(conn)["v1"] == PolicyCounts(served=1, rated=1, ups=1, downs=1)


def test_incremental_counters_match_a_full_recount_under_random_traffic(
    conn: psycopg.Connection,
) -> None:
    """Random interleaving of interactions, ratings (re-ratings, late, out of order) and
    redeliveries of random earlier batches: the incremental counters must equal counting
    from scratch after every batch."""
    rng = random.Random(7)
    interactions = [
        make_interaction(policy=rng.choice(["v1", "v2", "v3"]), answers=("a", "b", "c")[:k])
        for k in (rng.randint(1, 3) for _ in range(40))
    ]
    events = list(interactions)
    for _ in range(150):
        target = rng.choice(interactions)
        events.append(
            make_feedback(
                target.response_id,
                rng.choice(["up", "down"]),
                user=rng.choice(["a", "b", None]),
                choice_index=rng.randrange(len(target.choices)),
                at=T0 + timedelta(seconds=rng.randint(0, 50)),
            )
        )
    rng.shuffle(events)
    sent: list[list] = []
    while events:
        batch = [events.pop() for _ in range(min(len(events), rng.randint(1, 12)))]
        if sent and rng.random() < 0.3:
            batch += rng.choice(sent)  # redelivery mixed into a new batch
        sent.append(batch)
        store_events(conn, batch)
        assert policy_counts(conn) == recount_policy_counts(conn)
    served = sum(len(i.choices) for i in interactions)
    assert sum(c.served for c in policy_counts(conn).values()) == served


def test_event_that_postgres_rejects_does_not_block_the_batch(conn: psycopg.Connection) -> None:
    """A NUL character passes pydantic but not Postgres text: store_events fails as a whole
    (the ingestor then isolates it, see the Kafka tests); the transaction leaves nothing."""
    good = make_interaction()
    bad = make_interaction(prompt="nul\x00byte")
    with pytest.raises(psycopg.DataError):
        store_events(conn, [good, bad])
    assert conn.execute("SELECT count(*) FROM interactions").fetchone() == (0,)
    assert policy_counts(conn) == {}


def test_each_batch_stamps_its_commit_and_day_old_stamps_go(conn: psycopg.Connection) -> None:
    """Step 6: one ``ingest_commits`` row per batch transaction, found from the batch's rows
    through their xmin, with the events written; a stamp older than a day is deleted by the
    next batch's stamp, a younger one is kept."""
    conn.execute(
        "INSERT INTO ingest_commits VALUES ('1'::xid8, now() - interval '25 hours', 1),"
        " ('2'::xid8, now() - interval '23 hours', 1)"
    )
    first = make_interaction(user="ada")
    store_events(conn, [first, make_feedback(first.response_id, "up", user="ada")])
    row = conn.execute(
        "SELECT ic.events, ic.committed_at >= i.ingested_at FROM interactions i"
        " JOIN ingest_commits ic ON ic.xact::xid = i.xmin WHERE i.response_id = %s",
        (first.response_id,),
    ).fetchone()
    assert row == (2, True)
    xacts = {r[0] for r in conn.execute("SELECT xact::text FROM ingest_commits").fetchall()}
    assert "1" not in xacts and "2" in xacts and len(xacts) == 2
