"""Durable, non-blocking event producing for the serving process.

``EventPublisher.publish()`` never blocks the request path and never raises for broker or
disk reasons (only for a programming error such as an event without ``key()``): it hands the
event to a bounded in-memory queue and returns a ``concurrent.futures.Future`` that
resolves to where the event was *safely handed over*:

* ``"kafka"``: acknowledged by the broker (``acks=all``, idempotent producer);
* ``"spool"``: fsync'd into the local disk spool, to be replayed to Kafka later;
* or it fails with :class:`~serving.spool.SpoolFull` (the event was dropped: the spool is
  at its bound, or at the share of it that the event's topic may fill),
  :class:`EventRejected` (the event was quarantined, see below) or :class:`PublisherClosed`.

One background thread owns the Kafka producer and runs this state machine::

    start ──▶ SPOOLING ──probe ok (new producer)──▶ REPLAYING ──spool empty──▶ DIRECT
                 ▲                                     │                          │
                 └────────── a send or replay fails ───┴──────────────────────────┘
    (DIRECT ──overflow records moved into the spool──▶ REPLAYING, see below)

* DIRECT: batches from the queue are sent and awaited (flush); successes resolve
  "kafka". On any failure the failed records, then everything queued after them, go to
  the spool in publish order, the producer is closed, and the state becomes SPOOLING.
* SPOOLING: queued events are appended to the spool (fsync per batch) and resolve
  "spool". Every ``probe_interval`` seconds a probe opens a TCP connection to the
  bootstrap servers and, if that works, creates a **new** producer (a restarted
  broker has forgotten the old producer id; the old sequence numbers would be rejected).
* REPLAYING: the spool is sent in order, in chunks; the read cursor advances only over
  the acknowledged prefix of each chunk. Events published meanwhile are appended to the
  spool behind the records being replayed, so nothing overtakes a spooled event. When the
  spool is empty the state becomes DIRECT.

``start()`` begins in SPOOLING with an immediate probe, so a spool left by a previous
process is replayed before any new event goes to Kafka directly.

**Queue overflow and order.** The memory queue holds ``queue_size`` events. When it is full
``publish()`` does not block: the event is appended (without fsync) to a separate
*overflow spool* on disk and the publisher enters overflow mode, in which every later
``publish()`` also goes to the overflow spool. The worker keeps draining the memory queue
(to Kafka or to the main spool: those events are older), fsyncs the overflow spool and
resolves its futures "spool", and once the memory queue is empty it moves the overflow
records to the tail of the main spool and leaves overflow mode. So publish order is kept
even across an overflow, at the price of a disk append on the caller's thread while
overflowing (no fsync there; the worker fsyncs). The bound ``spool_max_bytes`` applies to
both spools together.

**Quarantine: refused for good is not an outage.** Some events can never be delivered, and
retrying them would stall everything behind them (into the spool, until the spool is full).
Those are *quarantined*: written to a bounded, fsync'd, 0600 JSON-lines file
(``spool_dir/quarantine.jsonl``, :mod:`serving.quarantine`), counted in
``alignloop_events_quarantined_total{topic,reason}``, logged, and delivery moves on; a
``publish_and_wait`` caller gets :class:`EventRejected` (its ``reason`` says why). Reasons:

* ``too_large``: key + value exceed ``max_event_bytes`` (keep it below the broker's
  ``message.max.bytes`` and the topics' ``max.message.bytes``). Checked in ``publish()``
  and again before a spooled record is replayed (a spool from a process with a larger
  bound); such an event never reaches Kafka nor the spool.
* ``serialization``: ``event.to_bytes()`` failed (a lone surrogate in a string, ...).
* the Kafka error's name in lower case (``msg_size_too_large``, ``record_list_too_large``,
  ``invalid_record``, ...): the client or the broker refused that record for good
  (:data:`PERMANENT_ERRORS`). A broker refuses a whole batch, so a refused record that was
  sent with others is first sent again alone; only a record refused alone is quarantined
  (that retry may put it behind later records of its key). Every other error, including
  topic-wide ones such as authorization failures, still counts as an outage: the records
  are spooled and retried, since an operator can fix the cause.

**Feedback's reserve.** Ratings must not get 503 because chat traffic filled the spool
during an outage. ``reserved_share`` of ``spool_max_bytes`` is kept for
``reserved_topics`` (the feedback topic): events of every other topic (interactions, policy
events) are dropped with :class:`SpoolFull` once together they would fill more than
``(1 - reserved_share) * spool_max_bytes``, while feedback may fill the whole bound. The
split is rebuilt from the spools' per-topic counts at start, so it holds across restarts;
it is one FIFO, so replay order is unchanged. While running, the publisher keeps the two
counts itself, under its lock: ``publish()`` (overflow mode) and the worker then check the
bound against the same numbers, and a record being moved from the overflow spool to the
main one (two files, each with its own lock) is never counted twice nor not at all. Counting
a moving record twice once refused ratings inside their reserve. The alternative, a
second spool for feedback, would need a second replay cursor and state machine for no
better guarantee.

**Outage detection** happens on the next send: its batch fails after at most
``delivery_timeout_ms`` (default 5 s), so during the first seconds of an outage a
``publish_and_wait`` can take that long before resolving "spool". An idle publisher keeps
``kafka_up`` at 1 until it next sends.

**Guarantees.** At-least-once into Kafka with publish order kept per key (and globally, as
far as the spool is concerned). Duplicates are possible only when a send's outcome is
unknown (the broker wrote a batch but its ack was lost) or when the process dies between a
replay ack and the cursor update; consumers dedupe by ``event_id``.

**The client** is confluent-kafka (librdkafka): it batches, checksums and talks to the
broker in C threads that do not hold the GIL, so producing costs the serving process a
fraction of the CPU of the pure-Python kafka-python producer (whose sender thread also
competed with the request handlers for the GIL; figures: docs/benchmarks.md). Delivery
reports are served in this worker thread by ``flush()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import queue
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from prometheus_client import Counter, Gauge, Histogram

from schemas import topics
from schemas.events import Event
from serving.quarantine import Quarantine
from serving.spool import DiskSpool, SpoolFull, SpoolRecord, encoded_size

log = logging.getLogger(__name__)

PRODUCER = f"serving@{socket.gethostname()}:{os.getpid()}"
"""The ``producer`` stamped on every event this serving process makes."""

Handover = Literal["kafka", "spool"]
"""Where a published event was safely handed over (what its future resolves to)."""

__all__ = [
    "PERMANENT_ERRORS",
    "EventPublisher",
    "EventRejected",
    "Handover",
    "PublisherClosed",
    "PublisherState",
    "SpoolFull",
]

# --- metrics (module level: one registry per process) ---------------------------------
PUBLISHED = Counter(
    "alignloop_events_published_total",
    "Events handed over, by topic and outcome (kafka: acked; spool: fsync'd to the local "
    "spool for later replay; dropped: spool full or publisher closed; quarantined: refused "
    "for good, see alignloop_events_quarantined_total).",
    ["topic", "outcome"],
)
QUARANTINED = Counter(
    "alignloop_events_quarantined_total",
    "Events that can never be delivered (too large, not serialisable, refused by Kafka for "
    "good), moved to the quarantine file instead of being retried, by topic and reason.",
    ["topic", "reason"],
)
QUARANTINE_UNWRITTEN = Counter(
    "alignloop_events_quarantine_unwritten_total",
    "Quarantined events whose line could not be written (the quarantine file at its bound, "
    "a disk error, too many waiting): they are lost.",
    ["topic"],
)
QUARANTINE_BYTES = Gauge("alignloop_events_quarantine_bytes", "Size of the quarantine file.")
REPLAYED = Counter(
    "alignloop_events_replayed_total",
    "Spooled events acknowledged by Kafka during a replay.",
    ["topic"],
)
SPOOL_RECORDS = Gauge("alignloop_events_spool_records", "Events waiting in the disk spool.")
SPOOL_BYTES = Gauge("alignloop_events_spool_bytes", "Encoded bytes waiting in the disk spool.")
QUEUE_DEPTH = Gauge("alignloop_events_queue_depth", "Events waiting in the memory queue.")
KAFKA_UP = Gauge("alignloop_events_kafka_up", "1 if the producer currently reaches Kafka.")
HANDOVER_SECONDS = Histogram(
    "alignloop_events_publish_ack_seconds",
    "From publish() to the event being safely handed over, by outcome (kafka or spool).",
    ["outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


class _AsyncioBridge:
    """Resolves asyncio futures from the publisher thread, one loop wake-up per batch.

    ``asyncio.wrap_future`` wakes the event loop once per event (a self-pipe write and a
    callback each); under thousands of ratings a second that was a tenth of the serving
    process's CPU. Here the first completion of a burst schedules one drain, and the drain
    settles every future that completed meanwhile.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._ready: list[tuple[Future[Handover], asyncio.Future[Handover]]] = []

    def watch(self, done: Future[Handover]) -> asyncio.Future[Handover]:
        waiter: asyncio.Future[Handover] = self.loop.create_future()
        done.add_done_callback(lambda f: self._completed(f, waiter))
        return waiter

    def _completed(self, done: Future[Handover], waiter: asyncio.Future[Handover]) -> None:
        with self._lock:
            first = not self._ready
            self._ready.append((done, waiter))
        if first:
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
        for done, waiter in ready:
            if waiter.cancelled():
                continue
            exc = done.exception()
            if exc is not None:
                waiter.set_exception(exc)
            else:
                waiter.set_result(done.result())


class PublisherClosed(RuntimeError):
    """publish() after close(): the event was not accepted."""


class EventRejected(Exception):
    """The event can never be delivered; it was quarantined, not retried.

    ``reason``: ``too_large`` (over ``max_event_bytes``), ``serialization``, or the Kafka
    error's name in lower case (``msg_size_too_large``, ...); ``topic``: where it was going.
    """

    def __init__(self, topic: str, reason: str, detail: str) -> None:
        super().__init__(f"event for {topic} rejected ({reason}): {detail}")
        self.topic = topic
        self.reason = reason
        self.detail = detail


PERMANENT_ERRORS = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.INVALID_RECORD,
        KafkaError._KEY_SERIALIZATION,
        KafkaError._VALUE_SERIALIZATION,
    }
)
"""Error codes that refuse one record for good: it is quarantined, not retried. librdkafka
reports a record over its own ``message.max.bytes`` with the broker's code (raised by
``produce()``), so one code covers both."""

_PENDING_REJECTS_MAX = 64
"""Rejected events waiting for the worker to write their quarantine line; beyond this they
are counted and logged without a line (a flood of oversized events must not hold memory)."""


class PublisherState(enum.StrEnum):
    NEW = "new"
    DIRECT = "direct"
    SPOOLING = "spooling"
    REPLAYING = "replaying"
    CLOSED = "closed"


@dataclass(slots=True)
class _Pending:
    topic: str
    key: bytes | None
    value: bytes
    future: Future[Handover]
    published_at: float = field(default_factory=time.monotonic)

    def record(self) -> SpoolRecord:
        return SpoolRecord(self.topic, self.key, self.value)


@dataclass(slots=True, frozen=True)
class _Refusal:
    """Why a record can never be delivered (the metric's reason label, and details)."""

    reason: str
    detail: str


_Outcome = bool | _Refusal
"""Of one send: True acked, False not acked (an outage: retry), or refused for good."""


@dataclass(slots=True)
class _Rejected:
    """An event refused in publish(), waiting for the worker to quarantine it."""

    item: _Pending
    refusal: _Refusal
    serialised: bool  # False: item.value is empty, the event could not be serialised
    event_type: str | None
    event_id: str | None


def _refusal(err: KafkaError) -> _Refusal:
    return _Refusal(err.name().lstrip("_").lower(), str(err))


def _parse_bootstrap(bootstrap: str) -> list[tuple[str, int]]:
    hosts = []
    for part in bootstrap.split(","):
        host, _, port = part.strip().rpartition(":")
        hosts.append((host.strip("[]") or "localhost", int(port or 9092)))
    return hosts


class EventPublisher:
    """Produces events to Kafka durably without ever blocking the caller (see module doc).

    Thread-safe: ``publish()`` may be called from any thread, including an asyncio loop.
    """

    # Long only in lines: the producer's settings and the publisher's state, one per line.
    def __init__(
        self,
        bootstrap: str,
        spool_dir: Path,
        spool_max_bytes: int,
        client_id: str = "alignloop",
        *,
        queue_size: int = 10_000,
        batch_size: int = 500,
        linger_ms: int = 5,
        request_timeout_ms: int = 3_000,
        delivery_timeout_ms: int = 5_000,
        max_block_ms: int = 3_000,
        probe_interval: float = 1.0,
        replay_chunk: int = 500,
        spool_segment_bytes: int = 16 * 1024 * 1024,
        max_event_bytes: int = 900_000,
        reserved_topics: Collection[str] = (topics.FEEDBACK,),
        reserved_share: float = 0.0,
        quarantine_path: Path | None = None,
        quarantine_max_bytes: int | None = None,
        producer_config: Mapping[str, Any] | None = None,
    ) -> None:
        if not 0.0 <= reserved_share < 1.0:
            raise ValueError(f"reserved_share must be in [0, 1), not {reserved_share}")
        self.bootstrap = bootstrap
        self.spool_dir = Path(spool_dir)
        self.spool_max_bytes = spool_max_bytes
        self.client_id = client_id
        self.batch_size = batch_size
        self.probe_interval = probe_interval
        self.replay_chunk = replay_chunk
        self.max_event_bytes = max_event_bytes
        self.reserved_topics = frozenset(reserved_topics)
        # What events of the other topics may fill, together (see "Feedback's reserve").
        self.unreserved_max_bytes = int(spool_max_bytes * (1.0 - reserved_share))
        delivery_timeout_ms = max(delivery_timeout_ms, linger_ms + request_timeout_ms)
        self._producer_config: dict[str, Any] = {
            "bootstrap.servers": ",".join(b.strip() for b in bootstrap.split(",")),
            "client.id": client_id,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": linger_ms,
            "request.timeout.ms": request_timeout_ms,
            "message.timeout.ms": delivery_timeout_ms,  # = Java's delivery.timeout.ms
            "reconnect.backoff.max.ms": 1_000,
            "error_cb": self._on_client_error,
            "logger": logging.getLogger(f"{__name__}.librdkafka"),
            # librdkafka refuses records over this itself; never below what we let through.
            "message.max.bytes": max(1_000_000, max_event_bytes + 4096),
            **(producer_config or {}),
        }
        # How long connecting (the probe's metadata request) may take.
        self._connect_timeout = max_block_ms / 1000
        # How long a flush may take: every message completes by the delivery timeout.
        self._flush_timeout = delivery_timeout_ms / 1000 + 2.0
        # The real bound (both spools together) is enforced here; the DiskSpool caps are a
        # backstop with headroom, so that moving overflow records into the main spool can
        # never fail half-way because of a racing append.
        self._main = DiskSpool(
            self.spool_dir / "main", 2 * spool_max_bytes, segment_bytes=spool_segment_bytes
        )
        self._overflow = DiskSpool(
            self.spool_dir / "overflow", 2 * spool_max_bytes, segment_bytes=spool_segment_bytes
        )
        self._quarantine = Quarantine(
            quarantine_path or self.spool_dir / "quarantine.jsonl",
            spool_max_bytes if quarantine_max_bytes is None else quarantine_max_bytes,
        )
        # What both spools hold, and the part of it outside the reserve (see "Feedback's
        # reserve"); guarded by _lock.
        self._held_bytes = self._main.bytes + self._overflow.bytes
        self._held_unreserved = self._held_bytes - sum(
            self._main.topic_bytes(t) + self._overflow.topic_bytes(t) for t in self.reserved_topics
        )
        self._rejects: deque[_Rejected] = deque()  # guarded by _lock
        self._queue: queue.Queue[_Pending] = queue.Queue(maxsize=queue_size)
        # guards _overflowing, _overflow_pending, _closed, _rejects, _held_*
        self._lock = threading.Lock()
        self._overflowing = False
        self._overflow_pending: deque[_Pending] = deque()
        self._closed = False
        self._stop = threading.Event()
        self._state = PublisherState.NEW
        self._producer: Producer | None = None
        self._next_probe = 0.0
        self._last_error: str | None = None
        self._thread: threading.Thread | None = None
        self._bridges: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _AsyncioBridge] = (
            weakref.WeakKeyDictionary()
        )
        self._update_gauges()

    # --- public API -------------------------------------------------------------------

    def start(self) -> EventPublisher:
        """Start the background thread. Returns at once; replay of a leftover spool and the
        first connection happen in the background."""
        if self._thread is None:
            self._state = PublisherState.SPOOLING  # with an immediate probe
            self._thread = threading.Thread(
                target=self._run, name=f"event-publisher-{self.client_id}", daemon=True
            )
            self._thread.start()
        return self

    def publish(self, topic: str, event: Event) -> Future[Handover]:
        """Hand ``event`` over for delivery to ``topic`` (key ``event.key()``); never blocks
        on the broker, never raises. See the module doc for what the future resolves to."""
        future: Future[Handover] = Future()
        future.set_running_or_notify_cancel()  # a waiter's cancel() must not void delivery
        key = event.key()
        try:
            item = _Pending(topic, key, event.to_bytes(), future)
        except Exception as exc:  # e.g. a lone surrogate in a string
            item = _Pending(topic, key, b"", future)
            refusal: _Refusal | None = _Refusal("serialization", repr(exc))
        else:
            refusal = self._oversize(item.record())
        with self._lock:
            if self._closed:
                self._drop(item, PublisherClosed("the event publisher is closed"))
                return future
            if refusal is not None:
                self._reject_later(item, refusal, event)
                return future
            if not self._overflowing:
                try:
                    self._queue.put_nowait(item)
                    return future
                except queue.Full:
                    self._overflowing = True
                    log.warning("event queue full: spilling new events to the overflow spool")
            # Overflow mode: append behind everything older (see module doc).
            size = encoded_size(item.record())
            if size > self._spool_room(topic):
                self._drop(item, self._spool_full(topic))
                return future
            try:
                self._overflow.append_many([item.record()], fsync=False)
            except Exception as exc:  # disk error: report it on the future, not raise
                self._drop(item, exc)
                return future
            self._hold(topic, size)
            self._overflow_pending.append(item)
        return future

    async def publish_and_wait(self, topic: str, event: Event) -> Handover:
        """Publish and wait until the event is acked by Kafka or fsync'd in the spool.
        Returns "kafka" or "spool"; raises SpoolFull / PublisherClosed if it was dropped,
        EventRejected if it was quarantined."""
        loop = asyncio.get_running_loop()
        bridge = self._bridges.get(loop)
        if bridge is None:
            bridge = self._bridges.setdefault(loop, _AsyncioBridge(loop))
        return await bridge.watch(self.publish(topic, event))

    def close(self, timeout: float = 10.0) -> None:
        """Stop accepting events, deliver or spool everything accepted, stop the thread.

        What is still queued is sent if Kafka is up (else spooled); a replay in progress
        stops and continues at the next start. Waits up to ``timeout`` seconds.
        """
        with self._lock:
            self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("event publisher did not stop within %.1fs", timeout)
                return
        else:
            self._finish()
        self._state = PublisherState.CLOSED

    def snapshot(self) -> dict[str, Any]:
        """State for /healthz."""
        return {
            "state": str(self._state),
            "kafka_up": self._producer is not None,
            "queue_depth": self._queue.qsize(),
            "overflowing": self._overflowing,
            "spool_records": len(self._main) + len(self._overflow),
            "spool_bytes": self._held_bytes,
            "spool_max_bytes": self.spool_max_bytes,
            "quarantine_bytes": self._quarantine.size,
            "last_error": self._last_error,
        }

    @property
    def state(self) -> PublisherState:
        return self._state

    def __enter__(self) -> EventPublisher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the worker thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            # A previous process may have died in overflow mode: those records are newer
            # than the main spool's, older than anything published now.
            self._move_overflow(final=False)
            while True:
                self._settle_overflow()
                self._settle_rejects()
                if self._overflowing and self._queue.empty():
                    self._move_overflow(final=True)
                stopping = self._stop.is_set()
                if stopping and self._queue.empty() and not self._overflowing:
                    break
                if self._state is PublisherState.DIRECT and len(self._main):
                    self._state = PublisherState.REPLAYING  # overflow records just arrived
                if self._state is PublisherState.DIRECT:
                    batch = self._take(0.0 if stopping else 0.1)
                    if batch:
                        self._send_direct(batch)
                elif self._state is PublisherState.REPLAYING and not stopping:
                    if not len(self._main) and not self._overflowing:
                        self._state = PublisherState.DIRECT  # nothing (left) to replay
                        log.info("event spool empty; producing directly to Kafka")
                        continue
                    self._spool(self._take(0.0))  # behind the records being replayed
                    self._replay_chunk()
                else:  # SPOOLING (or REPLAYING while stopping: leave it for the next start)
                    if not stopping and time.monotonic() >= self._next_probe:
                        self._probe()
                        continue
                    wait = max(0.0, min(0.1, self._next_probe - time.monotonic()))
                    self._spool(self._take(0.0 if stopping else wait))
                self._update_gauges()
        except Exception:
            log.exception("event publisher thread crashed; events now fail")
            self._last_error = "publisher thread crashed"
        finally:
            self._finish()

    def _finish(self) -> None:
        """Resolve whatever is left and release resources (worker thread or close())."""
        with self._lock:
            self._closed = True
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            self._spool([item])
        self._settle_overflow()
        self._settle_rejects()
        self._close_producer(timeout=1.0)
        self._update_gauges()
        self._main.close()
        self._overflow.close()
        self._quarantine.close()

    def _take(self, timeout: float) -> list[_Pending]:
        """Up to batch_size queued events, waiting up to ``timeout`` for the first."""
        try:
            first = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return []
        batch = [first]
        while len(batch) < self.batch_size:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    # --- Kafka --------------------------------------------------------------------------

    def _deliver(self, records: Sequence[SpoolRecord | _Pending]) -> list[_Outcome]:
        """Send records and wait for their acks: per record True (acked), False (not acked:
        an outage) or a refusal for good. Records over ``max_event_bytes`` are refused
        without being sent; a record refused in a batch of several is sent again alone,
        since a broker refuses a whole batch for one bad record (module doc)."""
        outcomes: list[_Outcome] = [False] * len(records)
        to_send: list[int] = []
        for i, r in enumerate(records):
            refusal = self._oversize(SpoolRecord(r.topic, r.key, r.value))
            if refusal is None:
                to_send.append(i)
            else:
                outcomes[i] = refusal
        sent = self._send_and_wait([records[i] for i in to_send])
        for i, outcome in zip(to_send, sent, strict=True):
            outcomes[i] = outcome
        if len(to_send) > 1:
            outage = any(o is False for o in sent)
            for i in to_send:
                if isinstance(outcomes[i], _Refusal):
                    # During an outage, keep it (spool): it is sent alone once Kafka is back.
                    outcomes[i] = False if outage else self._send_and_wait([records[i]])[0]
                    outage = outage or outcomes[i] is False
        return outcomes

    def _send_and_wait(self, records: Sequence[SpoolRecord | _Pending]) -> list[_Outcome]:
        """Send records and wait for their acks (see _deliver for the outcomes)."""
        if not records:
            return []
        producer = self._producer
        assert producer is not None
        outcomes: list[_Outcome] = [False] * len(records)

        def report(i: int) -> Callable[[KafkaError | None, Message], None]:
            def on_delivery(err: KafkaError | None, _msg: Message) -> None:
                if err is None:
                    outcomes[i] = True
                elif err.code() in PERMANENT_ERRORS:
                    outcomes[i] = _refusal(err)
                else:
                    self._last_error = f"produce: {err}"

            return on_delivery

        for i, r in enumerate(records):
            try:
                producer.produce(r.topic, value=r.value, key=r.key, on_delivery=report(i))
            except KafkaException as exc:
                err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
                if err is not None and err.code() in PERMANENT_ERRORS:
                    outcomes[i] = _refusal(err)  # never sent: no order to keep
                    continue
                self._last_error = f"send: {exc!r}"
                break  # a later record must not be acked ahead of this one: stop here
            except Exception as exc:  # BufferError (local queue full)
                self._last_error = f"send: {exc!r}"
                break
        try:
            # Serves the delivery reports (in this thread); returns when every message is
            # acked or failed (message.timeout.ms), or after the flush timeout.
            left = producer.flush(self._flush_timeout)
            if left:
                self._last_error = f"flush: {left} messages without a delivery report"
        except Exception as exc:
            self._last_error = f"flush: {exc!r}"
        return list(outcomes)  # a report served later cannot change what the caller sees

    def _send_direct(self, batch: list[_Pending]) -> None:
        outcomes = self._deliver(batch)
        failed = []
        for item, outcome in zip(batch, outcomes, strict=True):
            if outcome is True:
                self._resolve(item, "kafka")
            elif isinstance(outcome, _Refusal):
                self._reject(item, outcome)
            else:
                failed.append(item)
        if failed:
            self._outage()
            self._spool(failed)

    def _replay_chunk(self) -> None:
        records = self._main.peek(self.replay_chunk)
        if not records:
            return  # the loop switches to DIRECT (or first moves the overflow records)
        outcomes = self._deliver(records)
        prefix = 0
        while prefix < len(outcomes) and outcomes[prefix] is not False:
            prefix += 1
        for r, outcome in zip(records[:prefix], outcomes[:prefix], strict=True):
            if isinstance(outcome, _Refusal):  # before advance(): a crash writes it twice
                self._quarantine_record(r.topic, r.key, r.value, outcome)
        self._main.advance(prefix)
        self._release(records[:prefix])
        for r, outcome in zip(records[:prefix], outcomes[:prefix], strict=True):
            if outcome is True:
                REPLAYED.labels(r.topic).inc()
        if prefix < len(records):
            self._outage()

    def _probe(self) -> None:
        """Reconnect if the broker answers: a TCP connect first (cheap when it is down),
        then a fresh producer that must fetch the cluster metadata."""
        self._next_probe = time.monotonic() + self.probe_interval
        if not self._reachable():
            return
        producer = None
        try:
            producer = Producer(self._producer_config)
            producer.list_topics(timeout=self._connect_timeout)
        except Exception as exc:
            self._last_error = f"connect: {exc!r}"
            log.debug("kafka probe failed: %r", exc)
            if producer is not None:
                self._discard(producer)
            return
        self._producer = producer
        KAFKA_UP.set(1)
        self._state = PublisherState.REPLAYING
        log.info(
            "kafka reachable at %s; replaying %d spooled events", self.bootstrap, len(self._main)
        )

    def _reachable(self) -> bool:
        for host, port in _parse_bootstrap(self.bootstrap):
            try:
                with socket.create_connection((host, port), timeout=0.5):
                    return True
            except OSError:
                continue
        return False

    def _outage(self) -> None:
        log.warning(
            "kafka unreachable (%s); spooling events to %s", self._last_error, self.spool_dir
        )
        self._close_producer(timeout=0.0)
        self._state = PublisherState.SPOOLING
        self._next_probe = time.monotonic() + self.probe_interval

    def _close_producer(self, timeout: float) -> None:
        producer, self._producer = self._producer, None
        KAFKA_UP.set(0)
        if producer is not None:
            with contextlib.suppress(Exception):
                producer.flush(timeout)  # normally nothing is outstanding here
            self._discard(producer)

    @staticmethod
    def _discard(producer: Producer) -> None:
        """Drop whatever the producer still holds (those records count as not acked: they
        are spooled or stay in the spool) and release it."""
        with contextlib.suppress(Exception):
            producer.purge()
            producer.poll(0)  # serve the purged messages' reports
            producer.close()

    def _on_client_error(self, err: KafkaError) -> None:
        """librdkafka's client-level errors (broker down, ...); a send that fails because
        of them reports it on its own, so they are only kept for /healthz."""
        self._last_error = f"kafka: {err}"
        log.debug("kafka client error: %s", err)

    # --- spooling -------------------------------------------------------------------------

    def _spool(self, items: list[_Pending]) -> None:
        """Append to the main spool in order (one fsync), resolving "spool"; what does not
        fit under the bound (or its topic's share of it) is dropped (newest first: order of
        the kept ones is intact)."""
        if not items:
            return
        kept: list[_Pending] = []
        dropped: list[_Pending] = []
        with self._lock:  # room is taken here, so that a racing publish() sees it taken
            total = self.spool_max_bytes - self._held_bytes
            unreserved = self.unreserved_max_bytes - self._held_unreserved
            for item in items:
                size = encoded_size(item.record())
                reserved = item.topic in self.reserved_topics
                if size <= total and (reserved or size <= unreserved):
                    kept.append(item)
                    self._hold(item.topic, size)
                    total -= size
                    if not reserved:
                        unreserved -= size
                else:
                    dropped.append(item)
                    # Once one is dropped, drop the rest of its kind: no gaps inside a batch.
                    if reserved:
                        total = -1
                    else:
                        unreserved = -1
        for item in dropped:
            self._drop(item, self._spool_full(item.topic))
        try:
            self._main.append_many([i.record() for i in kept], fsync=True)
        except Exception as exc:
            log.exception("cannot write the event spool")
            self._release([i.record() for i in kept])
            for item in kept:
                self._drop(item, exc)
            return
        for item in kept:
            self._resolve(item, "spool")

    def _settle_overflow(self) -> None:
        """fsync the overflow spool and resolve the futures of what it holds."""
        with self._lock:
            items = list(self._overflow_pending)
            self._overflow_pending.clear()
        if not items:
            return
        try:
            self._overflow.sync()
        except Exception as exc:
            for item in items:
                self._drop(item, exc)
            return
        for item in items:
            self._resolve(item, "spool")

    def _move_overflow(self, *, final: bool) -> None:
        """Move overflow records to the main spool's tail. ``final``: also leave overflow
        mode, atomically with taking the last records (later publishes go to the queue,
        which this thread only reads after the move, so they stay behind)."""
        while True:
            with self._lock:
                records = self._overflow.peek(self.replay_chunk)
                last = len(records) == len(self._overflow)
                if last and final:
                    self._overflowing = False
            if records:
                self._main.append_many(records, fsync=True)
                self._overflow.advance(len(records))
            if last:
                return

    def _hold(self, topic: str, size: int) -> None:
        """Count ``size`` bytes of ``topic`` into the spools (negative: out of them; caller
        holds ``_lock``)."""
        self._held_bytes += size
        if topic not in self.reserved_topics:
            self._held_unreserved += size

    def _release(self, records: Sequence[SpoolRecord]) -> None:
        """Stop counting records that left the spools (delivered, quarantined, or never
        written)."""
        with self._lock:
            for r in records:
                self._hold(r.topic, -encoded_size(r))

    def _spool_room(self, topic: str) -> int:
        """Bytes an event of ``topic`` may still add to the spools (caller holds ``_lock``)."""
        room = self.spool_max_bytes - self._held_bytes
        if topic not in self.reserved_topics:
            room = min(room, self.unreserved_max_bytes - self._held_unreserved)
        return room

    def _spool_full(self, topic: str) -> SpoolFull:
        if topic in self.reserved_topics:
            return SpoolFull(f"event spool is full ({self.spool_max_bytes} B)")
        return SpoolFull(
            f"event spool is full for {topic} ({self.unreserved_max_bytes} of "
            f"{self.spool_max_bytes} B; the rest is kept for feedback)"
        )

    # --- quarantine ------------------------------------------------------------------------

    def _oversize(self, record: SpoolRecord) -> _Refusal | None:
        size = len(record.value) + len(record.key or b"")
        if size <= self.max_event_bytes:
            return None
        return _Refusal("too_large", f"{size} bytes > max_event_bytes {self.max_event_bytes}")

    def _reject_later(self, item: _Pending, refusal: _Refusal, event: Event) -> None:
        """(publish(), under _lock) Leave the quarantine line to the worker: it fsyncs,
        and publish() must not block. Beyond _PENDING_REJECTS_MAX, fail without a line."""
        serialised = refusal.reason != "serialization"
        rejected = _Rejected(
            item, refusal, serialised, event.__class__.__name__, str(event.event_id)
        )
        if len(self._rejects) < _PENDING_REJECTS_MAX:
            self._rejects.append(rejected)
            return
        QUARANTINE_UNWRITTEN.labels(item.topic).inc()
        log.error(
            "event %s for %s quarantined (%s) without a line: %d already wait to be written",
            rejected.event_id,
            item.topic,
            refusal.reason,
            len(self._rejects),
        )
        self._count_quarantined(item.topic, refusal)
        PUBLISHED.labels(item.topic, "quarantined").inc()
        item.future.set_exception(EventRejected(item.topic, refusal.reason, refusal.detail))

    def _settle_rejects(self) -> None:
        """Quarantine the events publish() refused (worker thread)."""
        while True:
            with self._lock:
                if not self._rejects:
                    return
                rejected = self._rejects.popleft()
            item = rejected.item
            self._quarantine_record(
                item.topic,
                item.key,
                item.value if rejected.serialised else None,
                rejected.refusal,
                event_type=rejected.event_type,
                event_id=rejected.event_id,
            )
            PUBLISHED.labels(item.topic, "quarantined").inc()
            item.future.set_exception(
                EventRejected(item.topic, rejected.refusal.reason, rejected.refusal.detail)
            )

    def _reject(self, item: _Pending, refusal: _Refusal) -> None:
        """Quarantine an event Kafka refused for good and fail its future."""
        self._quarantine_record(item.topic, item.key, item.value, refusal)
        PUBLISHED.labels(item.topic, "quarantined").inc()
        item.future.set_exception(EventRejected(item.topic, refusal.reason, refusal.detail))

    def _quarantine_record(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        refusal: _Refusal,
        *,
        event_type: str | None = None,
        event_id: str | None = None,
    ) -> None:
        """Write the quarantine line (fsync'd), count and log it; never raises."""
        try:
            written = self._quarantine.write(
                topic=topic,
                reason=refusal.reason,
                detail=refusal.detail,
                key=key,
                value=value,
                event_type=event_type,
                event_id=event_id,
            )
        except Exception:
            log.exception("cannot write the quarantine file %s", self._quarantine.path)
            written = False
        if not written:
            QUARANTINE_UNWRITTEN.labels(topic).inc()
        self._count_quarantined(topic, refusal)
        log.error(
            "event for %s (key %r) quarantined: %s: %s%s",
            topic,
            key,
            refusal.reason,
            refusal.detail,
            "" if written else " (its line was NOT written: quarantine file full or failing)",
        )

    def _count_quarantined(self, topic: str, refusal: _Refusal) -> None:
        QUARANTINED.labels(topic, refusal.reason).inc()
        QUARANTINE_BYTES.set(self._quarantine.size)

    # --- bookkeeping ---------------------------------------------------------------------

    def _resolve(self, item: _Pending, outcome: Handover) -> None:
        PUBLISHED.labels(item.topic, outcome).inc()
        HANDOVER_SECONDS.labels(outcome).observe(time.monotonic() - item.published_at)
        item.future.set_result(outcome)

    def _drop(self, item: _Pending, exc: BaseException) -> None:
        PUBLISHED.labels(item.topic, "dropped").inc()
        item.future.set_exception(exc)

    def _update_gauges(self) -> None:
        QUARANTINE_BYTES.set(self._quarantine.size)
        SPOOL_RECORDS.set(len(self._main) + len(self._overflow))
        SPOOL_BYTES.set(self._held_bytes)
        QUEUE_DEPTH.set(self._queue.qsize())
