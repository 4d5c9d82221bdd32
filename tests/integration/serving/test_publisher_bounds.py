"""EventPublisher's bounds: events Kafka will never take are quarantined (not retried as
an outage), and feedback keeps its reserved share of the spool.

Brokers: the embedded Tansu broker (``broker``) where it can cause the fault, and
librdkafka's test broker (``refusing_broker``, tests/fixtures/kafka_faults.py) for a broker
that refuses a record: Tansu stores records of any size.
"""

from __future__ import annotations

import asyncio
import json
import stat
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest

from deploy.local.broker import free_port
from schemas import topics
from schemas.events import FeedbackSubmitted, InteractionLogged
from serving.publisher import EventPublisher, EventRejected, Handover, PublisherState
from serving.spool import DiskSpool, SpoolFull, SpoolRecord, encoded_size
from tests.fixtures.broker import consume_records, unique_topic
from tests.fixtures.kafka_faults import RefusingBroker, read_values
from tests.fixtures.polling import wait_until
from tests.integration.serving.test_publisher import FAST, make_event, metric


def big_event(response_id: str, size: int) -> InteractionLogged:
    """An interaction whose serialised form is a little over ``size`` bytes."""
    fields = make_event(response_id).model_dump()
    fields["messages"] = [{"role": "user", "content": "x" * size}]
    return InteractionLogged.model_validate(fields)


def feedback(n: int, comment: str | None = None) -> FeedbackSubmitted:
    fid = uuid.uuid4()
    return FeedbackSubmitted(
        producer="test",
        event_id=fid,
        feedback_id=fid,
        response_id=f"resp-fb-{n}",
        choice_index=0,
        rating="up",
        user="ada",
        comment=comment,
        idempotency_key=None,
    )


def quarantine_lines(spool_dir: Path) -> list[dict]:
    path = spool_dir / "quarantine.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def dead_bootstrap() -> str:
    """An address nothing listens on: the broker is 'down' from the start."""
    return f"127.0.0.1:{free_port()}"


@pytest.fixture
def publishers() -> Iterator[list[EventPublisher]]:
    made: list[EventPublisher] = []
    yield made
    for p in made:
        p.close(timeout=5)


def rejection(future: Future[Handover]) -> EventRejected:
    exc = future.exception(timeout=20)
    assert isinstance(exc, EventRejected), f"expected EventRejected, got {exc!r}"
    return exc


# --- (a)+(b) too large for our bound: quarantined without touching Kafka -------------


def test_oversized_event_is_quarantined_and_later_events_still_delivered(
    broker, tmp_path: Path, publishers
) -> None:
    topic = unique_topic("pub-oversize")
    spool_dir = tmp_path / "spool"
    pub = EventPublisher(broker.bootstrap, spool_dir, 10_000_000, **FAST).start()  # 900 kB bound
    publishers.append(pub)
    before, after = make_event("resp-before"), make_event("resp-after")
    big = big_event("resp-big", 950_000)
    assert len(big.to_bytes()) > 900_000
    f_before = pub.publish(topic, before)
    f_big = pub.publish(topic, big)
    f_after = pub.publish(topic, after)

    exc = rejection(f_big)
    assert (exc.reason, exc.topic) == ("too_large", topic)
    assert f_before.result(timeout=30) == "kafka"
    assert f_after.result(timeout=30) == "kafka"  # not stuck behind it, not spooled
    assert metric("alignloop_events_quarantined_total", topic=topic, reason="too_large") == 1
    assert metric("alignloop_events_published_total", topic=topic, outcome="quarantined") == 1
    snap = pub.snapshot()
    assert (snap["state"], snap["kafka_up"], snap["spool_records"]) == ("direct", True, 0)

    [line] = quarantine_lines(spool_dir)
    assert (line["topic"], line["reason"], line["key"]) == (topic, "too_large", "resp-big")
    assert json.loads(line["value"])["event_id"] == str(big.event_id)
    assert line["size"] == len(big.to_bytes()) + len(b"resp-big")
    mode = stat.S_IMODE((spool_dir / "quarantine.jsonl").stat().st_mode)
    assert mode == 0o600

    consumed = consume_records(broker.bootstrap, topic, expected=2, timeout=30)
    assert sorted(r.event.event_id for r in consumed) == sorted([before.event_id, after.event_id])


def test_oversized_feedback_raises_event_rejected_from_publish_and_wait(
    broker, tmp_path: Path, publishers
) -> None:
    pub = EventPublisher(
        broker.bootstrap, tmp_path / "spool", 1_000_000, max_event_bytes=5_000, **FAST
    ).start()
    publishers.append(pub)
    topic = unique_topic("pub-oversize-fb")

    async def main() -> tuple[BaseException | None, str]:
        try:
            await asyncio.wait_for(pub.publish_and_wait(topic, feedback(1, "y" * 6_000)), 30)
            raised = None
        except EventRejected as e:
            raised = e
        ok = await asyncio.wait_for(pub.publish_and_wait(topic, feedback(2, "fine")), 30)
        return raised, ok

    raised, ok = asyncio.run(main())
    assert isinstance(raised, EventRejected) and raised.reason == "too_large"
    assert ok == "kafka"


def test_unserialisable_event_is_quarantined_not_raised(broker, tmp_path: Path, publishers) -> None:
    spool_dir = tmp_path / "spool"
    pub = EventPublisher(broker.bootstrap, spool_dir, 1_000_000, **FAST).start()
    publishers.append(pub)
    topic = unique_topic("pub-unserialisable")
    bad = feedback(1, "lone surrogate \ud800")  # valid in Python, not encodable as UTF-8
    assert rejection(pub.publish(topic, bad)).reason == "serialization"
    assert pub.publish(topic, feedback(2)).result(timeout=30) == "kafka"
    [line] = quarantine_lines(spool_dir)
    assert (line["reason"], line["value"], line["event_id"]) == (
        "serialization",
        None,
        str(bad.event_id),
    )
    assert metric("alignloop_events_quarantined_total", topic=topic, reason="serialization") == 1


def test_oversized_record_left_in_a_spool_is_quarantined_on_replay(
    broker, tmp_path: Path, dead_bootstrap: str, publishers
) -> None:
    """A spool written under a larger bound used to be replayed forever: now the record over
    the bound is quarantined and the ones behind it are delivered."""
    topic = unique_topic("pub-replay-oversize")
    spool_dir = tmp_path / "spool"
    first = EventPublisher(dead_bootstrap, spool_dir, 10_000_000, max_event_bytes=5_000_000, **FAST)
    a, big, b = make_event("resp-ra"), big_event("resp-rbig", 950_000), make_event("resp-rb")
    futures = [first.start().publish(topic, e) for e in (a, big, b)]
    assert [f.result(timeout=30) for f in futures] == ["spool"] * 3
    first.close(timeout=5)

    second = EventPublisher(broker.bootstrap, spool_dir, 10_000_000, **FAST).start()
    publishers.append(second)
    wait_until(
        lambda: second.state is PublisherState.DIRECT and second.snapshot()["spool_records"] == 0,
        timeout=30,
        what="replay past the oversized record",
    )
    [line] = quarantine_lines(spool_dir)
    assert (line["reason"], line["key"]) == ("too_large", "resp-rbig")
    consumed = consume_records(broker.bootstrap, topic, expected=2, timeout=30)
    assert sorted(r.event.event_id for r in consumed) == sorted([a.event_id, b.event_id])


# --- (a) refused by Kafka for good: quarantined, not an outage ---------------------------


def test_record_the_broker_refuses_is_quarantined_and_later_events_delivered(
    refusing_broker: RefusingBroker, tmp_path: Path, publishers
) -> None:
    topic = unique_topic("pub-refused")
    spool_dir = tmp_path / "spool"
    pub = EventPublisher(refusing_broker.bootstrap, spool_dir, 1_000_000, **FAST).start()
    publishers.append(pub)
    first, refused, later = make_event("resp-1"), make_event("resp-2"), make_event("resp-3")
    assert pub.publish(topic, first).result(timeout=30) == "kafka"

    refusing_broker.refuse_produce(1)  # MESSAGE_TOO_LARGE, as for a topic's max.message.bytes
    exc = rejection(pub.publish(topic, refused))
    assert exc.reason == "msg_size_too_large"
    assert pub.publish(topic, later).result(timeout=30) == "kafka"
    assert pub.snapshot()["spool_records"] == 0
    assert pub.state is PublisherState.DIRECT
    assert (
        metric("alignloop_events_quarantined_total", topic=topic, reason="msg_size_too_large") == 1
    )
    [line] = quarantine_lines(spool_dir)
    assert json.loads(line["value"])["event_id"] == str(refused.event_id)

    values = read_values(refusing_broker.bootstrap, topic, expected=2, timeout=20)
    got = sorted(json.loads(v)["event_id"] for v in values)
    assert got == sorted([str(first.event_id), str(later.event_id)])


def test_a_refused_batch_does_not_quarantine_its_neighbours(
    refusing_broker: RefusingBroker, tmp_path: Path, publishers
) -> None:
    """The broker refuses a whole batch: each record is sent again alone before any is
    quarantined, so the innocent ones (here: all) are delivered."""
    topic = unique_topic("pub-refused-batch")
    pub = EventPublisher(refusing_broker.bootstrap, tmp_path / "spool", 1_000_000, **FAST)
    publishers.append(pub)
    events = [make_event(f"resp-b{i}", i) for i in range(5)]
    futures = [pub.publish(topic, e) for e in events]  # queued before start: one batch
    refusing_broker.refuse_produce(1)
    pub.start()
    assert [f.result(timeout=30) for f in futures] == ["kafka"] * 5
    assert quarantine_lines(tmp_path / "spool") == []
    values = read_values(refusing_broker.bootstrap, topic, expected=5, timeout=20)
    assert sorted(json.loads(v)["event_id"] for v in values) == sorted(
        str(e.event_id) for e in events
    )


def test_record_the_client_refuses_is_quarantined(broker, tmp_path: Path, publishers) -> None:
    """librdkafka refuses a record over its own message.max.bytes in produce() itself."""
    topic = unique_topic("pub-client-refused")
    pub = EventPublisher(
        broker.bootstrap,
        tmp_path / "spool",
        1_000_000,
        producer_config={"message.max.bytes": 20_000},
        **FAST,
    ).start()
    publishers.append(pub)
    exc = rejection(pub.publish(topic, big_event("resp-c1", 50_000)))  # under our 900 kB
    assert exc.reason == "msg_size_too_large"
    later = make_event("resp-c2")
    assert pub.publish(topic, later).result(timeout=30) == "kafka"
    [got] = consume_records(broker.bootstrap, topic, expected=1, timeout=30)
    assert got.event.event_id == later.event_id


# --- (c) feedback's reserved share of the spool --------------------------------------------


@pytest.mark.parametrize(
    ("reserve", "queue_size"),
    [(0.25, 10_000), (0.25, 2), (0.0, 10_000)],
    ids=["reserve", "reserve-overflow-path", "no-reserve-control"],
)
def test_interaction_flood_during_an_outage_leaves_feedback_its_share(
    dead_bootstrap: str, tmp_path: Path, publishers, reserve: float, queue_size: int
) -> None:
    flood_events = [make_event(f"resp-flood-{i}", i) for i in range(10, 70)]  # same sizes
    sample = flood_events[0]
    one = encoded_size(SpoolRecord(topics.INTERACTIONS, sample.key(), sample.to_bytes()))
    bound = 40 * one
    spool_dir = tmp_path / "spool"
    pub = EventPublisher(
        dead_bootstrap, spool_dir, bound, reserved_share=reserve, queue_size=queue_size, **FAST
    ).start()
    publishers.append(pub)
    flood = [pub.publish(topics.INTERACTIONS, e) for e in flood_events]
    outcomes = [f.exception(timeout=30) or f.result() for f in flood]
    spooled = outcomes.count("spool")
    assert spooled + sum(isinstance(o, SpoolFull) for o in outcomes) == len(flood_events)
    # Filled its share exactly, also where publish() (overflow path) and the worker both
    # spool: they take room from one count.
    assert spooled == int(bound * (1 - reserve)) // one

    ratings = [pub.publish(topics.FEEDBACK, feedback(i)) for i in range(5)]
    got = [f.exception(timeout=30) or f.result() for f in ratings]
    if reserve:
        assert got == ["spool"] * 5
    else:  # the control: without a reserve the flood leaves no room for ratings
        assert all(isinstance(g, SpoolFull) for g in got)
        return

    # The split is rebuilt from disk: after a restart interactions still find no room.
    pub.close(timeout=5)
    again = EventPublisher(dead_bootstrap, spool_dir, bound, reserved_share=reserve, **FAST)
    publishers.append(again.start())
    late = again.publish(topics.INTERACTIONS, make_event("resp-flood-late", 99))
    assert isinstance(late.exception(timeout=30), SpoolFull)
    assert again.publish(topics.FEEDBACK, feedback(9)).result(timeout=30) == "spool"


def test_records_moving_between_the_spools_are_counted_once(
    dead_bootstrap: str, tmp_path: Path, publishers
) -> None:
    """A start moves what a dead process left in the overflow spool to the main one: two
    files, written one after the other. Held in between (after the main spool's append,
    before the overflow's advance), ratings still find their reserve, and the moved
    interactions still fill theirs."""
    spool_dir = tmp_path / "spool"
    left = [make_event(f"resp-left-{i}", i) for i in range(10, 40)]
    records = [SpoolRecord(topics.INTERACTIONS, e.key(), e.to_bytes()) for e in left]
    bound = 40 * encoded_size(records[0])  # the records left behind fill 3/4 of it
    leftover = DiskSpool(spool_dir / "overflow", 10 * bound)
    leftover.append_many(records)
    leftover.close()

    pub = EventPublisher(
        dead_bootstrap, spool_dir, bound, reserved_share=0.25, queue_size=1, **FAST
    )
    publishers.append(pub)
    moving, go_on = threading.Event(), threading.Event()
    # The one place to hold the worker mid-move: a thread interleaving, not a fault a
    # process kill could cause.
    advance = pub._overflow.advance

    def held_mid_move(n: int) -> None:
        moving.set()
        go_on.wait(timeout=30)
        advance(n)

    pub._overflow.advance = held_mid_move  # type: ignore[method-assign]
    pub.start()
    assert moving.wait(timeout=30)
    # The worker is held: the first rating waits in the queue, the rest take the overflow path.
    votes = [feedback(i) for i in range(5)]
    ratings = [pub.publish(topics.FEEDBACK, v) for v in votes]
    extra = pub.publish(topics.INTERACTIONS, make_event("resp-extra", 99))
    go_on.set()
    assert [f.exception(timeout=30) or f.result() for f in ratings] == ["spool"] * 5
    assert isinstance(extra.exception(timeout=30), SpoolFull)
    held = records + [SpoolRecord(topics.FEEDBACK, v.key(), v.to_bytes()) for v in votes]
    assert pub.snapshot()["spool_bytes"] == sum(encoded_size(r) for r in held)
