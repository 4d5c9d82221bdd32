"""alignloop's Kafka topics: created at start with the configured partitions and
replication factor, and checked.

:func:`ensure_topics` runs when an ingestor starts (:mod:`feedback.ingest.consumer`) and
when ``alignloop up`` has its broker, before any other process produces. For each topic of
:data:`ALL` (``schemas/topics.py``):

* missing: created with ``ALIGNLOOP_KAFKA_TOPIC_PARTITIONS`` partitions and
  ``ALIGNLOOP_KAFKA_REPLICATION_FACTOR`` replicas (unset: the broker's
  ``default.replication.factor``). A topic another process created meanwhile is fine;
* existing: left as it is (alignloop never alters or deletes a topic), then compared with
  the configuration. Fewer partitions than configured is a warning (ingestors beyond the
  count idle). Fewer replicas than ``ALIGNLOOP_KAFKA_REPLICATION_FACTOR`` is a warning, and
  with ``ALIGNLOOP_PRODUCTION=true`` a refusal (:class:`WeakTopics`): an under-replicated
  feedback topic loses acknowledged ratings with one broker. Production mode also requires
  the replication factor to be set (:class:`TopicPlan` raises ValueError).

A topic's replication is the smallest replica count over its partitions, as the brokers'
metadata reports it. Serving does not create topics: with the broker's
``auto.create.topics.enable`` off, it spools events until the ingestor has made them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kafka.admin import KafkaAdminClient, NewTopic

from schemas import topics

log = logging.getLogger(__name__)

ALL: tuple[str, ...] = (topics.INTERACTIONS, topics.FEEDBACK, topics.POLICY, topics.DEAD_LETTER)
_UNKNOWN_TOPIC = 3
_TOPIC_EXISTS = 36


class _TopicSettings(Protocol):
    kafka_topic_partitions: int
    kafka_replication_factor: int | None
    production: bool


class TopicError(RuntimeError):
    """The cluster refused a topic, or its metadata never showed one."""


class WeakTopics(TopicError):
    """Production mode and an existing topic has fewer replicas than configured."""


@dataclass(frozen=True)
class TopicPlan:
    """What the topics should be. ``replication_factor`` None: the broker's default."""

    partitions: int = 6
    replication_factor: int | None = None
    production: bool = False
    names: tuple[str, ...] = ALL

    def __post_init__(self) -> None:
        if self.partitions < 1:
            raise ValueError(f"a topic needs at least one partition, not {self.partitions}")
        if self.replication_factor is not None and self.replication_factor < 1:
            raise ValueError(f"replication factor {self.replication_factor} < 1")
        if self.production and self.replication_factor is None:
            raise ValueError(
                "production mode (ALIGNLOOP_PRODUCTION) needs ALIGNLOOP_KAFKA_REPLICATION_FACTOR "
                "(3 on a usual cluster): the topics' replication is checked against it"
            )

    @classmethod
    def from_settings(cls, settings: _TopicSettings, names: Sequence[str] = ALL) -> TopicPlan:
        return cls(
            partitions=settings.kafka_topic_partitions,
            replication_factor=settings.kafka_replication_factor,
            production=settings.production,
            names=tuple(names),
        )


@dataclass(frozen=True)
class TopicState:
    name: str
    partitions: int
    replication: int  # the smallest replica count of its partitions
    created: bool = False  # by this call


def ensure_topics(
    bootstrap: str,
    plan: TopicPlan,
    client_config: Mapping[str, Any] | None = None,
    *,
    timeout_s: float = 30.0,
) -> dict[str, TopicState]:
    """Create the missing topics of ``plan``, then check all of them (module doc). Returns
    each topic's state; raises :class:`WeakTopics` (production mode), :class:`TopicError`
    when the cluster refuses a topic, kafka-python's KafkaError when it cannot be reached."""
    timeout_ms = max(int(timeout_s * 1000), 1000)
    admin = KafkaAdminClient(
        bootstrap_servers=[b.strip() for b in bootstrap.split(",")],
        client_id="alignloop-topics",
        request_timeout_ms=timeout_ms,
        bootstrap_timeout_ms=timeout_ms,
        **(client_config or {}),
    )
    try:
        missing = [name for name, state in _describe(admin, plan.names).items() if state is None]
        if missing:
            _create(admin, plan, missing, timeout_ms)
        states = _wait_described(admin, plan.names, time.monotonic() + timeout_s)
    finally:
        admin.close()
    result = {
        n: TopicState(n, s.partitions, s.replication, n in missing) for n, s in states.items()
    }
    _judge(plan, result)
    return result


def _describe(admin: KafkaAdminClient, names: Sequence[str]) -> dict[str, TopicState | None]:
    found: dict[str, TopicState | None] = dict.fromkeys(names)
    for topic in admin.describe_topics(list(names)):
        if topic["error_code"] == _UNKNOWN_TOPIC or not topic["partitions"]:
            continue
        if topic["error_code"]:
            raise TopicError(f"describing topic {topic['name']}: error {topic['error_code']}")
        replicas = min(len(p["replica_nodes"]) for p in topic["partitions"])
        found[topic["name"]] = TopicState(topic["name"], len(topic["partitions"]), replicas)
    return found


def _create(admin: KafkaAdminClient, plan: TopicPlan, names: list[str], timeout_ms: int) -> None:
    replication = plan.replication_factor or -1  # -1: the broker's default
    new = [NewTopic(name, plan.partitions, replication) for name in names]
    response = admin.create_topics(new, timeout_ms=timeout_ms, raise_errors=False)
    for topic in response["topics"]:
        code = topic["error_code"]
        if code == _TOPIC_EXISTS:
            log.info("topic %s: created meanwhile by another process", topic["name"])
        elif code:
            raise TopicError(
                f"could not create topic {topic['name']} ({plan.partitions} partitions, "
                f"replication {plan.replication_factor or 'broker default'}): error {code} "
                f"{topic.get('error_message') or ''}".rstrip()
            )
        else:
            log.info(
                "created topic %s: %s partitions, replication %s",
                topic["name"], plan.partitions, plan.replication_factor or "broker default",
            )  # fmt: skip


def _wait_described(
    admin: KafkaAdminClient, names: Sequence[str], deadline: float
) -> dict[str, TopicState]:
    """Every topic as the metadata describes it (a new topic can take a moment to appear)."""
    while True:
        described = _describe(admin, names)
        absent = [name for name, state in described.items() if state is None]
        if not absent:
            return {name: state for name, state in described.items() if state is not None}
        if time.monotonic() > deadline:
            raise TopicError(f"topics still missing from the metadata: {', '.join(absent)}")
        time.sleep(0.2)


def _judge(plan: TopicPlan, states: Mapping[str, TopicState]) -> None:
    weak = []
    for state in states.values():
        if state.partitions < plan.partitions:
            log.warning(
                "topic %s has %d partitions, fewer than the %d configured: alignloop does "
                "not add partitions (kafka-topics.sh --alter does)",
                state.name, state.partitions, plan.partitions,
            )  # fmt: skip
        wanted = plan.replication_factor
        if wanted is not None and state.replication < wanted:
            weak.append(f"{state.name} has {state.replication} replica(s), configured {wanted}")
    if not weak:
        return
    if plan.production:
        raise WeakTopics(
            "topics weaker than configured (ALIGNLOOP_KAFKA_REPLICATION_FACTOR): "
            + "; ".join(weak)
            + ". Raise their replication (kafka-reassign-partitions.sh) or recreate them."
        )
    log.warning("topics weaker than configured: %s", "; ".join(weak))
