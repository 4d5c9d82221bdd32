"""Policy routing across two real serving replicas sharing one registry.

Two serving processes (each with its own vLLM engine) watch the same Postgres registry.
Tests drive the registry directly (as the canary controller and operators do) and check
what the replicas serve: sticky canary arms, promotion reaching every replica within a
second, flips under load without failed requests, a broken adapter contained, a tampered
adapter refused by its checksum and rolled back by the controller, an unloadable stable
served by the previous stable, and the routing table's age on /healthz and /readyz.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import threading
import time
from collections import defaultdict

import httpx
import pytest

from deploy.canary.controller import CanaryController
from deploy.canary.stats import CanaryConfig
from deploy.policies import registry
from schemas import topics
from schemas.durable import sha256_file, write_dir_atomically
from schemas.events import AdapterLoadFailed
from tests.fixtures.adapters import corrupt_copy, make_adapter
from tests.fixtures.broker import consume_events, unique_topic
from tests.fixtures.ingestor import running_ingestor
from tests.fixtures.polling import wait_until
from tests.fixtures.replicas import routed_replicas
from tests.fixtures.server import AUTH

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def replicas(demo_model_dir, tmp_path_factory, broker):
    work = tmp_path_factory.mktemp("routing")
    adapters = {
        "v1": make_adapter(demo_model_dir, work / "v1", seed=1),
        "v2": make_adapter(demo_model_dir, work / "v2", seed=2),
    }
    adapters["broken"] = corrupt_copy(adapters["v2"], work / "broken")
    # Written the trainer's way (manifest, checksum), then one weight byte flipped: vLLM
    # would load it happily, only the checksum tells.
    checksum = write_dir_atomically(
        work / "tampered",
        lambda d: [shutil.copy(f, d / f.name) for f in sorted(adapters["v2"].iterdir())],
    )
    weights = work / "tampered" / "adapter_model.safetensors"
    good = sha256_file(weights)
    with open(weights, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0x01]))
    adapters["tampered"] = work / "tampered"
    signed = {"checksum": checksum, "good": good, "bad": sha256_file(weights)}
    with routed_replicas(demo_model_dir, broker.bootstrap, work) as replicas:
        replicas.adapters.update(adapters)
        replicas.signed = signed  # type: ignore[attr-defined]  # the tampered adapter's sums
        yield replicas


def test_canary_arm_is_sticky_per_user_across_replicas(replicas):
    with replicas.db() as conn:
        registry.register_candidate(conn, "v1", str(replicas.adapters["v1"]), actor="test")
        routing = registry.start_canary(conn, "v1", 0.5, actor="test", reason="test split")
    replicas.wait_generation(routing.generation)
    served: dict[str, set[str]] = defaultdict(set)
    for i in range(30):
        user = f"user-{i}"
        for url in replicas.urls:  # the same user on both replicas, twice
            for _ in range(2):
                r = replicas.ask(url, user)
                assert r.status_code == 200, r.text
                assert r.headers["x-alignloop-policy"] == r.json()["policy_version"]
                served[user].add(r.json()["policy_version"])
    assert all(len(v) == 1 for v in served.values()), served
    arms = [next(iter(v)) for v in served.values()]
    assert 3 <= arms.count("v1") <= 27, arms  # both arms populated (binomial(30, 0.5))
    assert set(arms) == {"base", "v1"}

    # Raising the weight only moves users from stable to canary, never back.
    with replicas.db() as conn:
        routing = registry.set_canary_weight(conn, "v1", 0.9, actor="test", reason="ramp")
    replicas.wait_generation(routing.generation)
    for user, versions in served.items():
        now = replicas.ask(replicas.urls[0], user).json()["policy_version"]
        if versions == {"v1"}:
            assert now == "v1", user


def test_explicit_version_is_pinned(replicas):
    r = replicas.ask(replicas.urls[1], "anyone", model="base")
    assert r.json()["policy_version"] == "base"
    r = replicas.ask(replicas.urls[1], "anyone", model="v1")
    assert r.json()["policy_version"] == "v1"
    models = httpx.get(f"{replicas.urls[0]}/v1/models", headers=AUTH).json()["data"]
    assert {"alignloop", "base", "v1"} <= {m["id"] for m in models}


def test_promote_reaches_every_replica_within_a_second(replicas):
    with replicas.db() as conn:
        routing = registry.promote(conn, "v1", actor="test", reason="promote under test")
    switch = replicas.wait_generation(routing.generation, timeout=10)
    assert switch < 1.0, f"replicas switched after {switch:.2f} s"
    for url in replicas.urls:
        for i in range(5):
            assert replicas.ask(url, f"after-{i}").json()["policy_version"] == "v1"


def test_twenty_flips_under_load_fail_no_request(replicas):
    stop = threading.Event()
    outcomes: dict[str, int] = defaultdict(int)

    def load(n: int) -> None:
        i = 0
        while not stop.is_set():
            r = replicas.ask(replicas.urls[i % 2], f"load-{n}-{i}")
            outcomes[str(r.status_code)] += 1
            if r.status_code == 200:
                outcomes[r.json()["policy_version"]] += 1
            i += 1

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(load, n) for n in range(4)]
        with replicas.db() as conn:
            for _ in range(10):
                registry.rollback(conn, actor="test", reason="flip")  # v1 -> base
                time.sleep(0.2)
                registry.promote(conn, "v1", actor="test", reason="flop")  # base -> v1
                time.sleep(0.2)
        stop.set()
        for f in futures:
            f.result()
    assert set(k for k in outcomes if k.isdigit()) == {"200"}, dict(outcomes)
    assert outcomes["base"] > 0 and outcomes["v1"] > 0, dict(outcomes)


def test_broken_adapter_is_contained(replicas):
    with replicas.db() as conn:
        registry.register_candidate(conn, "broken", str(replicas.adapters["broken"]), actor="test")
        routing = registry.start_canary(conn, "broken", 0.9, actor="test", reason="bad one")
    replicas.wait_generation(routing.generation)
    # Routed users in the canary arm are served by stable instead; nobody sees an error.
    versions = {
        replicas.ask(replicas.urls[0], f"victim-{i}").json()["policy_version"] for i in range(10)
    }
    assert versions == {"v1"}
    # Naming the broken version explicitly is a clear 503, and the engine still serves.
    pinned = replicas.ask(replicas.urls[0], "x", model="broken")
    assert pinned.status_code == 503
    assert pinned.json()["error"]["code"] == "policy_unavailable"
    assert replicas.ask(replicas.urls[0], "y").status_code == 200
    events = consume_events(replicas.bootstrap, topics.POLICY, expected=1, timeout=30)
    failures = [e for e in events if isinstance(e, AdapterLoadFailed)]
    assert any(e.version == "broken" for e in failures), events


def _load_failures(replicas, version: str) -> list[str]:
    with replicas.db() as conn:
        rows = conn.execute(
            "SELECT error FROM adapter_load_failures WHERE version = %s", (version,)
        ).fetchall()
    return [r[0] for r in rows]


def test_a_tampered_adapter_is_refused_reported_and_rolled_back(replicas):
    signed = replicas.signed
    with replicas.db() as conn:
        if registry.routing_table(conn).canary_version is not None:
            registry.rollback(conn, actor="test", reason="end the broken canary")
        registry.register_candidate(
            conn, "tampered", str(replicas.adapters["tampered"]), actor="trainer",
            checksum=signed["checksum"],
        )  # fmt: skip
        routing = registry.start_canary(conn, "tampered", 0.5, actor="controller")
    replicas.wait_generation(routing.generation)
    served = {replicas.ask(replicas.urls[0], f"t-{i}") for i in range(10)}
    assert {(r.status_code, r.json()["policy_version"]) for r in served} == {(200, "v1")}
    pinned = replicas.ask(replicas.urls[0], "x", model="tampered")
    assert pinned.status_code == 503 and "tampered failed to load" in pinned.text

    # The report reaches Postgres through Kafka and the ingestor; the controller's
    # guardrail on adapter load failures rolls the canary back.
    with running_ingestor(
        replicas.db_url,
        replicas.bootstrap,
        interactions_topic=unique_topic("tampered-interactions"),
        feedback_topic=unique_topic("tampered-feedback"),
        policy_topic=topics.POLICY,
        dead_letter_topic=unique_topic("tampered-dlq"),
    ):
        wait_until(lambda: _load_failures(replicas, "tampered"), 60, "the failure report")
    (error, *_) = _load_failures(replicas, "tampered")
    assert "refused the adapter of policy version tampered" in error
    assert f"(manifest {signed['good']}, file {signed['bad']})" in error
    with replicas.db() as conn:
        decision = CanaryController(CanaryConfig.demo(), settle_seconds=0).tick(conn)
        assert decision is not None and decision.action == "rollback", decision
        assert any("adapter load failures" in b for b in decision.statistics["guardrail_breaches"])
        assert registry.get(conn, "tampered").state == "rolled_back"


def test_an_unloadable_stable_is_served_by_the_previous_stable(replicas):
    with replicas.db() as conn:  # v1 retires; the tampered version becomes the stable
        routing = registry.promote(conn, "tampered", actor="test", reason="force it")
    replicas.wait_generation(routing.generation)
    for url in replicas.urls:  # replica 1 never tried it: it checks it now
        answers = [replicas.ask(url, f"s-{i}") for i in range(5)]
        assert {(r.status_code, r.json()["policy_version"]) for r in answers} == {(200, "v1")}
        routing_state = httpx.get(f"{url}/healthz").json()["routing"]
        assert (routing_state["stable"], routing_state["serving_stable"]) == ("tampered", "v1")
        metrics = httpx.get(f"{url}/metrics").text
        assert 'alignloop_routed_requests_total{arm="previous_stable"}' in metrics
    with replicas.db() as conn:
        routing = registry.rollback(conn, actor="test", reason="back to v1")
    replicas.wait_generation(routing.generation)
    assert httpx.get(f"{replicas.urls[0]}/healthz").json()["routing"]["serving_stable"] == "v1"


def test_replicas_report_their_routing_tables_age(replicas):
    for url in replicas.urls:
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 200, ready.text
        routing_state = ready.json()["routing"]
        # read at start and on every change; re-read every 30 s here (routed_replicas)
        assert 0 <= routing_state["age_s"] < 35 and not routing_state["stale"]
        assert routing_state["stale_after_s"] == 60
