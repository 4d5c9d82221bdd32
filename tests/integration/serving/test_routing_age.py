"""A replica cut off from Postgres says how old its routing table is: a real routing watcher
on a private Postgres that the test stops and starts again, and serving's own /healthz and
/readyz routes over HTTP. No engine: these routes only ask whether it died, and a live
one's answer is all this test needs (the dead engine's 503 is test_abuse.py's)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from fastapi import FastAPI
from fastapi.testclient import TestClient

from deploy.policies import registry
from feedback.db import connect, migrate
from schemas.settings import Settings
from serving.app import add_health_routes
from serving.policies import PolicyRouter
from serving.publisher import EventPublisher
from serving.routing import RoutingWatcher
from tests.fixtures.polling import wait_until
from tests.fixtures.postgres import PrivatePostgres


def _status(client: TestClient) -> int:
    return client.get("/readyz").status_code


def test_a_replica_cut_off_from_postgres_reports_its_tables_age(
    private_postgres: PrivatePostgres, tmp_path: Path
) -> None:
    url = private_postgres.url
    with connect(url, autocommit=True) as conn:
        migrate(conn)
        registry.register_candidate(conn, "v1", "/adapters/v1", actor="test")
        registry.promote(conn, "v1", actor="test")
    settings = Settings(database_url=url, routing_stale_after_s=1.5)
    router = PolicyRouter(settings.served_model_name, "test-salt")
    watcher = RoutingWatcher(url, router.apply, refresh_s=0.2)
    publisher = EventPublisher("127.0.0.1:1", tmp_path / "spool", 1 << 20)
    app = FastAPI()
    alive = SimpleNamespace(dead=False)  # the one thing the health routes ask the engine
    add_health_routes(app, settings, router, watcher, publisher, tmp_path, alive)
    client = TestClient(app)

    # Before the first read (a replica that never reached Postgres starts, on the base).
    before = client.get("/readyz")
    assert before.status_code == 200
    assert before.json()["routing"] | {"stale_after_s": None} == {
        "generation": 0, "stable": "base", "serving_stable": "base", "canary": None,
        "canary_weight": 0.0, "age_s": None, "stale_after_s": None, "stale": False,
    }  # fmt: skip
    watcher.start(wait_s=10)
    try:
        routing = client.get("/healthz").json()["routing"]
        assert routing["stable"] == "v1" and routing["age_s"] < 1.5 and not routing["stale"]
        assert _status(client) == 200

        private_postgres.stop()
        wait_until(lambda: _status(client) == 503, 15, "/readyz to report the stale table")
        health = client.get("/healthz")
        assert health.status_code == 200  # liveness never fails on it
        routing = health.json()["routing"]
        assert routing["stale"] and routing["age_s"] > 1.5
        assert routing["stable"] == "v1"  # the last table stays in force
        assert client.get("/readyz").json()["status"] == "stale_routing_table"

        private_postgres.start()
        wait_until(lambda: _status(client) == 200, 30, "/readyz once Postgres is back")
        assert client.get("/healthz").json()["routing"]["age_s"] < 1.5
    finally:
        watcher.stop()
