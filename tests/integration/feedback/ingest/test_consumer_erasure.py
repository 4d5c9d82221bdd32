"""Erasure and retention through the real ingestor and a real broker: a user erased after
ingestion stays erased when a consumer group reads the topics again from the start (the
redelivery Kafka may do at any time), with user ids stored raw or as keyed hashes, and an
ingestor with a retention period purges old rows on its own."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from feedback.ab_counters import policy_counts, recount_policy_counts
from feedback.db import connect
from feedback.erasure import erase_user
from feedback.ingest.writer import prepare_session, store_events
from feedback.user_ids import UserIds
from schemas.events import AnyEvent, PreferenceSubmitted
from tests.fixtures.broker import unique_topic
from tests.fixtures.ingestor import running_ingestor
from tests.fixtures.polling import wait_until
from tests.fixtures.postgres import make_feedback, make_interaction


class Topics:
    """One-partition topics (so a marker produced last is consumed last) and the ingestor
    configuration that reads them."""

    def __init__(self, bootstrap: str) -> None:
        self.interactions = unique_topic("er-interactions")
        self.feedback = unique_topic("er-feedback")
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
        try:
            admin.create_topics([NewTopic(t, 1, 1) for t in (self.interactions, self.feedback)])
        finally:
            admin.close()

    def config(self) -> dict[str, object]:
        return {
            "interactions_topic": self.interactions,
            "feedback_topic": self.feedback,
            "policy_topic": None,
            "dead_letter_topic": unique_topic("er-dlq"),
        }


def produce(bootstrap: str, topics: Topics, events: Sequence[AnyEvent]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    try:
        for e in events:
            interaction = e.event_type == "interaction.logged"
            topic = topics.interactions if interaction else topics.feedback
            producer.send(topic, key=e.key(), value=e.to_bytes())
        producer.flush(timeout=60)
    finally:
        producer.close()


def count(url: str, sql: str, *args: object) -> int:
    with connect(url, autocommit=True) as conn:
        row = conn.execute(sql, args).fetchone()
    return int(row[0]) if row else 0


def stored(url: str, event_ids: list[uuid.UUID]) -> int:
    return count(
        url,
        "SELECT (SELECT count(*) FROM interactions WHERE event_id = ANY(%s))"
        " + (SELECT count(*) FROM feedback_events WHERE event_id = ANY(%s))",
        event_ids,
        event_ids,
    )


def markers() -> list[AnyEvent]:
    """An answer and a rating of it, produced after everything else."""
    i = make_interaction(user="marker")
    return [i, make_feedback(i.response_id, "up", user="marker")]


def ada_rows(url: str, ada_answers: list[str], ada: str) -> int:
    """Rows naming ``ada`` (her stored id) or one of her answers."""
    with connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM interactions WHERE user_id = %(u)s)"
            " + (SELECT count(*) FROM feedback_events WHERE user_key = %(u)s"
            "    OR response_id = ANY(%(r)s))"
            " + (SELECT count(*) FROM feedback_current WHERE user_key = %(u)s"
            "    OR response_id = ANY(%(r)s))"
            " + (SELECT count(*) FROM preferences WHERE user_id = %(u)s"
            "    OR chosen_response_id = ANY(%(r)s))",
            {"u": ada, "r": ada_answers},
        ).fetchone()
    return int(row[0]) if row else 0


@pytest.mark.parametrize("key", [None, b"a-user-id-key-for-the-ingestor!!"], ids=["raw", "keyed"])
def test_delete_user_then_redeliver_through_the_broker_rows_stay_gone(
    broker, migrated_url: str, key: bytes | None
) -> None:
    user_ids = UserIds(key)
    ada_stored = user_ids.stored("ada")
    assert ada_stored is not None
    topics = Topics(broker.bootstrap)
    ada = make_interaction(user="ada", answers=("x", "y"))
    bob = make_interaction(user="bob")
    events: list[AnyEvent] = [
        ada,
        bob,
        make_feedback(ada.response_id, "up", user="ada"),
        make_feedback(ada.response_id, "down", user="bob", choice_index=1),
        make_feedback(bob.response_id, "up", user="ada"),
        make_feedback(bob.response_id, "down", user="bob"),
        PreferenceSubmitted(
            producer="test",
            preference_id=uuid.uuid4(),
            user="bob",
            chosen_response_id=bob.response_id,
            rejected_response_id=ada.response_id,
        ),
    ]
    first = markers()
    produce(broker.bootstrap, topics, [*events, *first])
    config = {**topics.config(), "user_id_key": key}
    with running_ingestor(migrated_url, broker.bootstrap, **config):
        ids = [first[0].event_id, first[1].event_id]
        wait_until(lambda: stored(migrated_url, ids) == 2, 60, "the first ingestion")
    assert ada_rows(migrated_url, [ada.response_id], ada_stored) > 0

    with connect(migrated_url, autocommit=True) as conn:
        erase_user(conn, "ada", actor="ops", reason="erasure request", user_ids=user_ids)
    assert ada_rows(migrated_url, [ada.response_id], ada_stored) == 0

    # A new consumer group reads both topics from the start: every event of ada's is
    # delivered again, the markers after them.
    second = markers()
    produce(broker.bootstrap, topics, second)
    with running_ingestor(migrated_url, broker.bootstrap, **config):
        ids = [second[0].event_id, second[1].event_id]
        wait_until(lambda: stored(migrated_url, ids) == 2, 60, "the redelivery")
    assert ada_rows(migrated_url, [ada.response_id], ada_stored) == 0
    bob_events = "SELECT count(*) FROM feedback_events WHERE user_key = %s"
    assert count(migrated_url, bob_events, user_ids.stored("bob")) == 1
    with connect(migrated_url, autocommit=True) as conn:
        live = {v: c for v, c in policy_counts(conn).items() if c.served}
        assert live == recount_policy_counts(conn)


def test_an_ingestor_with_a_retention_period_purges_old_rows(broker, migrated_url: str) -> None:
    old = make_interaction(user="ada").model_copy(
        update={"occurred_at": datetime.now(UTC) - timedelta(days=10)}
    )
    recent = make_interaction(user="bob")
    with connect(migrated_url, autocommit=True) as conn:
        prepare_session(conn)
        store_events(conn, [old, recent, make_feedback(old.response_id, "up", user="bob")])
    topics = Topics(broker.bootstrap)
    with running_ingestor(migrated_url, broker.bootstrap, retention_days=7, **topics.config()):
        wait_until(
            lambda: count(migrated_url, "SELECT count(*) FROM interactions") == 1,
            30,
            "the retention purge",
        )
    with connect(migrated_url, autocommit=True) as conn:
        rows = conn.execute("SELECT response_id FROM interactions").fetchall()
        assert rows == [(recent.response_id,)]
        assert conn.execute("SELECT count(*) FROM feedback_events").fetchone() == (0,)
        assert policy_counts(conn)["v1"].served == 1 == recount_policy_counts(conn)["v1"].served
