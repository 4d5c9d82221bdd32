"""The feedback ingestor: Kafka (interactions, feedback, policy health) → Postgres,
exactly-once in effect.

Topics: interactions and feedback (serving's events) and ``alignloop.policy``, of which it
stores the ``AdapterLoadFailed`` events (table ``adapter_load_failures``, migration 0004)
and the ``RequestFailed`` events (table ``request_failures``, migration 0005)
that the canary controller's guardrail reads. ``PolicyCandidate`` events (the trainer
registered a version) are valid and counted in the events metric but not stored: the
registry row is their record.

Kafka delivers at least once; Postgres makes it exactly once in effect. Per batch:

1. poll a batch from both topics (consumer group, no auto-commit);
2. parse and validate each message; a message that fails goes to the dead-letter topic;
3. write the whole batch in ONE Postgres transaction of idempotent inserts keyed by event id
   (COPY into session scratch tables, then ``INSERT … SELECT … ON CONFLICT DO NOTHING``),
   and fold what actually changed into the A/B counters in the same transaction;
4. flush the dead letters, then commit the Kafka offsets.

A crash anywhere before 4 redelivers the batch, and step 3 then inserts nothing twice.
While Postgres is unreachable the same batch is retried with exponential backoff; offsets
stay where they are. If that outlasts ``max_poll_interval_ms`` the group rebalances and the
offset commit fails: harmless, the batch is redelivered and deduplicated.

Batch transactions of all ingestors are serialised by a transaction-level advisory lock.
That costs parallelism in Postgres only (parsing and Kafka I/O still run in parallel), and
buys two things: the counter updates can read "the row before this batch" without races
when a rebalance briefly lets two ingestors hold the same response, and ``seq`` columns
become commit-ordered, which is what the dataset watermark relies on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import psycopg
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata
from prometheus_client import Counter, Gauge, Histogram, start_http_server
from pydantic import ValidationError

from feedback import ab_counters
from feedback.db import connect, migrate
from schemas import topics
from schemas.events import (
    AdapterLoadFailed,
    AnyEvent,
    FeedbackSubmitted,
    InteractionLogged,
    LoggedMessage,
    PreferenceSubmitted,
    RequestFailed,
    parse_event,
)

log = logging.getLogger(__name__)
_T = TypeVar("_T")

WRITE_LOCK_KEY = 0x616C_696E  # "alin": serialises batch transactions of all ingestors

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


# --- the Postgres side -----------------------------------------------------------------

# Session-private scratch tables, emptied at every commit. stage_*: the batch as received;
# new_interactions / new_feedback / rating_changes: what the batch actually changed.
_SCRATCH = """
CREATE TEMP TABLE IF NOT EXISTS stage_interactions (
    event_id uuid, response_id text, user_id text, policy_version text, model text,
    messages jsonb, prompt_text text, prompt_hash text, prompt_tokens int,
    completion_tokens int, latency_ms double precision, ttft_ms double precision,
    stream boolean, sampling jsonb, choices jsonb, occurred_at timestamptz
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_feedback (
    event_id uuid, feedback_id uuid, response_id text, choice_index int, user_id text,
    user_key text, rating text, comment text, occurred_at timestamptz
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_preferences (
    event_id uuid, preference_id uuid, user_id text, chosen_response_id text,
    rejected_response_id text, messages jsonb, chosen text, rejected text,
    occurred_at timestamptz
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS new_interactions (
    response_id text, event_id uuid, policy_version text, answers int
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS new_feedback (
    event_id uuid, feedback_id uuid, response_id text, choice_index int, user_id text,
    user_key text, rating text, comment text, occurred_at timestamptz
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS rating_changes (
    response_id text, choice_index int, user_key text, old_rating text, new_rating text,
    counted_policy text
) ON COMMIT DELETE ROWS;
"""
_SCRATCH_TABLES = (
    "stage_interactions, stage_feedback, stage_preferences, "
    "new_interactions, new_feedback, rating_changes"
)

_INSERT_INTERACTIONS = """
WITH ins AS (
    INSERT INTO interactions (response_id, event_id, user_id, policy_version, model, messages,
        prompt_text, prompt_hash, prompt_tokens, completion_tokens, latency_ms, ttft_ms,
        stream, sampling, occurred_at)
    SELECT DISTINCT ON (response_id) response_id, event_id, user_id, policy_version, model,
        messages, prompt_text, prompt_hash, prompt_tokens, completion_tokens, latency_ms,
        ttft_ms, stream, sampling, occurred_at
    FROM stage_interactions
    ORDER BY response_id, occurred_at, event_id
    ON CONFLICT DO NOTHING
    RETURNING response_id, event_id, policy_version
)
INSERT INTO new_interactions (response_id, event_id, policy_version, answers)
SELECT ins.response_id, ins.event_id, ins.policy_version, jsonb_array_length(s.choices)
FROM ins JOIN stage_interactions s USING (event_id)
"""

_INSERT_CHOICES = """
INSERT INTO interaction_choices (response_id, choice_index, text, finish_reason,
                                 completion_tokens)
SELECT n.response_id, (c ->> 'index')::int, c ->> 'text', c ->> 'finish_reason',
       (c ->> 'completion_tokens')::int
FROM new_interactions n
JOIN stage_interactions s USING (event_id)
CROSS JOIN LATERAL jsonb_array_elements(s.choices) AS c
ON CONFLICT DO NOTHING
"""

_INSERT_FEEDBACK = """
WITH ins AS (
    INSERT INTO feedback_events (event_id, feedback_id, response_id, choice_index, user_id,
                                 user_key, rating, comment, occurred_at)
    SELECT event_id, feedback_id, response_id, choice_index, user_id, user_key, rating,
           comment, occurred_at
    FROM stage_feedback
    ORDER BY occurred_at, event_id
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id, feedback_id, response_id, choice_index, user_id, user_key, rating,
              comment, occurred_at
)
INSERT INTO new_feedback SELECT * FROM ins
"""

# Latest wins, whatever the arrival order: the row is replaced only by a strictly newer
# event ((occurred_at, event_id) order, so ties resolve the same way everywhere). `before`
# reads the pre-image (same snapshot as the upsert), which the counters need for flips.
_UPSERT_CURRENT = """
WITH latest AS (
    SELECT DISTINCT ON (response_id, choice_index, user_key) *
    FROM new_feedback
    ORDER BY response_id, choice_index, user_key, occurred_at DESC, event_id DESC
), before AS (
    SELECT fc.response_id, fc.choice_index, fc.user_key, fc.rating
    FROM feedback_current fc JOIN latest USING (response_id, choice_index, user_key)
), upserted AS (
    INSERT INTO feedback_current AS fc (response_id, choice_index, user_key, user_id, rating,
                                        event_id, feedback_id, comment, occurred_at)
    SELECT response_id, choice_index, user_key, user_id, rating, event_id, feedback_id,
           comment, occurred_at
    FROM latest
    ON CONFLICT (response_id, choice_index, user_key) DO UPDATE SET
        user_id = EXCLUDED.user_id, rating = EXCLUDED.rating, event_id = EXCLUDED.event_id,
        feedback_id = EXCLUDED.feedback_id, comment = EXCLUDED.comment,
        occurred_at = EXCLUDED.occurred_at, updated_at = now()
    WHERE (EXCLUDED.occurred_at, EXCLUDED.event_id) > (fc.occurred_at, fc.event_id)
    RETURNING fc.response_id, fc.choice_index, fc.user_key, fc.rating, fc.counted_policy
)
INSERT INTO rating_changes (response_id, choice_index, user_key, old_rating, new_rating,
                            counted_policy)
SELECT u.response_id, u.choice_index, u.user_key, b.rating, u.rating, u.counted_policy
FROM upserted u LEFT JOIN before b USING (response_id, choice_index, user_key)
"""

_INSERT_PREFERENCES = """
INSERT INTO preferences (event_id, preference_id, user_id, chosen_response_id,
                         rejected_response_id, messages, chosen, rejected, occurred_at)
SELECT event_id, preference_id, user_id, chosen_response_id, rejected_response_id, messages,
       chosen, rejected, occurred_at
FROM stage_preferences
ORDER BY occurred_at, event_id
ON CONFLICT (event_id) DO NOTHING
"""

_INSERT_REQUEST_FAILURES = """
INSERT INTO request_failures (event_id, version, status, error, producer, occurred_at)
SELECT * FROM unnest(%s::uuid[], %s::text[], %s::int[], %s::text[], %s::text[],
                     %s::timestamptz[])
ORDER BY 6, 1
ON CONFLICT (event_id) DO NOTHING
"""

_INSERT_ADAPTER_FAILURES = """
INSERT INTO adapter_load_failures (event_id, version, adapter_uri, error, producer, occurred_at)
SELECT * FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::text[], %s::text[],
                     %s::timestamptz[])
ORDER BY 6, 1
ON CONFLICT (event_id) DO NOTHING
"""


@dataclass(frozen=True)
class BatchResult:
    """Rows that were new (a fully redelivered batch gives all zeros)."""

    interactions: int
    feedback: int
    preferences: int
    adapter_load_failures: int = 0
    request_failures: int = 0


def prompt_hash(messages: Sequence[LoggedMessage]) -> str:
    """Identity of a prompt: sha256 of the canonical JSON of the conversation sent."""
    canonical = json.dumps(
        [[m.role, m.content] for m in messages], ensure_ascii=False, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _prompt_text(messages: Sequence[LoggedMessage]) -> str:
    users = [m.content for m in messages if m.role == "user"]
    return users[-1] if users else (messages[-1].content if messages else "")


def _messages_json(messages: Sequence[LoggedMessage] | None) -> str | None:
    if messages is None:
        return None
    return json.dumps([m.model_dump(mode="json") for m in messages], ensure_ascii=False)


def _insert_columns(
    cur: psycopg.Cursor, sql: str, events: Sequence[AnyEvent], fields: Sequence[str]
) -> int:
    """Insert ``events`` with one ``unnest`` statement taking one array per field; returns
    how many rows were new (``ON CONFLICT DO NOTHING`` skips redeliveries)."""
    if not events:
        return 0
    cur.execute(sql, [[getattr(e, f) for e in events] for f in fields])
    return max(cur.rowcount, 0)


def prepare_session(conn: psycopg.Connection) -> None:
    """Create this connection's scratch tables (once per connection)."""
    conn.execute(_SCRATCH.encode())


def write_batch(conn: psycopg.Connection, events: Sequence[AnyEvent]) -> BatchResult:
    """Store one batch idempotently and update the counters. Call inside a transaction on a
    connection prepared with :func:`prepare_session`; commit is the caller's."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK_KEY,))
    conn.execute(f"TRUNCATE {_SCRATCH_TABLES}".encode())  # leftovers of a failed savepoint
    unique = list({e.event_id: e for e in events}.values())
    interactions = [e for e in unique if isinstance(e, InteractionLogged)]
    feedback = [e for e in unique if isinstance(e, FeedbackSubmitted)]
    preferences = [e for e in unique if isinstance(e, PreferenceSubmitted)]
    failures = [e for e in unique if isinstance(e, AdapterLoadFailed)]
    request_failures = [e for e in unique if isinstance(e, RequestFailed)]
    # PolicyCandidate: nothing to store (the registry row is the record).
    with conn.cursor() as cur:
        if interactions:
            with cur.copy(
                "COPY stage_interactions (event_id, response_id, user_id, policy_version, model,"
                " messages, prompt_text, prompt_hash, prompt_tokens, completion_tokens,"
                " latency_ms, ttft_ms, stream, sampling, choices, occurred_at) FROM STDIN"
            ) as copy:
                for e in interactions:
                    copy.write_row(
                        (
                            e.event_id,
                            e.response_id,
                            e.user,
                            e.policy_version,
                            e.model,
                            _messages_json(e.messages),
                            _prompt_text(e.messages),
                            prompt_hash(e.messages),
                            e.prompt_tokens,
                            e.completion_tokens,
                            e.latency_ms,
                            e.ttft_ms,
                            e.stream,
                            e.sampling.model_dump_json(),
                            json.dumps([c.model_dump(mode="json") for c in e.choices]),
                            e.occurred_at,
                        )
                    )
            cur.execute(_INSERT_INTERACTIONS)
            cur.execute(_INSERT_CHOICES)
        if feedback:
            with cur.copy(
                "COPY stage_feedback (event_id, feedback_id, response_id, choice_index, user_id,"
                " user_key, rating, comment, occurred_at) FROM STDIN"
            ) as copy:
                for e in feedback:
                    copy.write_row(
                        (
                            e.event_id,
                            e.feedback_id,
                            e.response_id,
                            e.choice_index,
                            e.user,
                            e.user or "",
                            e.rating,
                            e.comment,
                            e.occurred_at,
                        )
                    )
            cur.execute(_INSERT_FEEDBACK)
            cur.execute(_UPSERT_CURRENT)
        if preferences:
            with cur.copy(
                "COPY stage_preferences (event_id, preference_id, user_id, chosen_response_id,"
                " rejected_response_id, messages, chosen, rejected, occurred_at) FROM STDIN"
            ) as copy:
                for e in preferences:
                    copy.write_row(
                        (
                            e.event_id,
                            e.preference_id,
                            e.user,
                            e.chosen_response_id,
                            e.rejected_response_id,
                            _messages_json(e.messages),
                            e.chosen,
                            e.rejected,
                            e.occurred_at,
                        )
                    )
            cur.execute(_INSERT_PREFERENCES)
            new_preferences = cur.rowcount
        else:
            new_preferences = 0
        new_failures = _insert_columns(
            cur,
            _INSERT_ADAPTER_FAILURES,
            failures,
            ("event_id", "version", "adapter_uri", "error", "producer", "occurred_at"),
        )
        new_request_failures = _insert_columns(
            cur,
            _INSERT_REQUEST_FAILURES,
            request_failures,
            ("event_id", "version", "status", "error", "producer", "occurred_at"),
        )
        ab_counters.apply_batch_changes(conn)
        counts = cur.execute(
            "SELECT (SELECT count(*) FROM new_interactions), (SELECT count(*) FROM new_feedback)"
        ).fetchone()
    assert counts is not None
    return BatchResult(
        int(counts[0]),
        int(counts[1]),
        max(new_preferences, 0),
        new_failures,
        new_request_failures,
    )


def store_events(conn: psycopg.Connection, events: Sequence[AnyEvent]) -> BatchResult:
    """One committed batch: ``write_batch`` in its own transaction (tests, backfills)."""
    with conn.transaction():
        return write_batch(conn, events)


# --- the Kafka side --------------------------------------------------------------------


@dataclass(frozen=True)
class _Message:
    """What the ingestor keeps of a consumed record."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True)
class _DeadLetter:
    message: _Message
    kind: str  # "invalid": failed parsing/validation; "db_rejected": Postgres refused it
    reason: str


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

    def stop(self) -> None:
        self._stop.set()

    # --- main loop ---------------------------------------------------------------------

    def run(self) -> None:
        cfg = self.config
        if cfg.metrics_port is not None:
            start_http_server(cfg.metrics_port)
        try:
            self._conn = self._retry_db(self._open_connection)
        except _Stopping:
            return
        consumer = KafkaConsumer(
            bootstrap_servers=cfg.bootstrap,
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
            log.info("ingestor stopped")

    def _process(self, consumer: KafkaConsumer, producer: KafkaProducer, polled: dict) -> None:
        started = time.perf_counter()
        parsed: list[tuple[AnyEvent, _Message]] = []
        dead: list[_DeadLetter] = []
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for tp, records in polled.items():
            for r in records:
                msg = _Message(r.topic, r.partition, r.offset, r.key, r.value)
                try:
                    if r.value is None:
                        raise ValueError("empty message value")
                    event = parse_event(r.value)
                except (ValidationError, ValueError) as exc:
                    dead.append(_DeadLetter(msg, "invalid", _reason(exc)))
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

    # --- Postgres with retries -----------------------------------------------------------

    def _open_connection(self) -> psycopg.Connection:
        conn = connect(self.config.database_url, autocommit=True)
        try:
            migrate(conn)
            prepare_session(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _write(
        self, parsed: list[tuple[AnyEvent, _Message]]
    ) -> tuple[BatchResult, list[_DeadLetter]]:
        if self._conn is None or self._conn.closed:
            self._conn = self._open_connection()
        conn = self._conn
        events = [e for e, _ in parsed]
        try:
            return store_events(conn, events), []
        except (psycopg.DataError, psycopg.IntegrityError) as exc:
            # Valid for pydantic but not for Postgres (e.g. a NUL character in a text).
            # Find the culprits one savepoint per event, still in one transaction.
            log.warning("batch rejected by Postgres (%s); retrying event by event", exc)
        rejected: list[_DeadLetter] = []
        written: list[BatchResult] = []
        with conn.transaction():
            for event, msg in parsed:
                try:
                    with conn.transaction():
                        one = write_batch(conn, [event])
                except (psycopg.DataError, psycopg.IntegrityError) as exc:
                    rejected.append(_DeadLetter(msg, "db_rejected", _reason(exc)))
                    continue
                written.append(one)
        total = BatchResult(
            sum(r.interactions for r in written),
            sum(r.feedback for r in written),
            sum(r.preferences for r in written),
            sum(r.adapter_load_failures for r in written),
            sum(r.request_failures for r in written),
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

    def _send_dead_letters(self, producer: KafkaProducer, dead: list[_DeadLetter]) -> None:
        """Produce and flush every dead letter before offsets move; retried until the broker
        takes them (a duplicate dead letter after a retry is acceptable, a lost one not)."""
        delay = self.config.retry_initial_s
        while True:
            futures = []
            for d in dead:
                m = d.message
                headers = [
                    ("reason", d.reason.encode()),
                    ("kind", d.kind.encode()),
                    ("source_topic", m.topic.encode()),
                    ("source_partition", str(m.partition).encode()),
                    ("source_offset", str(m.offset).encode()),
                ]
                futures.append(
                    producer.send(
                        self.config.dead_letter_topic,
                        value=m.value or b"",
                        key=m.key,
                        headers=headers,
                    )
                )
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


def _reason(exc: Exception) -> str:
    """A short, header-sized description of why a message was rejected."""
    if isinstance(exc, ValidationError):
        errors = exc.errors(include_url=False, include_input=False)
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors[:5]]
        return f"validation failed: {'; '.join(parts)}"[:1000]
    return f"{type(exc).__name__}: {exc}"[:1000]
