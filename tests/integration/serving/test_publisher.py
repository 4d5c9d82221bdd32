"""EventPublisher against a real Kafka-protocol broker (embedded Tansu).

Note: Tansu keeps messages in memory only, so a broker restart loses what it held before;
the outage test therefore checks the events published from the outage on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from deploy.local.broker import EmbeddedBroker, free_port
from schemas.events import InteractionLogged, SamplingRecord
from serving.publisher import EventPublisher, PublisherState
from serving.spool import DiskSpool, SpoolFull
from tests.fixtures.broker import ConsumedRecord, consume_events, consume_records, unique_topic
from tests.fixtures.polling import wait_until

# Fast failure detection keeps the outage tests short.
FAST = {
    "request_timeout_ms": 1_500,
    "delivery_timeout_ms": 2_500,
    "max_block_ms": 1_500,
    "probe_interval": 0.3,
}


def make_event(response_id: str, n: int = 0) -> InteractionLogged:
    return InteractionLogged(
        producer="test",
        response_id=response_id,
        user=None,
        policy_version="v0",
        model="alignloop",
        messages=[{"role": "user", "content": f"question {n}"}],
        choices=[
            {"index": 0, "text": f"answer {n}", "finish_reason": "stop", "completion_tokens": 2}
        ],
        prompt_tokens=3,
        completion_tokens=2,
        latency_ms=1.0,
        ttft_ms=None,
        stream=False,
        sampling=SamplingRecord(temperature=1.0, top_p=1.0, max_tokens=16, n=1),
    )


def events_for(keys: list[str], per_key: int, start: int = 0) -> list[InteractionLogged]:
    """Round-robin over keys so every key gets several events, interleaved."""
    return [make_event(k, start + i) for i in range(per_key) for k in keys]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def assert_exactly_once_in_order(
    consumed: list[ConsumedRecord], published: list[InteractionLogged]
) -> None:
    ids = [r.event.event_id for r in consumed]
    assert len(ids) == len(set(ids)), "duplicate event ids in Kafka"
    assert set(ids) == {e.event_id for e in published}
    for r in consumed:
        assert r.key == r.event.key()
    # Per key (= per partition) the Kafka order is the publish order.
    got: dict[bytes, list] = defaultdict(list)
    for r in sorted(consumed, key=lambda r: (r.partition, r.offset)):
        got[r.key].append(r.event.event_id)
    want: dict[bytes, list] = defaultdict(list)
    for e in published:
        want[e.key()].append(e.event_id)
    assert got == want


@pytest.fixture
def dead_bootstrap() -> str:
    """An address nothing listens on: the broker is 'down' from the start."""
    return f"127.0.0.1:{free_port()}"


@pytest.fixture
def publishers() -> Iterator[list[EventPublisher]]:
    """Collects publishers so a failing test still stops their threads."""
    made: list[EventPublisher] = []
    yield made
    for p in made:
        p.close(timeout=5)


def test_events_arrive_keyed_and_acked_by_kafka(broker, tmp_path: Path, publishers) -> None:
    topic = unique_topic("pub-basic")
    pub = EventPublisher(broker.bootstrap, tmp_path / "spool", 1_000_000, **FAST).start()
    publishers.append(pub)
    events = events_for(["resp-a", "resp-b", "resp-c"], per_key=5)
    futures = [pub.publish(topic, e) for e in events]
    assert [f.result(timeout=30) for f in futures] == ["kafka"] * len(events)
    assert metric("alignloop_events_published_total", topic=topic, outcome="kafka") == 15
    assert pub.snapshot()["state"] == "direct"
    assert pub.snapshot()["spool_records"] == 0

    consumed = consume_records(broker.bootstrap, topic, expected=len(events), timeout=30)
    assert_exactly_once_in_order(consumed, events)
    # Same key, same partition (what consumers and scale-out rely on).
    partitions = defaultdict(set)
    for r in consumed:
        partitions[r.key].add(r.partition)
    assert all(len(p) == 1 for p in partitions.values())


def test_publish_and_wait_from_asyncio(broker, tmp_path: Path, publishers) -> None:
    topic = unique_topic("pub-async")
    pub = EventPublisher(broker.bootstrap, tmp_path / "spool", 1_000_000, **FAST).start()
    publishers.append(pub)
    event = make_event("resp-async")

    async def main() -> str:
        return await asyncio.wait_for(pub.publish_and_wait(topic, event), timeout=30)

    assert asyncio.run(main()) == "kafka"
    [got] = consume_events(broker.bootstrap, topic, expected=1, timeout=20)
    assert got == event


def test_broker_outage_spools_then_replays_exactly_once_in_order(
    own_broker: EmbeddedBroker, tmp_path: Path, publishers
) -> None:
    topic = unique_topic("pub-outage")
    pub = EventPublisher(own_broker.bootstrap, tmp_path / "spool", 5_000_000, **FAST).start()
    publishers.append(pub)
    keys = [f"resp-{i}" for i in range(4)]
    before = [pub.publish(topic, e) for e in events_for(keys, per_key=2)]
    assert {f.result(timeout=30) for f in before} == {"kafka"}
    replayed_before = metric("alignloop_events_replayed_total", topic=topic)

    own_broker.stop()
    during = events_for(keys, per_key=10, start=100)
    futures: list[Future[str]] = []
    slowest = 0.0
    for e in during:
        t0 = time.perf_counter()
        futures.append(pub.publish(topic, e))
        slowest = max(slowest, time.perf_counter() - t0)
    # publish() only enqueues: far below any broker timeout even while it is down.
    assert slowest < 0.2
    assert [f.result(timeout=30) for f in futures] == ["spool"] * len(during)
    snap = pub.snapshot()
    assert snap["state"] == "spooling"
    assert snap["kafka_up"] is False
    assert snap["spool_records"] == len(during)
    assert metric("alignloop_events_kafka_up") == 0
    assert metric("alignloop_events_published_total", topic=topic, outcome="spool") == len(during)

    own_broker.start()  # same port; memory storage: everything before the stop is gone
    after = events_for(keys, per_key=5, start=200)
    after_futures = [pub.publish(topic, e) for e in after]  # races the replay on purpose
    assert {f.result(timeout=30) for f in after_futures} <= {"kafka", "spool"}
    wait_until(
        lambda: pub.state is PublisherState.DIRECT and pub.snapshot()["spool_records"] == 0,
        timeout=30,
        what="replay to finish",
    )
    replayed = metric("alignloop_events_replayed_total", topic=topic) - replayed_before
    assert replayed >= len(during)
    assert metric("alignloop_events_kafka_up") == 1

    published = during + after
    consumed = consume_records(own_broker.bootstrap, topic, expected=len(published), timeout=30)
    assert_exactly_once_in_order(consumed, published)


def test_new_process_replays_a_leftover_spool(
    broker, dead_bootstrap: str, tmp_path: Path, publishers
) -> None:
    topic = unique_topic("pub-restart")
    spool_dir = tmp_path / "spool"
    first = EventPublisher(dead_bootstrap, spool_dir, 1_000_000, **FAST).start()
    events = events_for(["resp-x", "resp-y"], per_key=6)
    futures = [first.publish(topic, e) for e in events]
    assert [f.result(timeout=20) for f in futures] == ["spool"] * len(events)
    first.close(timeout=5)  # the process goes away with a non-empty spool
    assert len(DiskSpool(spool_dir / "main", 2_000_000)) == len(events)

    second = EventPublisher(broker.bootstrap, spool_dir, 1_000_000, **FAST)
    publishers.append(second)
    second.start()
    later = make_event("resp-x", 999)  # must not overtake the replayed ones
    assert second.publish(topic, later).result(timeout=30) in {"kafka", "spool"}
    wait_until(lambda: second.snapshot()["spool_records"] == 0, 30, "leftover replay")
    consumed = consume_records(broker.bootstrap, topic, expected=len(events) + 1, timeout=30)
    assert_exactly_once_in_order(consumed, [*events, later])


def test_spool_full_drops_with_spool_full_and_counts_it(
    dead_bootstrap: str, tmp_path: Path, publishers
) -> None:
    topic = unique_topic("pub-full")
    one = len(make_event("resp-full", 0).to_bytes()) + len(b"resp-full") + len(topic) + 16
    pub = EventPublisher(dead_bootstrap, tmp_path / "spool", one * 3 + 10, **FAST).start()
    publishers.append(pub)
    futures = [pub.publish(topic, make_event("resp-full", i)) for i in range(8)]
    outcomes = []
    for f in futures:
        exc = f.exception(timeout=20)
        outcomes.append(type(exc) if exc else f.result())
    assert outcomes[:3] == ["spool"] * 3
    assert outcomes[3:] == [SpoolFull] * 5
    assert metric("alignloop_events_published_total", topic=topic, outcome="dropped") == 5
    assert pub.snapshot()["spool_records"] == 3


def test_queue_overflow_keeps_publish_order(
    broker, dead_bootstrap: str, tmp_path: Path, publishers, caplog: pytest.LogCaptureFixture
) -> None:
    """A tiny memory queue overflows into the overflow spool; the order survives."""
    caplog.set_level(logging.WARNING, logger="serving.publisher")
    topic = unique_topic("pub-overflow")
    spool_dir = tmp_path / "spool"
    first = EventPublisher(dead_bootstrap, spool_dir, 5_000_000, queue_size=2, **FAST).start()
    events = events_for(["resp-o1", "resp-o2"], per_key=100)
    futures = [first.publish(topic, e) for e in events]
    assert [f.result(timeout=30) for f in futures] == ["spool"] * len(events)
    assert "event queue full" in caplog.text  # the overflow path really ran
    first.close(timeout=5)

    second = EventPublisher(broker.bootstrap, spool_dir, 5_000_000, **FAST)
    publishers.append(second)
    second.start()
    wait_until(lambda: second.snapshot()["spool_records"] == 0, 30, "replay")
    consumed = consume_records(broker.bootstrap, topic, expected=len(events), timeout=30)
    assert_exactly_once_in_order(consumed, events)


def test_publish_after_close_fails_fast(dead_bootstrap: str, tmp_path: Path) -> None:
    pub = EventPublisher(dead_bootstrap, tmp_path / "spool", 1_000_000, **FAST).start()
    pub.close(timeout=5)
    future = pub.publish(unique_topic("closed"), make_event("resp-closed"))
    assert future.done()
    assert future.exception() is not None
