"""Feedback durability over real HTTP: a 202 is a promise that the rating is stored once.

Each test takes the broker away, rates answers the serving process actually served, brings
the broker back, and checks Postgres (through the real ingestor) against what the API
answered: every 202'd rating stored exactly once, nothing the API refused stored, and a
refused rating retried with the same idempotency key stored once. The attacks:

* a broker outage (202 ``delivered_to: "spool"``, replayed when the broker returns);
* a full spool (503 in OpenAI's error shape; the same key is accepted once there is room);
* SIGKILL of the whole serving process group while it spools, and a new process on the
  same port and state directory, hence the same spool, with the broker back.

The module has one serving process of its own (a small spool bound; its own broker, so
stopping it disturbs no other test); the SIGKILL test replaces it with a second one. Tansu
keeps messages in memory only: a broker restart forgets what it held, so each test starts
a fresh ingestor (a fresh consumer group) once the spool is replayed, and it reads the
replayed ratings from the start of the new broker's log.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from deploy.local.broker import EmbeddedBroker
from schemas import topics
from tests.fixtures.broker import unique_topic
from tests.fixtures.ingestor import running_ingestor
from tests.fixtures.polling import wait_until
from tests.fixtures.server import AUTH, free_port, start_serving, wait_healthy

pytestmark = pytest.mark.slow

# A FeedbackSubmitted event takes about 520 bytes in the spool: this bound fills after
# about 30 ratings, while the outage tests' ratings fit easily.
SPOOL_MAX_BYTES = 16 * 1024
EVENT_BYTES_MAX = 1024  # more than any rating here takes in the spool


class Replica:
    """This module's serving process (in a process group of its own): ``kill()`` is a
    crash of the whole replica, engine workers included; ``start()`` again uses the same
    port and state directory, hence the same spool directory."""

    def __init__(self, model_dir: Path, broker: EmbeddedBroker, state_dir: Path) -> None:
        self.model_dir, self.broker, self.state_dir = model_dir, broker, state_dir
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Start the process; its publisher replays a leftover spool while the engine
        loads, before the replica serves (see ``wait_ready``)."""
        self.proc, self.log_path = start_serving(
            self.model_dir,
            self.broker.bootstrap,
            self.state_dir,
            self.port,
            extra_env={"ALIGNLOOP_SPOOL_MAX_BYTES": str(SPOOL_MAX_BYTES)},
            new_session=True,
        )

    def wait_ready(self) -> None:
        assert self.proc is not None
        if not wait_healthy(self.base_url, self.proc, timeout=300):
            pytest.fail(f"serving did not become healthy:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL to the process group: no shutdown hook runs, nothing is flushed."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        """At the end of the module: nothing left to keep, so no graceful shutdown (it
        costs seconds of engine teardown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.kill()

    def log_tail(self, n: int = 40) -> str:
        if self.log_path is None:
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def events(self) -> dict[str, Any]:
        """The publisher's state from /healthz."""
        return httpx.get(f"{self.base_url}/healthz", timeout=10).json()["events"]

    def wait_drained(self, timeout: float = 60) -> None:
        """Until the publisher produces directly to Kafka with an empty spool: every
        spooled rating has been replayed and acknowledged."""
        wait_until(
            lambda: (e := self.events())["state"] == "direct" and e["spool_records"] == 0,
            timeout,
            "the spool to be replayed",
        )

    def rate(
        self, response_id: str, user: str, rating: str = "up", key: str | None = None
    ) -> httpx.Response:
        body: dict[str, Any] = {"response_id": response_id, "rating": rating, "user": user}
        if key is not None:
            body["idempotency_key"] = key
        return httpx.post(f"{self.base_url}/v1/feedback", json=body, headers=AUTH, timeout=60)


@pytest.fixture(scope="module")
def module_replica(
    demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replica]:
    work = tmp_path_factory.mktemp("durability")
    with EmbeddedBroker(log_path=work / "tansu.log") as broker:
        replica = Replica(demo_model_dir, broker, work / "state")
        try:
            replica.start()
            yield replica
        finally:
            replica.stop()


@pytest.fixture
def replica(module_replica: Replica) -> Replica:
    """The module's replica with its broker up and nothing left in its spool."""
    if not module_replica.broker.running:
        module_replica.broker.start()  # a failed test left it stopped
    module_replica.wait_drained()
    return module_replica


@contextmanager
def broker_down(broker: EmbeddedBroker) -> Iterator[None]:
    broker.stop()
    try:
        yield
    finally:
        broker.start()


def interactions_in_kafka(replica: Replica) -> float:
    """How many interaction events this process has had acknowledged by Kafka."""
    text = httpx.get(f"{replica.base_url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == "alignloop_events_published_total"
                and labels["topic"] == topics.INTERACTIONS
                and labels["outcome"] == "kafka"
            ):
                return sample.value
    return 0.0


def served_ids(replica: Replica, user: str, n: int) -> list[str]:
    """Ids of ``n`` answers served to ``user`` (the `ops` key) through the chat API, once
    their interaction events are in Kafka (so an outage that follows spools feedback
    only, and the spool's contents are what the test sent)."""
    before = interactions_in_kafka(replica)
    client = OpenAI(base_url=f"{replica.base_url}/v1", api_key=AUTH["Authorization"][7:])

    def ask(i: int) -> str:
        r = client.chat.completions.create(
            model="alignloop",
            messages=[{"role": "user", "content": f"Name a colour ({i})."}],
            max_tokens=1,
            user=user,
        )
        return r.id

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        ids = list(pool.map(ask, range(n)))
    wait_until(
        lambda: interactions_in_kafka(replica) >= before + n,
        30,
        "the interaction events to reach Kafka",
    )
    return ids


def accepted(r: httpx.Response, delivered_to: str) -> uuid.UUID:
    """The id of a 202 that says where the rating is kept."""
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["object"] == "feedback" and body["status"] == "accepted", body
    assert body["delivered_to"] == delivered_to, body
    return uuid.UUID(body["id"])


def stored(db_url: str, user: str) -> dict[uuid.UUID, str]:
    """event id -> rating of every rating stored for ``user`` (``event_id`` is unique)."""
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT event_id, rating FROM feedback_events WHERE user_id = %s", (user,)
        ).fetchall()
    return dict(rows)


def committed_to_end(bootstrap: str, group_id: str, topic: str) -> bool:
    """Whether ``group_id`` committed every partition of ``topic`` up to its end: the
    ingestor has stored (or deduplicated) every record the topic holds."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group_id,
        enable_auto_commit=False,
        request_timeout_ms=5000,
        client_id="alignloop-test-lag",
    )
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in partitions]
        ends = consumer.end_offsets(tps)
        committed = {tp: consumer.committed(tp, timeout_ms=5000) or 0 for tp in tps}
        return bool(tps) and all(committed[tp] >= ends[tp] for tp in tps)
    except KafkaError:  # e.g. the group's coordinator not known yet: ask again
        return False
    finally:
        consumer.close()


StoredOnce = Callable[[str, dict[uuid.UUID, str]], None]


@contextmanager
def ingesting(replica: Replica, db_url: str) -> Iterator[StoredOnce]:
    """The real ingestor (a fresh consumer group, so it reads the restarted broker's log
    from the start), and ``stored_once(user, expected)``: waits until the ingestor has
    consumed the whole feedback topic, then asserts the ratings stored for ``user`` are
    exactly ``expected`` (event id -> rating): none lost, none extra. Call it once the
    spool was replayed, so the topic holds everything."""
    group_id = unique_topic("durability-ingest")
    bootstrap = replica.broker.bootstrap

    def stored_once(user: str, expected: dict[uuid.UUID, str]) -> None:
        wait_until(
            lambda: len(stored(db_url, user)) >= len(expected),
            60,
            f"{len(expected)} ratings of {user} in Postgres",
        )
        wait_until(
            lambda: committed_to_end(bootstrap, group_id, topics.FEEDBACK),
            60,
            "the ingestor to commit the whole feedback topic",
        )
        assert stored(db_url, user) == expected

    with running_ingestor(db_url, bootstrap, group_id=group_id):
        yield stored_once


def test_ratings_during_an_outage_are_spooled_then_stored_once(replica, migrated_url):
    user = f"outage-{uuid.uuid4().hex[:8]}"
    answers = served_ids(replica, user, 4)
    # With a key in the body, in the header, or none (each request a new rating).
    requests = [(answers[i % 4], "up" if i % 2 else "down", i % 3) for i in range(9)]

    def send(i: int) -> httpx.Response:
        response_id, rating, how = requests[i]
        if how == 0:
            return replica.rate(response_id, user, rating, key=f"{user}-{i}")
        if how == 1:
            return httpx.post(
                f"{replica.base_url}/v1/feedback",
                json={"response_id": response_id, "rating": rating, "user": user},
                headers={**AUTH, "Idempotency-Key": f"{user}-{i}"},
                timeout=60,
            )
        return replica.rate(response_id, user, rating)

    with broker_down(replica.broker):
        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            responses = list(pool.map(send, range(len(requests))))
        ids = [accepted(r, "spool") for r in responses]
        assert replica.events()["spool_records"] >= len(requests)

    replica.wait_drained()
    # A client that missed its 202 retries after the outage: the same rating, not a new one.
    assert accepted(send(0), "kafka") == ids[0]
    with ingesting(replica, migrated_url) as stored_once:
        stored_once(user, {id_: rating for id_, (_, rating, _) in zip(ids, requests, strict=True)})


def test_a_full_spool_is_503_and_the_same_key_is_stored_once_later(replica, migrated_url):
    user = f"full-{uuid.uuid4().hex[:8]}"
    answers = served_ids(replica, user, 4)
    kept: dict[str, uuid.UUID] = {}  # idempotency key -> id of its 202
    with broker_down(replica.broker):
        refused = None
        for i in range(2 * SPOOL_MAX_BYTES // 400):
            key = f"{user}-{i}"
            r = replica.rate(answers[i % 4], user, key=key)
            if r.status_code != 202:
                refused = (answers[i % 4], key, r)
                break
            kept[key] = accepted(r, "spool")
        assert refused is not None, "the spool never filled"
        response_id, refused_key, r = refused
        assert r.status_code == 503, r.text
        assert r.headers["content-type"] == "application/json"
        assert int(r.headers["retry-after"]) >= 1
        error = r.json()["error"]
        assert set(r.json()) == {"error"}
        assert error["type"] == "server_error" and error["code"] == "service_unavailable"
        assert error["param"] is None and "same idempotency key" in error["message"]
        # Refused because the spool is at its bound, not for any other reason.
        events = replica.events()
        assert SPOOL_MAX_BYTES - EVENT_BYTES_MAX < events["spool_bytes"] <= SPOOL_MAX_BYTES
        assert events["spool_records"] == len(kept)
        # Still full: the retry is refused again, and nothing was kept for it.
        assert replica.rate(response_id, user, key=refused_key).status_code == 503
        assert replica.events()["spool_records"] == len(kept)

    replica.wait_drained()
    retried = accepted(replica.rate(response_id, user, key=refused_key), "kafka")
    assert retried not in kept.values()
    first_key = next(iter(kept))
    assert accepted(replica.rate(answers[0], user, key=first_key), "kafka") == kept[first_key]
    with ingesting(replica, migrated_url) as stored_once:
        stored_once(user, {id_: "up" for id_ in [*kept.values(), retried]})


def test_a_sigkilled_replica_loses_no_acknowledged_rating(replica, migrated_url):
    """Ratings 202'd into the spool survive SIGKILL of the whole serving process group:
    a new process on the same spool replays them once the broker is back. Ratings sent
    around the kill that got no answer are retried with their keys, as a client would,
    and are stored once too."""
    user = f"kill-{uuid.uuid4().hex[:8]}"
    answers = served_ids(replica, user, 4)
    expected: dict[uuid.UUID, str] = {}
    unanswered: list[str] = []  # keys sent around the kill without a 202

    def stream(answered: threading.Semaphore) -> None:
        """Keyed ratings one after another until the replica is gone."""
        for i in range(12):
            key = f"{user}-stream-{i}"
            try:
                r = replica.rate(answers[i % 4], user, "down", key=key)
            except httpx.TransportError:
                unanswered.extend(f"{user}-stream-{j}" for j in range(i, 12))
                return
            if r.status_code == 202:
                expected[accepted(r, "spool")] = "down"
                answered.release()
            else:  # a 5xx from a dying process: the client retries later
                unanswered.append(key)

    with broker_down(replica.broker):
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda i: replica.rate(answers[i % 4], user), range(8)))
        expected.update((accepted(r, "spool"), "up") for r in responses)
        answered = threading.Semaphore(0)
        sender = threading.Thread(target=stream, args=(answered,))
        sender.start()
        for _ in range(3):  # SIGKILL with ratings going on
            assert answered.acquire(timeout=60), replica.log_tail()
        replica.kill()
        sender.join(60)
        assert not sender.is_alive()

    replica.launch()  # the same port and state directory: the same spool
    # The ingestor's group join overlaps the new engine's start.
    with ingesting(replica, migrated_url) as stored_once:
        replica.wait_ready()
        replica.wait_drained()
        for key in unanswered:
            i = int(key.rsplit("-", 1)[1])
            r = replica.rate(answers[i % 4], user, "down", key=key)
            expected[accepted(r, "kafka")] = "down"
        assert len(expected) == 8 + 12
        stored_once(user, expected)
