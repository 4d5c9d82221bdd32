"""The Kafka security settings reach both client libraries, end to end over TLS: serving's
event publisher (confluent-kafka) produces through a broker that only speaks TLS
(:mod:`tests.fixtures.kafka_tls`), the ingestor (kafka-python: topic admin, consumer)
creates the topics and stores the event in Postgres, all configured from one
:class:`schemas.settings.Settings` through :mod:`schemas.kafka_config`. Without the
settings, neither client gets through."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import KafkaException, Producer
from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError

from feedback.db import connect
from feedback.kafka_topics import TopicPlan, ensure_topics
from schemas.kafka_config import confluent_config, kafka_python_config
from schemas.settings import Settings
from serving.publisher import EventPublisher
from tests.fixtures.broker import unique_topic
from tests.fixtures.ingestor import running_ingestor
from tests.fixtures.kafka_tls import TlsBroker
from tests.fixtures.polling import wait_until
from tests.fixtures.postgres import make_interaction

FAST = {"request_timeout_ms": 1_500, "delivery_timeout_ms": 5_000, "probe_interval": 0.3}


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[TlsBroker]:
    broker = TlsBroker(tmp_path).start()
    try:
        yield broker
    finally:
        broker.stop()


def _tls_settings(broker: TlsBroker) -> Settings:
    return Settings.model_validate(
        {"kafka_security_protocol": "SSL", "kafka_ssl_cafile": broker.ca_file}
    )


def test_an_event_crosses_tls_from_the_publisher_to_postgres(
    tls_broker: TlsBroker,
    migrated_url: str,
    tmp_path: Path,
) -> None:
    settings = _tls_settings(tls_broker)
    names = tuple(unique_topic(f"tls-{k}") for k in ("int", "fb", "pol", "dlq"))
    interactions, feedback, policy, dead = names
    plan = TopicPlan(partitions=1, replication_factor=1, names=names)
    topics = {"interactions_topic": interactions, "feedback_topic": feedback}
    topics |= {"policy_topic": policy, "dead_letter_topic": dead}
    publisher = EventPublisher(
        tls_broker.bootstrap, tmp_path / "spool", 1_000_000,
        producer_config=confluent_config(settings), **FAST,
    ).start()  # fmt: skip
    try:
        with running_ingestor(
            migrated_url, tls_broker.bootstrap, client_config=kafka_python_config(settings),
            topic_plan=plan, **topics,
        ):  # fmt: skip
            # The ingestor's admin made the topics over TLS (one partition each, where the
            # broker's own auto-creation would make four).
            admin = KafkaAdminClient(
                bootstrap_servers=tls_broker.bootstrap, **kafka_python_config(settings)
            )

            def made() -> bool:
                described = admin.describe_topics(list(names))
                return all(len(t["partitions"]) == 1 for t in described)

            try:
                wait_until(made, 30, "the ingestor to create the topics")
            finally:
                admin.close()
            event = make_interaction()
            assert publisher.publish(interactions, event).result(60) == "kafka"

            def stored() -> bool:
                with connect(migrated_url, autocommit=True) as conn:
                    sql = "SELECT count(*) FROM interactions WHERE response_id = %s"
                    row = conn.execute(sql, (event.response_id,)).fetchone()
                return row is not None and row[0] == 1

            wait_until(stored, 60, "the interaction in Postgres")
    finally:
        publisher.close()


def test_without_the_settings_neither_client_gets_through(tls_broker: TlsBroker) -> None:
    names = (unique_topic("tls-plain"),)
    with pytest.raises(KafkaError):  # kafka-python in plaintext: no broker it can read
        ensure_topics(tls_broker.bootstrap, TopicPlan(names=names), {}, timeout_s=3)
    # TLS without the CA: the broker's certificate is not trusted.
    untrusted = Producer(
        {"bootstrap.servers": tls_broker.bootstrap, "security.protocol": "SSL",
         "ssl.ca.location": str(tls_broker.pki["cert"]), "socket.timeout.ms": 2000}
    )  # fmt: skip
    with pytest.raises(KafkaException):
        untrusted.list_topics(timeout=3)
    trusted = Producer(
        {"bootstrap.servers": tls_broker.bootstrap, **confluent_config(_tls_settings(tls_broker))}
    )
    assert trusted.list_topics(timeout=10).brokers
    for producer in (untrusted, trusted):
        producer.flush(0)
    del untrusted, trusted  # librdkafka's threads go before the broker does
