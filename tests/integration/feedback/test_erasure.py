"""Erasure and retention against a real Postgres: a user erased among others (their rows
gone, everyone else's intact, counters equal to a full recount), redelivered and late
events of the erased user kept out by the tombstone, an erasure racing an ingest batch in
both orders, the retention purge by age, and the CLI."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from feedback import cli
from feedback.ab_counters import PolicyCounts, policy_counts, recount_policy_counts
from feedback.db import connect
from feedback.erasure import TABLES, erase_user, is_erased, purge_before, purge_older_than
from feedback.ingest.writer import prepare_session, store_events, write_batch
from schemas.events import AnyEvent, PreferenceSubmitted
from tests.fixtures.postgres import make_feedback, make_interaction

NOW = datetime.now(UTC)


def preference(
    user: str | None, chosen: str | None = None, rejected: str | None = None, *, at=None
) -> PreferenceSubmitted:
    """By response ids when given, else a text preference."""
    by_ids = chosen is not None
    return PreferenceSubmitted(
        producer="test",
        preference_id=uuid.uuid4(),
        user=user,
        chosen_response_id=chosen,
        rejected_response_id=rejected,
        messages=None if by_ids else [{"role": "user", "content": "which?"}],
        chosen=None if by_ids else "this one",
        rejected=None if by_ids else "that one",
        occurred_at=at or NOW,
    )


def nonzero(counts: dict[str, PolicyCounts]) -> dict[str, PolicyCounts]:
    """A policy whose rows are all gone keeps a row of zeros in policy_stats; a recount has
    no row for it. Both mean 'nothing'."""
    return {v: c for v, c in counts.items() if c != PolicyCounts()}


def assert_counters_exact(conn: psycopg.Connection) -> None:
    assert nonzero(policy_counts(conn)) == nonzero(recount_policy_counts(conn))


def rows_of(conn: psycopg.Connection, user: str) -> dict[str, int]:
    """Rows that name ``user`` as the one who was served, rated or compared."""
    one = conn.execute(
        "SELECT (SELECT count(*) FROM interactions WHERE user_id = %(u)s),"
        " (SELECT count(*) FROM feedback_events WHERE user_key = %(u)s),"
        " (SELECT count(*) FROM feedback_current WHERE user_key = %(u)s),"
        " (SELECT count(*) FROM preferences WHERE user_id = %(u)s)",
        {"u": user},
    ).fetchone()
    assert one is not None
    names = ("interactions", "feedback_events", "feedback_current", "preferences")
    return dict(zip(names, one, strict=True))


def mentions(conn: psycopg.Connection, response_ids: list[str]) -> int:
    """Rows of any table that hang on one of ``response_ids``."""
    row = conn.execute(
        "SELECT (SELECT count(*) FROM interactions WHERE response_id = ANY(%(r)s))"
        " + (SELECT count(*) FROM interaction_choices WHERE response_id = ANY(%(r)s))"
        " + (SELECT count(*) FROM feedback_events WHERE response_id = ANY(%(r)s))"
        " + (SELECT count(*) FROM feedback_current WHERE response_id = ANY(%(r)s))"
        " + (SELECT count(*) FROM preferences WHERE chosen_response_id = ANY(%(r)s)"
        "    OR rejected_response_id = ANY(%(r)s))",
        {"r": response_ids},
    ).fetchone()
    assert row is not None
    return int(row[0])


def dump(conn: psycopg.Connection) -> dict[str, list[tuple]]:
    """Every row's identity, per table, to compare before and after."""
    queries = {
        "interactions": "SELECT response_id FROM interactions",
        "interaction_choices": "SELECT response_id, choice_index FROM interaction_choices",
        "feedback_events": "SELECT event_id FROM feedback_events",
        "feedback_current": "SELECT response_id, choice_index, user_key, rating, counted_policy"
        " FROM feedback_current",
        "preferences": "SELECT event_id FROM preferences",
    }
    return {t: sorted(conn.execute(q).fetchall()) for t, q in queries.items()}


class World:
    """Three users. ada: two answers (v1 with two choices, v2), a rating of bob's answer,
    a text preference. bob: one answer (v1), rates ada's second choice down and his own
    answer, compares ada's answer with his. cy: one answer (v2), rates it and ada's v2
    answer, compares his answer with bob's. Plus a rating still waiting for its answer."""

    def __init__(self) -> None:
        self.ada1 = make_interaction(policy="v1", answers=("a", "b"), user="ada")
        self.ada2 = make_interaction(policy="v2", user="ada")
        self.bob1 = make_interaction(policy="v1", user="bob")
        self.cy1 = make_interaction(policy="v2", user="cy")
        a1, a2, b1, c1 = (i.response_id for i in (self.ada1, self.ada2, self.bob1, self.cy1))
        self.ada_answers = [a1, a2]
        self.ada_events: list[AnyEvent] = [
            self.ada1,
            self.ada2,
            make_feedback(a1, "up", user="ada"),
            make_feedback(b1, "up", user="ada"),
            preference("ada"),
        ]
        self.others: list[AnyEvent] = [
            self.bob1,
            self.cy1,
            make_feedback(b1, "down", user="bob"),
            make_feedback(c1, "up", user="cy"),
            make_feedback(f"chatcmpl-{uuid.uuid4().hex}", "up", user="bob"),  # pending
            preference("cy", c1, b1),
        ]
        # Other users' rows about ada's answers: erased with them.
        self.about_ada: list[AnyEvent] = [
            make_feedback(a1, "down", user="bob", choice_index=1),
            make_feedback(a2, "down", user="cy"),
            preference("bob", a1, b1),
        ]

    def all(self) -> list[AnyEvent]:
        return [*self.ada_events, *self.others, *self.about_ada]


def test_erase_a_user_among_others(conn: psycopg.Connection) -> None:
    w = World()
    store_events(conn, w.all())
    before = dump(conn)
    counts = erase_user(conn, "ada", actor="ops", reason="user asked (ticket 7)")

    assert rows_of(conn, "ada") == dict.fromkeys(rows_of(conn, "ada"), 0)
    assert mentions(conn, w.ada_answers) == 0
    assert counts == {
        "interactions": 2,
        "interaction_choices": 3,
        "feedback_events": 4,  # ada's two, bob's and cy's of her answers
        "feedback_current": 4,
        "preferences": 2,  # ada's own, bob's naming her answer
    }
    after = dump(conn)
    for table, rows in after.items():  # nothing else was touched
        assert set(rows) <= set(before[table]), table
        assert len(before[table]) - len(rows) == counts[table], table
    assert rows_of(conn, "bob")["feedback_events"] == 2
    assert rows_of(conn, "cy") == {
        "interactions": 1, "feedback_events": 1, "feedback_current": 1, "preferences": 1,
    }  # fmt: skip
    assert_counters_exact(conn)
    # bob's answer is still rated (by bob), with ada's up taken out of it.
    assert policy_counts(conn)["v1"] == PolicyCounts(served=1, rated=1, ups=0, downs=1)
    assert policy_counts(conn)["v2"] == PolicyCounts(served=1, rated=1, ups=1, downs=0)
    tomb = conn.execute("SELECT user_hash, actor, reason FROM user_tombstones").fetchall()
    assert len(tomb) == 1 and tomb[0][1:] == ("ops", "user asked (ticket 7)")
    assert "ada" not in tomb[0][0] and is_erased(conn, "ada") and not is_erased(conn, "bob")


def test_delete_user_then_redeliver_rows_stay_gone(conn: psycopg.Connection) -> None:
    w = World()
    store_events(conn, w.all())
    erase_user(conn, "ada", actor="ops", reason="erasure request")
    after_erasure = dump(conn)
    counts_after_erasure = policy_counts(conn)

    redelivered = store_events(conn, w.all())  # the whole batch again, as Kafka may
    assert redelivered.erased == len(w.ada_events) + len(w.about_ada)
    assert (redelivered.interactions, redelivered.feedback, redelivered.preferences) == (0, 0, 0)
    assert dump(conn) == after_erasure
    assert policy_counts(conn) == counts_after_erasure

    # Events of ada's that were still on their way (a spool, a lagging partition): a new
    # answer of hers, a rating by bob of her old answer, a re-rating by ada of bob's answer.
    late = make_interaction(user="ada")
    pending_on_late = make_feedback(late.response_id, "up", user="cy")
    store_events(conn, [pending_on_late])  # cy's rating arrives before ada's answer
    result = store_events(
        conn,
        [
            late,
            make_feedback(w.ada_answers[0], "up", user="bob"),
            make_feedback(w.bob1.response_id, "down", user="ada"),
            preference("dan", late.response_id, w.cy1.response_id),
        ],
    )
    assert result.erased == 4 and result.interactions == 0
    assert mentions(conn, [*w.ada_answers, late.response_id]) == 0
    assert dump(conn) == after_erasure
    assert_counters_exact(conn)
    # Other users are not affected by the tombstone.
    fresh = make_interaction(user="bob")
    assert (
        store_events(conn, [fresh, make_feedback(fresh.response_id, "up", user="cy")]).erased == 0
    )
    assert mentions(conn, [fresh.response_id]) == 4
    assert_counters_exact(conn)


def _second_connection(url: str) -> psycopg.Connection:
    c = connect(url, autocommit=True)
    prepare_session(c)
    return c


def test_an_erasure_waits_for_the_batch_in_flight_and_wins(
    conn: psycopg.Connection, migrated_url: str
) -> None:
    """The batch holds the write lock and commits after the erasure started: the erasure
    waits for it, then deletes what it wrote."""
    w = World()
    done = threading.Event()
    with conn.transaction():
        write_batch(conn, w.all())
        eraser = threading.Thread(
            target=lambda: (_erase(migrated_url), done.set()), name="eraser", daemon=True
        )
        eraser.start()
        time.sleep(0.5)
        assert not done.is_set(), "the erasure did not wait for the batch's lock"
    eraser.join(30)
    assert done.is_set()
    assert rows_of(conn, "ada") == dict.fromkeys(rows_of(conn, "ada"), 0)
    assert mentions(conn, w.ada_answers) == 0
    assert_counters_exact(conn)


def _erase(url: str) -> None:
    with connect(url, autocommit=True) as c:
        erase_user(c, "ada", actor="ops", reason="race")


def test_a_batch_that_waited_for_an_erasure_drops_the_users_events(
    conn: psycopg.Connection, migrated_url: str
) -> None:
    """The erasure holds the lock when the batch starts: the batch waits, then sees the
    tombstone and stores nothing of ada's."""
    w = World()
    results = []
    with _second_connection(migrated_url) as writer:
        with conn.transaction():
            erase_user(conn, "ada", actor="ops", reason="race")  # nested: not committed yet
            batch = threading.Thread(
                target=lambda: results.append(store_events(writer, w.all())), daemon=True
            )
            batch.start()
            time.sleep(0.5)
            assert not results, "the batch did not wait for the erasure's lock"
        batch.join(30)
    assert len(results) == 1 and results[0].erased == len(w.ada_events) + len(w.about_ada)
    assert mentions(conn, w.ada_answers) == 0
    assert rows_of(conn, "ada") == dict.fromkeys(rows_of(conn, "ada"), 0)
    assert_counters_exact(conn)


def test_erasure_refuses_an_empty_user_or_reason(conn: psycopg.Connection) -> None:
    store_events(conn, [make_interaction(user=None)])
    with pytest.raises(ValueError, match="user"):
        erase_user(conn, "", actor="ops", reason="r")
    with pytest.raises(ValueError, match="reason"):
        erase_user(conn, "ada", actor="ops", reason="  ")
    assert conn.execute("SELECT count(*) FROM user_tombstones").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM interactions").fetchone() == (1,)


def _aged(event, days: float):
    return event.model_copy(update={"occurred_at": NOW - timedelta(days=days)})


def test_purge_by_age(conn: psycopg.Connection) -> None:
    old = _aged(make_interaction(policy="v1", answers=("a", "b"), user="ada"), 40)
    recent = make_interaction(policy="v1", user="bob")
    kept_rating = make_feedback(recent.response_id, "up", user="cy")
    events: list[AnyEvent] = [
        old,
        recent,
        make_feedback(old.response_id, "up", user="bob"),  # recent, but of an old answer
        _aged(make_feedback(recent.response_id, "down", user="dan"), 31),  # old rating
        kept_rating,
        _aged(preference("ada"), 35),
        preference("bob", recent.response_id, old.response_id),  # names the old answer
        kept_pref := preference("cy"),
    ]
    store_events(conn, events)
    counts = purge_older_than(conn, 30, chunk=1)  # one row per table and transaction
    assert counts == {
        "interactions": 1,
        "interaction_choices": 2,
        "feedback_events": 2,
        "feedback_current": 2,
        "preferences": 2,
    }
    assert conn.execute("SELECT response_id FROM interactions").fetchall() == [
        (recent.response_id,)
    ]
    assert conn.execute("SELECT event_id FROM feedback_events").fetchall() == [
        (kept_rating.event_id,)
    ]
    assert conn.execute("SELECT event_id FROM preferences").fetchall() == [(kept_pref.event_id,)]
    assert_counters_exact(conn)
    assert policy_counts(conn)["v1"] == PolicyCounts(served=1, rated=1, ups=1, downs=0)
    assert purge_older_than(conn, 30) == dict.fromkeys(TABLES, 0)
    # A purge is not a tombstone: nothing stops an old event from being stored again.
    assert store_events(conn, [old]).interactions == 1
    assert purge_before(conn, NOW - timedelta(days=30))["interactions"] == 1


def test_cli_delete_and_purge(
    conn: psycopg.Connection, migrated_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    w = World()
    store_events(conn, [*w.all(), _aged(make_interaction(user="eve"), 10)])
    rc = cli.data_main(
        ["delete", "--user", "ada", "--reason", "ticket 9", "--actor", "sam",
         "--database-url", migrated_url]
    )  # fmt: skip
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["user"] == "ada" and out["deleted"]["interactions"] == 2
    assert set(out["deleted"]) == set(TABLES)
    assert mentions(conn, w.ada_answers) == 0
    assert conn.execute("SELECT actor, reason FROM user_tombstones").fetchall() == [
        ("sam", "ticket 9")
    ]
    assert_counters_exact(conn)

    rc = cli.data_main(["purge", "--older-than-days", "7", "--database-url", migrated_url])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["deleted"]["interactions"] == 1
    assert rows_of(conn, "eve")["interactions"] == 0
    assert rows_of(conn, "bob")["interactions"] == 1

    assert cli.data_main(["delete", "--user", "bob", "--reason", " ",
                          "--database-url", migrated_url]) == 2  # fmt: skip
    assert rows_of(conn, "bob")["interactions"] == 1
    with pytest.raises(SystemExit):
        cli.data_main(["delete", "--user", "bob", "--database-url", migrated_url])
    assert cli.data_main(["purge", "--older-than-days", "0", "--database-url", migrated_url]) == 2
