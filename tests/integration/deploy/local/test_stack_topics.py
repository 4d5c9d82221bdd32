"""`alignloop up` creates alignloop's topics on its broker before any child produces
(:func:`deploy.local.stack.create_topics`), with the configured partitions, and stops with
the reason when production mode finds them weaker than configured. On a private embedded
broker: the topic names are the real ones."""

from __future__ import annotations

from pathlib import Path

from kafka.admin import KafkaAdminClient

from deploy.local.stack import create_topics
from feedback.kafka_topics import ALL
from schemas.settings import Settings


def _partitions(bootstrap: str) -> dict[str, int]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        return {t["name"]: len(t["partitions"]) for t in admin.describe_topics(list(ALL))}
    finally:
        admin.close()


def test_up_creates_the_topics_then_refuses_weaker_ones_in_production(
    own_broker, tmp_path: Path
) -> None:
    settings = Settings.model_validate({"state_dir": tmp_path, "kafka_topic_partitions": 2})
    assert create_topics(settings, own_broker.bootstrap) is None
    assert _partitions(own_broker.bootstrap) == dict.fromkeys(ALL, 2)
    strict = settings.model_copy(
        update={"production": True, "kafka_replication_factor": 3, "kafka_topic_partitions": 3}
    )
    problem = create_topics(strict, own_broker.bootstrap)
    assert problem is not None and "alignloop.feedback has 1 replica(s), configured 3" in problem
    unset = settings.model_copy(update={"production": True})
    assert "needs ALIGNLOOP_KAFKA_REPLICATION_FACTOR" in (create_topics(unset, "x:1") or "")
    assert _partitions(own_broker.bootstrap) == dict.fromkeys(ALL, 2)  # left as they were
