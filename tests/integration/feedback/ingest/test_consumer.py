"""The ingestor end to end: a real Kafka-protocol broker, real Postgres, the ingestor as a
subprocess (so it can be SIGKILLed) or in a thread. Each test uses its own topics and
consumer group on the session broker."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

from deploy.local.broker import free_port
from feedback.ab_counters import policy_counts, recount_policy_counts
from feedback.db import connect
from schemas.events import AnyEvent
from tests.fixtures.broker import unique_topic
from tests.fixtures.ingestor import running_ingestor
from tests.fixtures.polling import wait_until
from tests.fixtures.postgres import make_feedback, make_interaction

REPO = Path(__file__).resolve().parents[4]
T0 = datetime(2025, 1, 1, tzinfo=UTC)


class Topics:
    """Fresh interaction / feedback / policy / dead-letter topic names and consumer group."""

    def __init__(self) -> None:
        self.interactions = unique_topic("ing-interactions")
        self.feedback = unique_topic("ing-feedback")
        self.policy = unique_topic("ing-policy")
        self.dead_letter = unique_topic("ing-dlq")
        self.group = unique_topic("ing-group")

    def args(self) -> list[str]:
        return [
            "--interactions-topic",
            self.interactions,
            "--feedback-topic",
            self.feedback,
            "--policy-topic",
            self.policy,
            "--dead-letter-topic",
            self.dead_letter,
            "--group-id",
            self.group,
        ]


def traffic(n_interactions: int, *, policies: Sequence[str] = ("v1", "v2")) -> list[AnyEvent]:
    """Interactions, each rated once, a third of them re-rated later (the flips exercise
    the counters): about 2.33 events per interaction."""
    events: list[AnyEvent] = []
    for i in range(n_interactions):
        inter = make_interaction(policy=policies[i % len(policies)], prompt=f"q{i % 50}")
        events.append(inter)
        first = "up" if i % 2 else "down"
        events.append(make_feedback(inter.response_id, first, at=T0))
        if i % 3 == 0:
            flipped = "down" if first == "up" else "up"
            events.append(make_feedback(inter.response_id, flipped, at=T0 + timedelta(1)))
    return events


def produce(bootstrap: str, topics: Topics, events: Sequence[AnyEvent]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
    try:
        for e in events:
            topic = topics.interactions if e.event_type == "interaction.logged" else topics.feedback
            producer.send(topic, key=e.key(), value=e.to_bytes())
        producer.flush(timeout=60)
    finally:
        producer.close()


def create_topics(bootstrap: str, names: Sequence[str], partitions: int) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    try:
        admin.create_topics([NewTopic(n, partitions, 1) for n in names])
    finally:
        admin.close()


def stored(url: str) -> tuple[int, int]:
    """(interactions, feedback events) in Postgres; (-1, -1) while unreachable/unmigrated."""
    try:
        with connect(url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM interactions), (SELECT count(*) FROM feedback_events)"
            ).fetchone()
    except psycopg.Error:
        return (-1, -1)
    assert row is not None
    return (int(row[0]), int(row[1]))


class IngestorProcess:
    """`python -m feedback.cli` as a child process, logging to a file."""

    def __init__(self, log_path: Path, bootstrap: str, url: str, topics: Topics, *extra: str):
        self.log_path = log_path
        argv = [sys.executable, "-m", "feedback.cli", "--bootstrap", bootstrap]
        argv += ["--database-url", url, "--metrics-port", "0", *topics.args(), *extra]
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., IngestorProcess]]:
    started: list[IngestorProcess] = []

    def _spawn(bootstrap: str, url: str, topics: Topics, *extra: str) -> IngestorProcess:
        log_path = tmp_path / f"ingestor-{len(started)}.log"
        p = IngestorProcess(log_path, bootstrap, url, topics, *extra)
        started.append(p)
        return p

    yield _spawn
    for p in started:
        p.terminate()


def assert_exactly_once(url: str, events: Sequence[AnyEvent]) -> None:
    """Every event stored once, and counters equal to a recount (no double counting)."""
    interactions = [e for e in events if e.event_type == "interaction.logged"]
    assert stored(url) == (len(interactions), len(events) - len(interactions))
    interaction_ids = {e.response_id for e in interactions}
    current_ratings = {
        (e.response_id, e.choice_index, e.user)
        for e in events
        if e.event_type == "feedback.submitted" and e.response_id in interaction_ids
    }
    with connect(url, autocommit=True) as conn:
        counts = policy_counts(conn)
        assert counts == recount_policy_counts(conn)
        assert sum(c.served for c in counts.values()) == len(interactions)
        assert sum(c.ups + c.downs for c in counts.values()) == len(current_ratings)


def test_10k_events_stored_exactly_once(broker, migrated_url: str, spawn) -> None:
    topics = Topics()
    events = traffic(4300)[:10_000]
    produce(broker.bootstrap, topics, events)
    ingestor = spawn(broker.bootstrap, migrated_url, topics)
    wait_until(lambda: sum(stored(migrated_url)) >= 10_000, 120, "10,000 rows")
    time.sleep(1.0)  # a duplicate would show up now
    assert_exactly_once(migrated_url, events)
    # ingested_at is the batch transaction's start time: from the first batch's start to
    # the last one's, every batch but the last was written.
    with connect(migrated_url, autocommit=True) as conn:
        row = conn.execute(
            "WITH t AS (SELECT ingested_at FROM interactions"
            "           UNION ALL SELECT ingested_at FROM feedback_events)"
            " SELECT extract(epoch FROM max(ingested_at) - min(ingested_at)),"
            "        count(*) FILTER (WHERE ingested_at = (SELECT max(ingested_at) FROM t)),"
            "        count(DISTINCT ingested_at)"
            " FROM t"
        ).fetchone()
    assert row is not None
    span, last_batch, batches = float(row[0]), int(row[1]), int(row[2])
    if batches > 1:  # not an assertion (timings are noisy here): the figure to report
        rate = (len(events) - last_batch) / span
        print(f"\ningest throughput: {rate:,.0f} events/s ({batches} batches, {span:.2f} s)")
    assert ingestor.terminate() == 0  # SIGTERM: graceful exit
    assert "ingestor stopped" in ingestor.log()


def test_sigkill_mid_stream_then_restart_loses_and_duplicates_nothing(
    broker, migrated_url: str, spawn
) -> None:
    topics = Topics()
    events = traffic(2400)
    produce(broker.bootstrap, topics, events)
    first = spawn(broker.bootstrap, migrated_url, topics, "--max-batch", "100")
    wait_until(lambda: sum(stored(migrated_url)) >= 1000, 60, "the first rows")
    first.kill()
    partial = sum(stored(migrated_url))
    assert 0 < partial < len(events), "killed too late to test anything"
    spawn(broker.bootstrap, migrated_url, topics)
    wait_until(lambda: sum(stored(migrated_url)) >= len(events), 90, "all rows after restart")
    time.sleep(1.0)
    assert_exactly_once(migrated_url, events)


def test_two_ingestors_one_killed_every_event_once(broker, migrated_url: str, spawn) -> None:
    topics = Topics()
    create_topics(broker.bootstrap, [topics.interactions, topics.feedback], partitions=3)
    events = traffic(3000)
    produce(broker.bootstrap, topics, events[: len(events) // 2])
    a = spawn(broker.bootstrap, migrated_url, topics, "--max-batch", "50", "--client-id", "a")
    b = spawn(broker.bootstrap, migrated_url, topics, "--max-batch", "50", "--client-id", "b")
    wait_until(lambda: sum(stored(migrated_url)) >= 1000, 60, "the first rows")
    # The group really split the 3 + 3 partitions between them (b may join after a has
    # already read the first half: wait for the rebalance rather than assume it is done).
    wait_until(
        lambda: all("assigned partitions: ing-" in m.log() for m in (a, b)),
        60,
        "both ingestors to be assigned partitions",
    )
    produce(broker.bootstrap, topics, events[len(events) // 2 :])
    a.kill()
    wait_until(lambda: sum(stored(migrated_url)) >= len(events), 120, "b taking over")
    time.sleep(1.0)
    assert_exactly_once(migrated_url, events)
    assert b.proc.poll() is None


def test_postgres_outage_under_load_loses_nothing(broker, private_postgres, spawn) -> None:
    topics = Topics()
    url = private_postgres.url
    events = traffic(1500)
    ingestor = spawn(broker.bootstrap, url, topics, "--max-batch", "200")
    stop_producing = threading.Event()

    def trickle() -> None:  # load keeps arriving during the outage
        for i in range(0, len(events), 100):
            produce(broker.bootstrap, topics, events[i : i + 100])
            if stop_producing.wait(0.3):
                return

    producer = threading.Thread(target=trickle)
    producer.start()
    try:
        wait_until(lambda: sum(stored(url)) > 300, 60, "rows before the outage")
        private_postgres.stop()
        time.sleep(10)
        assert ingestor.proc.poll() is None, "the ingestor died while Postgres was down"
        private_postgres.start()
    finally:
        producer.join()
    wait_until(lambda: sum(stored(url)) >= len(events), 90, "all rows after the outage")
    time.sleep(1.0)
    assert_exactly_once(url, events)
    assert "Postgres unavailable" in ingestor.log()


def _read_dead_letters(bootstrap: str, topic: str, expected: int) -> list:
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    try:
        found: list = []
        deadline = time.monotonic() + 30
        while len(found) < expected and time.monotonic() < deadline:
            partitions = consumer.partitions_for_topic(topic)
            if not partitions:
                time.sleep(0.2)
                continue
            if not consumer.assignment():
                consumer.assign([TopicPartition(topic, p) for p in partitions])
            for records in consumer.poll(timeout_ms=500).values():
                found.extend(records)
        return found
    finally:
        consumer.close()


def test_malformed_events_go_to_dead_letter_and_consumption_continues(
    broker, migrated_url: str
) -> None:
    topics = Topics()
    good_before = make_interaction()
    good_after = make_interaction()
    unknown_version = json.loads(make_feedback(good_before.response_id, "up").to_bytes())
    unknown_version["schema_version"] = 2
    nul_text = make_interaction(prompt="bad\x00prompt")  # valid JSON, refused by Postgres
    bad_values = [
        b"{not json",
        json.dumps(unknown_version).encode(),
        nul_text.to_bytes(),
    ]
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    producer.send(topics.interactions, key=b"k", value=good_before.to_bytes())
    for value in bad_values:
        producer.send(topics.interactions, key=b"k", value=value)
    producer.send(topics.interactions, key=b"k", value=good_after.to_bytes())
    producer.flush()
    producer.close()

    port = free_port()
    with running_ingestor(
        migrated_url,
        broker.bootstrap,
        group_id=topics.group,
        interactions_topic=topics.interactions,
        feedback_topic=topics.feedback,
        policy_topic=topics.policy,
        dead_letter_topic=topics.dead_letter,
        metrics_port=port,
    ):
        wait_until(lambda: stored(migrated_url)[0] >= 2, 60, "the good events")
        dead = _read_dead_letters(broker.bootstrap, topics.dead_letter, len(bad_values))
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    with connect(migrated_url, autocommit=True) as conn:
        ids = {r[0] for r in conn.execute("SELECT response_id FROM interactions")}
    assert ids == {good_before.response_id, good_after.response_id}

    assert sorted(d.value for d in dead) == sorted(bad_values)
    by_value = {d.value: {k: v.decode() for k, v in d.headers} for d in dead}
    assert "json" in by_value[bad_values[0]]["reason"].lower()
    assert "schema_version" in by_value[bad_values[1]]["reason"]
    assert by_value[bad_values[2]]["kind"] == "db_rejected"
    partitions = {h["source_partition"] for h in by_value.values()}
    assert len(partitions) == 1  # one key, one partition: offsets 1..3 after the good one
    for offset, value in enumerate(bad_values, start=1):
        assert by_value[value]["source_topic"] == topics.interactions
        assert by_value[value]["source_offset"] == str(offset)
    assert "alignloop_ingest_dead_letters_total" in metrics
    assert "alignloop_ingest_batch_seconds_bucket" in metrics
    assert "alignloop_ingest_consumer_lag" in metrics
