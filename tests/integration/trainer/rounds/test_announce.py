"""The trainer's ``PolicyCandidate`` announcement: published to a real broker by
``trainer.rounds.announce``, consumed by the real ingestor without a dead letter (counted,
not stored), and a clear error when no broker answers."""

from __future__ import annotations

import time

import psycopg
import pytest
from kafka import KafkaProducer
from prometheus_client import REGISTRY

from feedback.db import connect
from feedback.ingest.writer import store_events
from schemas.events import AdapterLoadFailed, PolicyCandidate
from tests.fixtures.broker import consume_records, unique_topic
from tests.fixtures.ingestor import running_ingestor
from tests.fixtures.polling import wait_until
from tests.fixtures.server import free_port
from trainer.rounds.announce import PRODUCER, EventNotDelivered, publish_candidate


def _candidate(version: str = "ppo-0001") -> PolicyCandidate:
    return PolicyCandidate(
        producer=PRODUCER,
        version=version,
        adapter_uri=f"/state/policies/{version}",
        checksum="cd" * 32,
        parent_version="base",
        reward_model_version="rm-0001",
        training_round=1,
        metrics={"win_rate": 0.6},
    )


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _dead_letters() -> float:
    return sum(
        _sample("alignloop_ingest_dead_letters_total", {"kind": k})
        for k in ("invalid", "db_rejected")
    )


def test_write_batch_accepts_a_candidate_and_stores_nothing_for_it(
    conn: psycopg.Connection,
) -> None:
    failure = AdapterLoadFailed(producer="serving@test", version="v1", adapter_uri=None, error="x")
    result = store_events(conn, [_candidate(), failure])
    assert (result.interactions, result.feedback, result.preferences) == (0, 0, 0)
    assert result.adapter_load_failures == 1  # the rest of the batch is stored as before


def test_published_candidate_reaches_the_topic_and_the_ingestor_without_dead_letter(
    broker, migrated_url: str
) -> None:
    policy_topic = unique_topic("policy")
    event = _candidate()
    publish_candidate(broker.bootstrap, event, timeout_s=30.0, topic=policy_topic)

    [record] = consume_records(broker.bootstrap, policy_topic, expected=1, timeout=30)
    assert record.key == b"ppo-0001"
    assert record.event == event

    # Same key, so the same partition, after the candidate: once this failure is stored,
    # the ingestor has handled the candidate too.
    failure = AdapterLoadFailed(
        producer="serving@test", version="ppo-0001", adapter_uri=None, error="boom"
    )
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    try:
        producer.send(policy_topic, key=failure.key(), value=failure.to_bytes())
        producer.flush(timeout=30)
    finally:
        producer.close()

    dead_before = _dead_letters()

    def stored() -> int:
        with connect(migrated_url, autocommit=True) as c:
            row = c.execute("SELECT count(*) FROM adapter_load_failures").fetchone()
            return row[0]  # type: ignore[index]  # count(*) always returns a row

    with running_ingestor(
        migrated_url,
        broker.bootstrap,
        interactions_topic=unique_topic("ing-interactions"),
        feedback_topic=unique_topic("ing-feedback"),
        policy_topic=policy_topic,
        dead_letter_topic=unique_topic("ing-dlq"),
    ):
        wait_until(lambda: stored() >= 1, 60, "the failure after the candidate")
    labels = {"topic": policy_topic, "event_type": "policy.candidate"}
    assert _sample("alignloop_ingest_events_total", labels) == 1.0
    assert _dead_letters() == dead_before


def test_no_broker_raises_event_not_delivered_within_the_timeout() -> None:
    port = free_port()  # nothing listens there
    started = time.monotonic()
    with pytest.raises(EventNotDelivered, match="ppo-0001"):
        publish_candidate(f"127.0.0.1:{port}", _candidate(), timeout_s=2.0)
    assert time.monotonic() - started < 10.0
