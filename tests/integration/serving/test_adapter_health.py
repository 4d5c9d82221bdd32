"""Adapter health end to end: serving's ``AdapterLoadFailed`` event on the policy topic →
the ingestor (real broker, real Postgres) → ``adapter_load_failures`` once → the canary
controller's observations → guardrail rollback."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from kafka import KafkaProducer

from deploy.canary import data as canary_data
from deploy.canary.controller import CanaryController
from deploy.canary.decision import decide
from deploy.canary.stats import CanaryConfig
from deploy.policies import registry
from feedback.db import connect
from schemas.events import AdapterLoadFailed
from tests.fixtures.broker import unique_topic
from tests.fixtures.ingestor import running_ingestor
from tests.fixtures.polling import wait_until


def _stored(url: str) -> list[tuple]:
    with connect(url, autocommit=True) as conn:
        return conn.execute(
            "SELECT event_id, version, error FROM adapter_load_failures ORDER BY seq"
        ).fetchall()


def _failure(version: str, **kwargs: Any) -> AdapterLoadFailed:
    return AdapterLoadFailed(
        producer="serving@test",
        version=version,
        adapter_uri=f"/adapters/{version}",
        error="safetensors: header too large",
        **kwargs,
    )


def test_adapter_load_failure_is_stored_once_and_rolls_the_canary_back(
    broker, migrated_url: str
) -> None:
    with connect(migrated_url, autocommit=True) as conn:
        registry.register_candidate(conn, "v1", "/adapters/v1", actor="trainer")
        routing = registry.start_canary(conn, "v1", 0.05, actor="test")
    assert routing.canary_started_at is not None

    failure = _failure("v1")
    before_start = _failure("v1", occurred_at=routing.canary_started_at - timedelta(hours=1))
    other_version = _failure("v2")
    policy_topic = unique_topic("ing-policy")
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    try:
        for event in (failure, failure, before_start, other_version):  # one redelivery
            producer.send(policy_topic, key=event.key(), value=event.to_bytes())
        producer.flush(timeout=30)
    finally:
        producer.close()

    with running_ingestor(
        migrated_url,
        broker.bootstrap,
        interactions_topic=unique_topic("ing-interactions"),
        feedback_topic=unique_topic("ing-feedback"),
        policy_topic=policy_topic,
        dead_letter_topic=unique_topic("ing-dlq"),
    ):
        wait_until(lambda: len(_stored(migrated_url)) >= 3, 60, "the failure events")
        time.sleep(1.0)  # a duplicate would show up now
    rows = _stored(migrated_url)
    assert sorted(str(r[0]) for r in rows) == sorted(
        str(e.event_id) for e in (failure, before_start, other_version)
    )

    config = CanaryConfig.demo()
    with connect(migrated_url, autocommit=True) as conn:
        routing = registry.routing_table(conn)
        now = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]  # always one row
        strata = registry.canary_strata(conn, "v1", routing.canary_started_at)
        obs = canary_data.load_observations(conn, "v1", "base", strata, now, settle_seconds=0)
        assert obs.health.adapter_load_failures == 1  # not the earlier run's, not v2's

        decision = decide(config, obs, 0, routing.canary_started_at, now)
        assert decision.action == "rollback"
        assert decision.statistics["guardrail_breaches"] == ["adapter load failures 1"]

        decision = CanaryController(config, settle_seconds=0).tick(conn)
        assert decision is not None and decision.action == "rollback"
        assert registry.get(conn, "v1").state == "rolled_back"
        assert registry.routing_table(conn).canary_version is None


def test_no_failures_means_a_measured_zero(migrated_url: str) -> None:
    with connect(migrated_url, autocommit=True) as conn:
        registry.register_candidate(conn, "v1", "/adapters/v1", actor="trainer")
        routing = registry.start_canary(conn, "v1", 0.05, actor="test")
        assert routing.canary_started_at is not None
        strata = registry.canary_strata(conn, "v1", routing.canary_started_at)
        obs = canary_data.load_observations(
            conn, "v1", "base", strata, routing.canary_started_at, settle_seconds=0
        )
    assert obs.health.adapter_load_failures == 0


def test_request_failures_feed_the_5xx_guardrail(conn) -> None:
    from feedback.ingest.writer import write_batch
    from schemas.events import RequestFailed
    from tests.fixtures.postgres import make_interaction

    registry.register_candidate(conn, "v1", "/adapters/v1", actor="trainer")
    routing = registry.start_canary(conn, "v1", 0.5, actor="test")
    served = [make_interaction(policy=p) for p in ("v1", "base") for _ in range(60)]
    failed = [
        RequestFailed(
            producer="serving@test", version="v1", status=500, error="EngineDeadError",
            model="alignloop", arm="canary", principal=f"key-{i % 2}",
        )
        for i in range(10)
    ]  # fmt: skip
    with conn.transaction():
        result = write_batch(conn, [*served, *failed, failed[0]])  # one redelivered
    assert result.request_failures == 10

    now = conn.execute("SELECT now()").fetchone()[0]
    strata = registry.canary_strata(conn, "v1", routing.canary_started_at)
    obs = canary_data.load_observations(conn, "v1", "base", strata, now, settle_seconds=0)
    assert obs.health.errors_5xx == (0, 10)
    assert obs.health.failing_principals == (0, 2)
    assert obs.health.requests == (60, 70)
    decision = decide(CanaryConfig.demo(), obs, 0, routing.canary_started_at, now)
    assert decision.action == "rollback"
    assert any("5xx rate" in b for b in decision.statistics["guardrail_breaches"])
    # The production floor is 3 principals: two keys' failures alone do not roll back.
    assert CanaryConfig().guardrail_min_failing_principals == 3
    held = decide(CanaryConfig(guardrail_min_requests=50), obs, 0, routing.canary_started_at, now)
    assert not any("5xx" in b for b in held.statistics["guardrail_breaches"])
