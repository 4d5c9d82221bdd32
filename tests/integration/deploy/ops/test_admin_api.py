"""The admin HTTP API against real Postgres: the auth matrix, every operation (by named
operators), the error mapping, racing promotes over real HTTP, the live counts per version,
and the canary controller serving it on loopback with /metrics on a port of its own."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from deploy.local.broker import free_port
from deploy.ops import policy_cli
from deploy.ops.admin_api import create_app, serve_in_thread
from deploy.ops.admin_auth import AdminTokens, add_token
from deploy.policies import registry
from feedback.db import connect
from feedback.ingest.writer import prepare_session, store_events
from tests.fixtures.postgres import make_feedback, make_interaction

TOKEN = "s3cret-admin-token-of-the-admin-api"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ALICE = "alice-s3cret-token-0123456789abcdef"
REPO = Path(__file__).resolve().parents[4]
OPERATOR = "X-Alignloop-Operator"


def _register(url: str, *versions: str) -> None:
    with connect(url, autocommit=True) as conn:
        for v in versions:
            registry.register_candidate(conn, v, f"/adapters/{v}", actor="trainer")


def _routing(url: str) -> registry.Routing:
    with connect(url, autocommit=True) as conn:
        return registry.routing_table(conn)


@pytest.fixture
def tokens(tmp_path: Path) -> AdminTokens:
    """ALIGNLOOP_ADMIN_TOKEN (the operator `admin`) and alice's named token, in a file."""
    path = tmp_path / "admin_tokens.jsonl"
    add_token(path, "alice", ALICE)
    return AdminTokens(TOKEN, path)


@pytest.fixture
def client(migrated_url: str, tokens: AdminTokens) -> Iterator[TestClient]:
    with TestClient(create_app(migrated_url, tokens), headers=AUTH) as c:
        yield c


# --- auth ------------------------------------------------------------------------------------

READ = ("GET", "/admin/routing", None)
WRITE = ("POST", "/admin/hold", {"reason": "auth matrix"})


@pytest.mark.parametrize("route", [READ, WRITE], ids=["read", "write"])
@pytest.mark.parametrize(
    ("configured", "headers", "status", "code"),
    [
        (None, {}, 503, "admin_disabled"),
        (None, AUTH, 503, "admin_disabled"),
        (TOKEN, {}, 401, "missing_token"),
        (TOKEN, {"Authorization": f"Basic {TOKEN}"}, 401, "missing_token"),
        (TOKEN, {"Authorization": "Bearer not-the-token"}, 403, "invalid_token"),
        (TOKEN, AUTH, 200, None),
    ],
    ids=["disabled", "disabled-with-token", "no-header", "not-bearer", "wrong", "right"],
)
def test_auth_matrix(migrated_url, route, configured, headers, status, code) -> None:
    method, path, body = route
    with TestClient(create_app(migrated_url, configured)) as c:
        r = c.request(method, path, headers=headers, json=body)
        assert r.status_code == status, r.text
        if code is None:
            assert _routing(migrated_url).held == (path == "/admin/hold")
            return
        assert r.json()["error"]["code"] == code
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        if status == 401:
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
        # refused before anything ran, even with a body that would not parse
        assert c.request(method, path, headers=headers, content=b"{nope").status_code == status
        assert c.get("/metrics").status_code == 200  # metrics stay open
    assert not _routing(migrated_url).held


# --- every operation -------------------------------------------------------------------------


def test_every_operation_over_http(client: TestClient, migrated_url: str) -> None:
    _register(migrated_url, "v1", "v2", "v3")
    listed = client.get("/admin/policies").json()
    assert [(v["version"], v["state"]) for v in listed["versions"]] == [
        ("base", "stable"), ("v1", "candidate"), ("v2", "candidate"), ("v3", "candidate"),
    ]  # fmt: skip
    assert listed["routing"]["stable_version"] == "base"
    assert [v["version"] for v in client.get("/admin/policies?state=candidate").json()["versions"]]
    assert client.get("/admin/policies?state=bogus").status_code == 400

    alice = {"Authorization": f"Bearer {ALICE}"}
    r = client.post(
        "/admin/policies/v1/canary", json={"weight": 0.1, "reason": "try"}, headers=alice
    )
    assert r.status_code == 200, r.text
    assert r.json()["policy"]["state"] == "canary"
    assert (r.json()["routing"]["canary_version"], r.json()["routing"]["canary_weight"]) == (
        "v1",
        0.1,
    )
    r = client.post("/admin/policies/v1/canary", json={"weight": 0.5, "reason": "ramp"})
    assert r.status_code == 200 and r.json()["routing"]["canary_weight"] == 0.5

    r = client.post("/admin/rollback", json={"reason": "canary looks off", "expect_canary": "v1"})
    assert r.status_code == 200 and r.json()["routing"]["canary_version"] is None
    generation = r.json()["routing"]["generation"]

    r = client.post(
        "/admin/policies/v2/promote",
        json={"reason": "force", "expect_state": "candidate", "expect_generation": generation},
    )
    assert r.status_code == 200, r.text
    assert r.json()["routing"]["stable_version"] == "v2"
    r = client.post("/admin/rollback", json={"reason": "back", "to": "base"})
    assert r.status_code == 200 and r.json()["routing"]["stable_version"] == "base"

    r = client.post("/admin/policies/v3/reject", json={"reason": "bad eval"})
    assert r.status_code == 200 and r.json()["policy"]["state"] == "rejected"

    r = client.post("/admin/hold", json={"reason": "incident"})
    assert r.json()["changed"] is True and r.json()["routing"]["held_by"] == "admin"
    assert client.post("/admin/hold", json={"reason": "again"}).json()["changed"] is False
    assert client.get("/admin/routing").json()["held"] is True
    r = client.post("/admin/resume", json={"reason": "over"})
    assert r.json()["changed"] is True and r.json()["routing"]["held"] is False

    shown = client.get("/admin/policies/v1").json()
    assert shown["state"] == "rolled_back"
    trail = [(a["actor"], a["action"], a["reason"]) for a in shown["audit"]]
    assert trail == [
        ("trainer", "register", ""),
        ("alice", "start_canary", "try"),
        ("admin", "set_weight", "ramp"),
        ("admin", "rollback", "canary looks off"),
    ]
    assert len(client.get("/admin/policies/v1?audit_limit=1").json()["audit"]) == 1


def test_errors(client: TestClient, migrated_url: str) -> None:
    _register(migrated_url, "v1")

    def error(r: httpx.Response, status: int) -> dict:
        assert r.status_code == status, r.text
        return r.json()["error"]

    e = error(client.post("/admin/policies/nope/promote", json={"reason": "x"}), 404)
    assert e["code"] == "policy_not_found" and "nope" in e["message"]
    assert error(client.get("/admin/policies/nope"), 404)["code"] == "policy_not_found"
    e = error(client.post("/admin/rollback", json={"reason": "x", "to": "nope"}), 404)
    assert e["code"] == "policy_not_found"

    # stable -> rejected is not a transition; nor is rollback to a candidate
    e = error(client.post("/admin/policies/base/reject", json={"reason": "x"}), 409)
    assert e["code"] == "illegal_transition"
    e = error(client.post("/admin/rollback", json={"reason": "x", "to": "v1"}), 409)
    assert e["code"] == "illegal_transition"
    e = error(client.post("/admin/rollback", json={"reason": "nothing before base"}), 409)
    assert e["code"] == "illegal_transition"

    body = {"reason": "x", "expect_state": "canary"}
    e = error(client.post("/admin/policies/v1/promote", json=body), 409)
    assert e["code"] == "concurrent_change"
    stale = {"reason": "x", "expect_generation": _routing(migrated_url).generation - 1}
    e = error(client.post("/admin/policies/v1/promote", json=stale), 409)
    assert e["code"] == "concurrent_change"

    for body, param in [
        (None, None),
        ({}, "reason"),
        ({"reason": ""}, "reason"),
        ({"reason": "x", "weight": 1.5}, "weight"),
        ({"reason": "x", "weight": 0.1, "surprise": 1}, "surprise"),
        ({"reason": "x", "weight": 0.1, "expect_state": "limbo"}, "expect_state"),
    ]:
        e = error(client.post("/admin/policies/v1/canary", json=body), 400)
        assert (e["code"], e["param"]) == ("invalid_value", param), e
    e = error(client.post("/admin/policies/v1/canary", content=b"{nope"), 400)
    assert e["code"] == "invalid_value"
    # The operator is the token's name: a header naming someone else is refused.
    for claimed in ("controller", "alice"):
        r = client.post("/admin/hold", json={"reason": "x"}, headers={OPERATOR: claimed})
        e = error(r, 403)
        assert (e["code"], e["param"]) == ("operator_mismatch", OPERATOR)
    mine = {OPERATOR: "admin"}
    own = client.post("/admin/policies/nope/promote", json={"reason": "x"}, headers=mine)
    assert error(own, 404)["code"] == "policy_not_found"  # its own name: accepted
    assert error(client.get("/admin/nothing-here"), 404)["type"] == "not_found"

    # every refusal left the registry as it was
    with connect(migrated_url, autocommit=True) as conn:
        assert registry.get(conn, "v1").state == "candidate"
        assert registry.routing_table(conn).stable_version == "base"
        assert [a.action for a in registry.audit_log(conn)] == ["seed", "register"]


# --- concurrency over real HTTP --------------------------------------------------------------


def test_two_concurrent_promotes_one_wins(migrated_url: str) -> None:
    _register(migrated_url, "v1", "v2")
    generation = _routing(migrated_url).generation
    server, thread = serve_in_thread(create_app(migrated_url, TOKEN), "127.0.0.1", free_port())
    base = f"http://127.0.0.1:{server.config.port}"
    barrier = threading.Barrier(2)
    results: dict[str, httpx.Response] = {}

    def promote(version: str) -> None:
        with httpx.Client(base_url=base, headers=AUTH, timeout=30) as c:
            body = {"reason": f"{version} is better", "expect_generation": generation}
            barrier.wait()
            results[version] = c.post(f"/admin/policies/{version}/promote", json=body)

    try:
        racers = [threading.Thread(target=promote, args=(v,)) for v in ("v1", "v2")]
        for t in racers:
            t.start()
        for t in racers:
            t.join(30)
    finally:
        server.should_exit = True
        thread.join(10)

    statuses = sorted(r.status_code for r in results.values())
    assert statuses == [200, 409], {v: r.text for v, r in results.items()}
    winner = next(v for v, r in results.items() if r.status_code == 200)
    loser = next(v for v, r in results.items() if r.status_code == 409)
    assert results[loser].json()["error"]["code"] == "concurrent_change"
    with connect(migrated_url, autocommit=True) as conn:
        assert registry.routing_table(conn).stable_version == winner
        assert registry.routing_table(conn).generation == generation + 1
        assert [v.version for v in registry.list_versions(conn, "stable")] == [winner]
        assert registry.get(conn, loser).state == "candidate"
        assert registry.get(conn, "base").state == "retired"
        assert [a.version for a in registry.audit_log(conn) if a.action == "promote"] == [winner]


# --- live counts (policy_stats) -------------------------------------------------------------


def test_live_counts_per_version_over_http(
    migrated_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """What the ingestor counted reaches the API and the CLI, per version: served answers
    (choices, not requests), one current rating per answer (a re-rating moves the count), a
    redelivered batch counted not at all, a rating that came before its answer counted when
    the answer came, and zeros for a version nobody was served."""
    _register(migrated_url, "v1", "v2")
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    two = make_interaction(policy="v1", answers=("one", "two"))
    one, base, late = (make_interaction(policy=p) for p in ("v1", "base", "base"))
    first = [
        two, one, base,
        make_feedback(two.response_id, "up", at=t0),
        make_feedback(two.response_id, "down", choice_index=1, at=t0),
        make_feedback(one.response_id, "up", at=t0),
        make_feedback(base.response_id, "up", at=t0),
        make_feedback(late.response_id, "down", at=t0),
    ]  # fmt: skip
    with connect(migrated_url, autocommit=True) as conn:
        prepare_session(conn)
        store_events(conn, first)
        store_events(conn, first)  # redelivered
        store_events(conn, [late, make_feedback(one.response_id, "down", at=t0 + timedelta(1))])

    def live(served: int, rated: int, ups: int, downs: int) -> dict:
        rate = ups / (ups + downs) if ups + downs else None
        return {"served": served, "rated": rated, "ups": ups, "downs": downs, "up_rate": rate}

    expected = {"base": live(2, 2, 1, 1), "v1": live(3, 3, 1, 2), "v2": live(0, 0, 0, 0)}
    server, thread = serve_in_thread(create_app(migrated_url, TOKEN), "127.0.0.1", free_port())
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{server.config.port}", headers=AUTH, timeout=30
        ) as c:
            listed = c.get("/admin/policies").json()["versions"]
            shown = {v: c.get(f"/admin/policies/{v}").json()["live"] for v in expected}
    finally:
        server.should_exit = True
        thread.join(10)
    assert {v["version"]: v["live"] for v in listed} == expected
    assert shown == expected

    cli = ["--database-url", migrated_url]
    capsys.readouterr()
    assert policy_cli.main(["list", "--json", *cli]) == 0
    rows = json.loads(capsys.readouterr().out)["versions"]
    assert {r["version"]: r["live"] for r in rows} == expected
    assert policy_cli.main(["show", "v1", *cli]) == 0
    assert "live counts: served 3, rated 3, up 1, down 2 (up 33.3%)" in capsys.readouterr().out


# --- served by the canary controller ---------------------------------------------------------


def _listening(port: int) -> set[str]:
    """The IPv4 addresses something listens on at TCP ``port`` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        address, hex_port = fields[1].split(":")
        if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
            found.add(socket.inet_ntoa(struct.pack("<I", int(address, 16))))
    return found


def test_canary_controller_serves_admin_on_loopback_and_metrics_apart(
    migrated_url: str, tmp_path: Path
) -> None:
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "ALIGNLOOP_ADMIN_TOKEN": TOKEN,
        "ALIGNLOOP_CONTROLLER_METRICS_PORT": str(metrics_port),
    }
    env.pop("ALIGNLOOP_ADMIN_HOST", None)  # the default: loopback
    argv = [sys.executable, "-m", "deploy.cli", "canary", "--database-url", migrated_url]
    argv += ["--port", str(port), "--poll-seconds", "60"]
    log_path = tmp_path / "canary.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/admin/routing", headers=AUTH)
                break
            except httpx.TransportError:
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
        assert r.status_code == 200 and r.json()["stable_version"] == "base"
        assert httpx.get(f"http://127.0.0.1:{port}/admin/routing").status_code == 401
        assert httpx.get(f"http://127.0.0.1:{port}/admin/whoami", headers=AUTH).json() == {
            "operator": "admin"
        }
        # The operators' port on loopback only; the metrics port on every interface.
        assert _listening(port) == {"127.0.0.1"}
        assert _listening(metrics_port) == {"0.0.0.0"}
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert metrics.status_code == 200 and "alignloop_canary_stage" in metrics.text
        # Metrics and nothing else there: no admin route answers on it.
        other = httpx.get(f"http://127.0.0.1:{metrics_port}/admin/routing", headers=AUTH)
        assert "stable_version" not in other.text and "alignloop_canary_stage" in other.text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log_path.read_text()
    assert not _listening(metrics_port)
