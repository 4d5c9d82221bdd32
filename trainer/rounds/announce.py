"""Announcing a registered candidate policy on Kafka (``PolicyCandidate`` on
``alignloop.policy``).

The trainer produces one event per registered round, synchronously: a short-lived
``KafkaProducer`` (acks=all, idempotent, retried within the time budget), send, wait for the
acknowledgement, close. Unlike serving there is no spool: the event is informational and
the registry row is the record, so a broker outage costs a log line, not a version. Every
failure (no broker, timeout, a refused record) becomes :class:`EventNotDelivered`, raised
within about ``timeout_s``. The producer connects with the settings' TLS / SASL
configuration (:func:`schemas.kafka_config.kafka_python_config`), as the ingestor does.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from typing import Any

from kafka import KafkaProducer

from schemas import topics
from schemas.events import PolicyCandidate

PRODUCER = f"trainer@{socket.gethostname()}:{os.getpid()}"
"""The ``producer`` to stamp on events this trainer process makes."""


class EventNotDelivered(RuntimeError):
    """The broker did not acknowledge the event in time (or refused it)."""


def publish_candidate(
    bootstrap: str,
    event: PolicyCandidate,
    timeout_s: float = 10.0,
    *,
    topic: str = topics.POLICY,
    client_config: Mapping[str, Any] | None = None,
) -> None:
    """Produce ``event`` to ``topic`` (keyed by its version) and wait for the broker's
    acknowledgement; raises :class:`EventNotDelivered` if that does not happen within
    about ``timeout_s`` seconds (connecting included). ``client_config``: kafka-python's
    security arguments; None: from the settings."""
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    deadline = time.monotonic() + timeout_s
    budget_ms = max(int(timeout_s * 1000), 1)
    where = f"{event.event_type} {event.version} to {topic} at {bootstrap}"
    try:
        security = _configured_security() if client_config is None else dict(client_config)
        producer = KafkaProducer(
            bootstrap_servers=[b.strip() for b in bootstrap.split(",")],
            client_id="alignloop-trainer",
            acks="all",
            enable_idempotence=True,
            retries=5,
            linger_ms=0,
            request_timeout_ms=budget_ms,
            delivery_timeout_ms=budget_ms,
            max_block_ms=budget_ms,
            bootstrap_timeout_ms=budget_ms,
            reconnect_backoff_max_ms=1_000,
            **security,
        )
    except Exception as exc:  # NoBrokersAvailable, KafkaTimeoutError, bad address...
        raise EventNotDelivered(f"could not connect to publish {where}: {exc!r}") from exc
    try:
        future = producer.send(topic, key=event.key(), value=event.to_bytes())
        producer.flush(timeout=max(deadline - time.monotonic(), 0.0))
        future.get(timeout=max(deadline - time.monotonic(), 0.0))
    except Exception as exc:  # KafkaTimeoutError, KafkaError from the broker
        raise EventNotDelivered(f"could not publish {where}: {exc!r}") from exc
    finally:
        producer.close(timeout=max(deadline - time.monotonic(), 1.0))


def _configured_security() -> dict[str, Any]:
    from schemas.kafka_config import kafka_python_config
    from schemas.settings import Settings

    return kafka_python_config(Settings())
