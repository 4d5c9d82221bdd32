"""Topics created at start with the configured partitions and replication, and checked,
against a real Kafka-protocol broker (the embedded Tansu: it creates topics with the
requested partitions and replica count and reports them in its metadata).

The ingestor creates missing topics and then ingests from them; existing topics are left
as they are; in production mode a topic with fewer replicas than configured stops the
ingestor (in process and as ``alignloop ingest``, exit 2 naming the topic); outside it, a
warning."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient

from feedback.db import connect
from feedback.ingest.consumer import IngestConfig, Ingestor
from feedback.kafka_topics import TopicPlan, WeakTopics, ensure_topics
from tests.fixtures.broker import unique_topic
from tests.fixtures.ingestor import running_ingestor
from tests.fixtures.polling import wait_until
from tests.fixtures.postgres import make_interaction

REPO = Path(__file__).resolve().parents[3]


def _names(prefix: str) -> tuple[str, ...]:
    return tuple(unique_topic(f"{prefix}-{kind}") for kind in ("int", "fb", "pol", "dlq"))


def _described(bootstrap: str, names: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """(partitions, replicas of the first partition) per topic, from the broker's metadata."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        topics = admin.describe_topics(list(names))
    finally:
        admin.close()
    return {
        t["name"]: (len(t["partitions"]), len(t["partitions"][0]["replica_nodes"]))
        for t in topics
        if t["partitions"]
    }


def test_missing_topics_are_created_as_configured_and_existing_ones_left(broker) -> None:
    names = _names("create")
    plan = TopicPlan(partitions=3, replication_factor=1, production=True, names=names)
    states = ensure_topics(broker.bootstrap, plan)
    assert {n: (s.partitions, s.replication, s.created) for n, s in states.items()} == {
        n: (3, 1, True) for n in names
    }
    assert _described(broker.bootstrap, names) == {n: (3, 1) for n in names}
    # Again with other numbers: nothing is created or altered.
    again = ensure_topics(broker.bootstrap, TopicPlan(partitions=5, names=names))
    assert {(s.partitions, s.created) for s in again.values()} == {(3, False)}
    assert _described(broker.bootstrap, names) == {n: (3, 1) for n in names}


def test_weaker_topics_refused_in_production_warned_otherwise(broker, caplog) -> None:
    names = _names("weak")
    ensure_topics(broker.bootstrap, TopicPlan(partitions=2, replication_factor=1, names=names))
    stronger = TopicPlan(partitions=4, replication_factor=2, production=True, names=names)
    with pytest.raises(WeakTopics) as refused:
        ensure_topics(broker.bootstrap, stronger)
    assert f"{names[1]} has 1 replica(s), configured 2" in str(refused.value)
    caplog.set_level(logging.WARNING, logger="feedback.kafka_topics")
    lenient = TopicPlan(partitions=4, replication_factor=2, names=names)
    states = ensure_topics(broker.bootstrap, lenient)
    assert {(s.partitions, s.replication) for s in states.values()} == {(2, 1)}
    text = caplog.text
    assert "topics weaker than configured" in text and "fewer than the 4 configured" in text


def test_production_mode_needs_a_replication_factor() -> None:
    with pytest.raises(ValueError, match="ALIGNLOOP_KAFKA_REPLICATION_FACTOR"):
        TopicPlan(production=True)


def test_the_ingestor_creates_its_topics_then_ingests(broker, migrated_url: str) -> None:
    names = _names("ing")
    interactions, feedback, policy, dead = names
    plan = TopicPlan(partitions=2, replication_factor=1, production=True, names=names)
    topics = {"interactions_topic": interactions, "feedback_topic": feedback}
    topics |= {"policy_topic": policy, "dead_letter_topic": dead}
    with running_ingestor(migrated_url, broker.bootstrap, topic_plan=plan, **topics):
        wait_until(lambda: len(_described(broker.bootstrap, names)) == 4, 30, "the topics")
        assert _described(broker.bootstrap, names) == {n: (2, 1) for n in names}
        event = make_interaction()
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
        producer.send(interactions, key=event.key(), value=event.to_bytes()).get(10)
        producer.close()

        def stored() -> bool:
            with connect(migrated_url, autocommit=True) as conn:
                sql = "SELECT count(*) FROM interactions WHERE response_id = %s"
                row = conn.execute(sql, (event.response_id,)).fetchone()
            return row is not None and row[0] == 1

        wait_until(stored, 60, "the interaction in Postgres")


def test_the_ingestor_refuses_weaker_topics_in_production(broker, migrated_url: str) -> None:
    names = _names("refuse")
    ensure_topics(broker.bootstrap, TopicPlan(partitions=1, replication_factor=1, names=names))
    interactions, feedback, policy, dead = names
    plan = TopicPlan(partitions=1, replication_factor=3, production=True, names=names)
    ingestor = Ingestor(
        IngestConfig(
            database_url=migrated_url, bootstrap=broker.bootstrap, metrics_port=None,
            interactions_topic=interactions, feedback_topic=feedback, policy_topic=policy,
            dead_letter_topic=dead, topic_plan=plan, group_id=unique_topic("g"),
        )
    )  # fmt: skip
    with pytest.raises(WeakTopics, match=f"{interactions} has 1 replica"):
        ingestor.run()  # before it consumes anything

    # `alignloop ingest`: exit 2 with the reason, from the settings.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGNLOOP_")}
    env |= {
        "ALIGNLOOP_DATABASE_URL": migrated_url,
        "ALIGNLOOP_KAFKA_BOOTSTRAP": broker.bootstrap,
        "ALIGNLOOP_PRODUCTION": "true",
        "ALIGNLOOP_KAFKA_REPLICATION_FACTOR": "3",
        "ALIGNLOOP_INGEST_METRICS_PORT": "0",
    }
    argv = [sys.executable, "-m", "deploy.cli", "ingest", "--interactions-topic", interactions]
    argv += ["--feedback-topic", feedback, "--policy-topic", policy, "--dead-letter-topic", dead]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "alignloop ingest: topics weaker than configured" in done.stderr
    assert f"{feedback} has 1 replica(s), configured 3" in done.stderr
    del env["ALIGNLOOP_KAFKA_REPLICATION_FACTOR"]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "needs ALIGNLOOP_KAFKA_REPLICATION_FACTOR" in done.stderr
