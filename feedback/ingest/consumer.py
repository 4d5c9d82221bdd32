"""The ingestor's Kafka loop: consume a batch, store it, then commit its offsets.

Its one job: move every message of its topics into Postgres (through
:mod:`feedback.ingest.writer`) or onto the dead-letter topic, never losing one and never
storing one twice. Topics: interactions and feedback (serving's events) and
``alignloop.policy``, of which the writer stores the ``AdapterLoadFailed`` and
``RequestFailed`` events that the canary controller's guardrail reads.

Kafka delivers at least once; Postgres makes it exactly once in effect. Per batch:

1. poll a batch from all topics (consumer group, no auto-commit);
2. parse and validate each message; one that fails becomes an ``invalid`` dead letter;
3. write the whole batch in ONE Postgres transaction (:func:`~feedback.ingest.writer.
   store_events`: idempotent inserts keyed by event id, and the A/B counters). If Postgres
   refuses a value pydantic accepted, the batch is written again event by event, one
   savepoint each, and the refused ones become ``db_rejected`` dead letters;
4. produce and flush the dead letters (retried until acknowledged), then commit the Kafka
   offsets.

A crash anywhere before 4 redelivers the batch, and step 3 then inserts nothing twice.
While Postgres is unreachable the same batch is retried with exponential backoff; offsets
stay where they are. If that outlasts ``max_poll_interval_ms`` the group rebalances and the
offset commit fails: harmless, the batch is redelivered and deduplicated.

Between batches it publishes each held partition's lag (highwater − committed offset) on
``/metrics``; on a rebalance it forgets the partitions it gave away. With
``retention_days`` set, a thread of its own purges older rows every hour
(:func:`feedback.erasure.purge_older_than`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import psycopg
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata
from prometheus_client import Counter, Gauge, Histogram, start_http_server
from pydantic import ValidationError

from feedback.db import connect, migrate
from feedback.erasure import purge_older_than
from feedback.ingest.dead_letters import DeadLetter, Message, rejection_reason
from feedback.ingest.writer import BatchResult, prepare_session, store_events, write_batch
from feedback.kafka_topics import TopicPlan, ensure_topics
from feedback.user_ids import UserIds
from schemas import topics
from schemas.events import AnyEvent, parse_event

log = logging.getLogger(__name__)
_T = TypeVar("_T")

EVENTS = Counter("alignloop_ingest_events_total", "Valid events consumed.", ["topic", "event_type"])
STORED = Counter(
    "alignloop_ingest_rows_inserted_total",
    "Events that were new to Postgres (redeliveries are not counted).",
    ["table"],
)
BATCH_SECONDS = Histogram(
    "alignloop_ingest_batch_seconds",
    "Time from poll to offset commit for one batch.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
LAG = Gauge(
    "alignloop_ingest_consumer_lag",
    "Messages in the partition after the last committed offset.",
    ["topic", "partition"],
)
DEAD_LETTERS = Counter(
    "alignloop_ingest_dead_letters_total", "Messages sent to the dead-letter topic.", ["kind"]
)
DB_RETRIES = Counter("alignloop_ingest_db_retries_total", "Batch writes retried after DB errors.")
ERASED_DROPPED = Counter(
    "alignloop_ingest_erased_events_total",
    "Events dropped because their user (or the answer they name) was erased.",
)
PURGED = Counter(
    "alignloop_ingest_purged_rows_total",
    "Rows deleted by the retention purge (ALIGNLOOP_RETENTION_DAYS).",
    ["table"],
)


@dataclass
class IngestConfig:
    """Everything `alignloop ingest` needs. Environment names, for the settings class:
    ``ALIGNLOOP_DATABASE_URL``, ``ALIGNLOOP_KAFKA_BOOTSTRAP``, ``ALIGNLOOP_INGEST_GROUP_ID``,
    ``ALIGNLOOP_INGEST_METRICS_PORT``, ``ALIGNLOOP_INGEST_MAX_BATCH``."""

    database_url: str
    bootstrap: str
    group_id: str = "alignloop-ingestor"
    interactions_topic: str = topics.INTERACTIONS
    feedback_topic: str = topics.FEEDBACK
    policy_topic: str | None = topics.POLICY
    """Where serving reports adapter load failures; None: not consumed."""
    dead_letter_topic: str = topics.DEAD_LETTER
    metrics_port: int | None = 9102
    """Prometheus /metrics port; None disables the endpoint."""
    max_batch: int = 2000
    poll_timeout_ms: int = 500
    retry_initial_s: float = 0.25
    retry_max_s: float = 5.0
    client_id: str = "alignloop-ingestor"
    consumer_overrides: dict[str, object] = field(default_factory=dict)
    client_config: dict[str, object] = field(default_factory=dict)
    """Kafka connection security for the consumer, the dead-letter producer and the topic
    admin (:func:`schemas.kafka_config.kafka_python_config`); empty: plaintext."""
    topic_plan: TopicPlan | None = None
    """Create the missing topics and check the existing ones before consuming
    (:func:`feedback.kafka_topics.ensure_topics`; retried while Kafka is unreachable, a
    refusal ends :meth:`Ingestor.run`); None: topics are not managed."""
    retention_days: float | None = None
    """``ALIGNLOOP_RETENTION_DAYS``: purge rows older than this (:mod:`feedback.erasure`)
    right after start and then every ``purge_interval_s``; None keeps everything."""
    purge_interval_s: float = 3600.0
    user_id_key: bytes | None = None
    """Store user ids as keyed hashes under this key (:mod:`feedback.user_ids`); None: as
    received. The ingestor refuses to start on a database keyed differently."""


class _Stopping(Exception):
    """stop() was called while a batch was waiting to be retried; the batch is dropped
    uncommitted (it will be redelivered)."""


class _LogAssignment(ConsumerRebalanceListener):
    """Logs what this member holds after each rebalance and forgets lag gauges and committed
    offsets of partitions it gave away."""

    def __init__(self, ingestor: Ingestor) -> None:
        self._ingestor = ingestor

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        for tp in revoked:
            self._ingestor._committed.pop(tp, None)

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        names = ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(assigned))
        log.info("assigned partitions: %s", names or "none")


class Ingestor:
    """The consume → store → commit loop. ``run()`` blocks until ``stop()`` (thread-safe,
    also from a signal handler)."""

    def __init__(self, config: IngestConfig) -> None:
        self.config = config
        self._stop = threading.Event()
        self._conn: psycopg.Connection | None = None
        self._committed: dict[TopicPartition, int] = {}
        self._lag_labels: set[tuple[str, str]] = set()
        self._user_ids = UserIds(config.user_id_key)

    def stop(self) -> None:
        self._stop.set()

    # --- main loop ---------------------------------------------------------------------

    def run(self) -> None:
        cfg = self.config
        if cfg.metrics_port is not None:
            start_http_server(cfg.metrics_port)
        try:
            self._conn = self._retry_db(self._open_connection)
            if cfg.topic_plan is not None:
                self._ensure_topics(cfg.topic_plan)
        except _Stopping:
            return
        purger = None
        if cfg.retention_days is not None:
            purger = threading.Thread(target=self._purge_loop, name="retention", daemon=True)
            purger.start()
        consumer = KafkaConsumer(
            bootstrap_servers=cfg.bootstrap,
            **cfg.client_config,
            group_id=cfg.group_id,
            client_id=cfg.client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=6000,
            heartbeat_interval_ms=1000,
            max_poll_interval_ms=10000,
            max_poll_records=cfg.max_batch,
            **cfg.consumer_overrides,
        )
        subscribed = [cfg.interactions_topic, cfg.feedback_topic]
        if cfg.policy_topic:
            subscribed.append(cfg.policy_topic)
        consumer.subscribe(subscribed, listener=_LogAssignment(self))
        producer = KafkaProducer(
            bootstrap_servers=cfg.bootstrap,
            **cfg.client_config,
            client_id=f"{cfg.client_id}-dlq",
            acks="all",
            retries=5,
            linger_ms=5,
        )
        log.info("ingesting %s as group %s", ", ".join(subscribed), cfg.group_id)
        try:
            while not self._stop.is_set():
                polled = consumer.poll(timeout_ms=cfg.poll_timeout_ms)
                if polled:
                    try:
                        self._process(consumer, producer, polled)
                    except _Stopping:
                        break
                self._update_lag(consumer)
        finally:
            consumer.close(autocommit=False)
            producer.close(timeout=5)
            if self._conn is not None:
                self._conn.close()
            if purger is not None:
                purger.join(30)
            log.info("ingestor stopped")

    def _process(self, consumer: KafkaConsumer, producer: KafkaProducer, polled: dict) -> None:
        started = time.perf_counter()
        parsed: list[tuple[AnyEvent, Message]] = []
        dead: list[DeadLetter] = []
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for tp, records in polled.items():
            for r in records:
                msg = Message(r.topic, r.partition, r.offset, r.key, r.value)
                try:
                    if r.value is None:
                        raise ValueError("empty message value")
                    event = parse_event(r.value)
                except (ValidationError, ValueError) as exc:
                    dead.append(DeadLetter(msg, "invalid", rejection_reason(exc)))
                    continue
                EVENTS.labels(r.topic, event.event_type).inc()
                parsed.append((event, msg))
            offsets[tp] = OffsetAndMetadata(records[-1].offset + 1, "", -1)

        result, rejected = self._retry_db(lambda: self._write(parsed))
        dead.extend(rejected)
        STORED.labels("interactions").inc(result.interactions)
        STORED.labels("feedback_events").inc(result.feedback)
        STORED.labels("preferences").inc(result.preferences)
        STORED.labels("adapter_load_failures").inc(result.adapter_load_failures)
        STORED.labels("request_failures").inc(result.request_failures)
        ERASED_DROPPED.inc(result.erased)
        if dead:
            self._send_dead_letters(producer, dead)
        try:
            consumer.commit(offsets=offsets)
            self._committed.update({tp: om.offset for tp, om in offsets.items()})
        except KafkaError as exc:
            # Typically a rebalance during a long DB outage: these partitions may be someone
            # else's now. The batch is in Postgres; its redelivery will insert nothing.
            log.warning("offset commit failed (%s); the batch will be redelivered", exc)
        BATCH_SECONDS.observe(time.perf_counter() - started)

    def _purge_loop(self) -> None:
        """The retention purge, on its own thread and connection so that polling goes on
        (a first purge of a large backlog may take longer than the poll interval allows);
        batches wait only while one purge chunk holds the write lock. Errors are logged and
        the purge is tried again at the next interval."""
        cfg = self.config
        assert cfg.retention_days is not None
        while not self._stop.is_set():
            try:
                with connect(cfg.database_url, autocommit=True) as conn:
                    counts = purge_older_than(conn, cfg.retention_days)
                for table, n in counts.items():
                    PURGED.labels(table).inc(n)
                if any(counts.values()):
                    log.info("retention purge (%s days): %s", cfg.retention_days, counts)
            except psycopg.Error as exc:
                log.warning("retention purge failed (%s); next try in %.0f s", exc,
                            cfg.purge_interval_s)  # fmt: skip
            if self._stop.wait(cfg.purge_interval_s):
                return

    # --- Postgres with retries -----------------------------------------------------------

    def _open_connection(self) -> psycopg.Connection:
        conn = connect(self.config.database_url, autocommit=True)
        try:
            migrate(conn)
            self._user_ids.check(conn)
            prepare_session(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _write(
        self, parsed: list[tuple[AnyEvent, Message]]
    ) -> tuple[BatchResult, list[DeadLetter]]:
        if self._conn is None or self._conn.closed:
            self._conn = self._open_connection()
        conn = self._conn
        events = [e for e, _ in parsed]
        try:
            return store_events(conn, events, self._user_ids), []
        except (psycopg.DataError, psycopg.IntegrityError) as exc:
            # Valid for pydantic but not for Postgres (e.g. a NUL character in a text).
            # Find the culprits one savepoint per event, still in one transaction.
            log.warning("batch rejected by Postgres (%s); retrying event by event", exc)
        rejected: list[DeadLetter] = []
        written: list[BatchResult] = []
        with conn.transaction():
            for event, msg in parsed:
                try:
                    with conn.transaction():
                        one = write_batch(conn, [event], self._user_ids)
                except (psycopg.DataError, psycopg.IntegrityError) as exc:
                    rejected.append(DeadLetter(msg, "db_rejected", rejection_reason(exc)))
                    continue
                written.append(one)
        total = BatchResult(
            sum(r.interactions for r in written),
            sum(r.feedback for r in written),
            sum(r.preferences for r in written),
            sum(r.adapter_load_failures for r in written),
            sum(r.request_failures for r in written),
            sum(r.erased for r in written),
        )
        return total, rejected

    def _retry_db(self, attempt: Callable[[], _T]) -> _T:
        """Run ``attempt`` until it succeeds, backing off exponentially on connection-type
        errors (server down, restarting, deadlock). Never gives up; stop() interrupts."""
        delay = self.config.retry_initial_s
        while True:
            try:
                return attempt()
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                DB_RETRIES.inc()
                log.warning("Postgres unavailable (%s); retrying in %.2f s", exc, delay)
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
                if self._stop.wait(delay):
                    raise _Stopping from exc
                delay = min(delay * 2, self.config.retry_max_s)

    # --- Kafka helpers -------------------------------------------------------------------

    def _ensure_topics(self, plan: TopicPlan) -> None:
        """The topics, created or checked (:mod:`feedback.kafka_topics`), retried with
        backoff while Kafka cannot be reached; a refusal (WeakTopics, a topic the cluster
        will not create) propagates."""
        cfg = self.config
        delay = cfg.retry_initial_s
        while True:
            try:
                ensure_topics(cfg.bootstrap, plan, cfg.client_config)
                return
            except KafkaError as exc:
                log.warning("Kafka unavailable for the topic check (%s); retrying in %.2f s",
                            exc, delay)  # fmt: skip
                if self._stop.wait(delay):
                    raise _Stopping from exc
                delay = min(delay * 2, cfg.retry_max_s)

    def _send_dead_letters(self, producer: KafkaProducer, dead: list[DeadLetter]) -> None:
        """Produce and flush every dead letter before offsets move; retried until the broker
        takes them (a duplicate dead letter after a retry is acceptable, a lost one not)."""
        delay = self.config.retry_initial_s
        while True:
            futures = [
                producer.send(
                    self.config.dead_letter_topic,
                    value=d.message.value or b"",
                    key=d.message.key,
                    headers=d.headers(),
                )
                for d in dead
            ]
            producer.flush(timeout=30)
            try:
                for f in futures:
                    f.get(timeout=1)
            except KafkaError as exc:
                log.warning("dead-letter produce failed (%s); retrying in %.2f s", exc, delay)
                if self._stop.wait(delay):
                    raise _Stopping from exc
                delay = min(delay * 2, self.config.retry_max_s)
                continue
            for d in dead:
                DEAD_LETTERS.labels(d.kind).inc()
                log.warning(
                    "dead letter %s[%d]@%d: %s",
                    d.message.topic,
                    d.message.partition,
                    d.message.offset,
                    d.reason,
                )
            return

    def _update_lag(self, consumer: KafkaConsumer) -> None:
        """Lag = highwater - committed offset, for the partitions this member holds."""
        current: set[tuple[str, str]] = set()
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            committed = self._committed.get(tp)
            if highwater is None or committed is None:
                continue
            labels = (tp.topic, str(tp.partition))
            LAG.labels(*labels).set(max(highwater - committed, 0))
            current.add(labels)
        for labels in self._lag_labels - current:
            LAG.remove(*labels)
        self._lag_labels = current
