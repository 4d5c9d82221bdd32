"""The console's JSON routes over real Postgres rows written by the real writers
(:mod:`tests.fixtures.console`): what each page would draw, the guard, the round request
and the page's files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from deploy.console.app import create_app
from deploy.local.broker import free_port
from deploy.ops.admin_api import serve_in_thread
from deploy.ops.admin_auth import AdminTokens, add_token
from feedback.db import connect
from tests.fixtures.console import CONFIG, Seeded, seed
from trainer.rounds.cli import _next_round
from trainer.rounds.trigger import TriggerConfig

TOKEN = "console-test-token-0123456789abcdef"
ALICE = "alice-console-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {ALICE}"}  # the operator alice: her token's name


@pytest.fixture
def seeded(migrated_url: str) -> Seeded:
    return seed(migrated_url)


@pytest.fixture
def tokens(tmp_path: Path) -> AdminTokens:
    add_token(tmp_path / "admin_tokens.jsonl", "alice", ALICE)
    return AdminTokens(TOKEN, tmp_path / "admin_tokens.jsonl")


@pytest.fixture
def client(migrated_url: str, tokens: AdminTokens) -> Iterator[TestClient]:
    with TestClient(create_app(migrated_url, tokens), headers=AUTH) as c:
        yield c


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"Authorization": "Bearer wrong"}, 403)],
    ids=["no-token", "wrong-token"],
)
def test_every_console_route_is_behind_the_admin_token(
    migrated_url: str, headers: dict, status: int
) -> None:
    with TestClient(create_app(migrated_url, TOKEN)) as c:
        for path in ("policies", "canary", "training", "traffic", "live", "audit"):
            r = c.get(f"/admin/console/{path}", headers=headers)
            assert r.status_code == status, path
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = c.post("/admin/console/rounds", json={"reason": "x"}, headers=headers)
        assert r.status_code == status


def test_empty_database_gives_empty_pages(client: TestClient) -> None:
    assert client.get("/admin/console/canary").json() == {"experiment": None}
    training = client.get("/admin/console/training").json()
    assert (training["rounds"], training["round"], training["request"]) == ([], None, None)
    traffic = client.get("/admin/console/traffic").json()
    assert traffic["answers"] == traffic["ratings"] == []
    [base] = client.get("/admin/console/policies").json()["versions"]
    assert (base["version"], base["routed_share"], base["up_rate_interval"]) == ("base", 1.0, None)


def test_canary_page_replays_the_controllers_decisions(client: TestClient, seeded: Seeded):
    data = client.get("/admin/console/canary").json()
    assert data["experiment"]["version"] == seeded.canary
    assert data["experiment"]["running"] is False
    assert data["ticks"] == len(data["points"]) == seeded.ticks
    actions = [p["action"] for p in data["points"]]
    assert actions == ["continue"] * (seeded.ticks - 2) + ["advance_stage", "promote"]
    assert data["threshold"] == CONFIG.threshold
    # The band narrows as the votes come in, and ends above the threshold (promoted).
    widths = [p["upper"] - p["lower"] for p in data["points"]]
    assert widths[-1] < widths[0]
    assert data["points"][-1]["lower"] > CONFIG.threshold
    assert data["outcome"]["action"] == "promote" and data["outcome"]["to_state"] == "stable"
    # Stage 0: 3x5 + 40 canary votes, 3x40 + 300 stable; stage 1: the rest.
    assert [s["votes"] for s in data["stages"]] == [
        {"stable": 420, "canary": 55},
        {"stable": 400, "canary": 420},
    ]
    assert [s["weight"] for s in data["stages"]] == list(CONFIG.stages)
    assert data["srm"]["p_value"] > data["srm"]["threshold"] == CONFIG.srm_p_value
    health = data["guardrails"]["health"]
    assert health["errors_5xx"] == {"stable": 0, "canary": 0}
    assert health["requests"]["canary"] == 475
    assert data["decisions"][0]["action"] == "promote"  # newest first


def test_policies_page(client: TestClient, seeded: Seeded) -> None:
    data = client.get("/admin/console/policies").json()
    rows = {v["version"]: v for v in data["versions"]}
    assert [v["version"] for v in data["versions"]] == [seeded.waiting, seeded.canary, "base"]
    v1 = rows[seeded.canary]
    assert (v1["state"], v1["routed_share"], v1["promoted_at"] is not None) == ("stable", 1.0, True)
    assert v1["live"]["served"] == 475 and v1["live"]["rated"] == 475
    lo, hi = v1["up_rate_interval"]
    assert lo < v1["live"]["up_rate"] < hi
    assert rows["base"]["state"] == "retired" and rows["base"]["routed_share"] == 0.0
    # Every answer of the seed was served within the last 15 minutes.
    assert rows["base"]["served_share"] + v1["served_share"] == pytest.approx(1.0)
    assert rows[seeded.waiting]["offline"]["win_rate"] == 0.72
    assert data["audit"][0]["action"] == "register"  # newest first: ppo-0001 registered last


def test_training_page(client: TestClient, seeded: Seeded) -> None:
    data = client.get("/admin/console/training").json()
    assert data["round"]["id"] == seeded.round_id
    assert data["round"]["iterations_planned"] == seeded.iterations
    assert data["curves"]["iteration"] == list(range(seeded.iterations))
    assert data["curves"]["kl_ref"][-1] == pytest.approx(0.02 * (seeded.iterations - 1))
    assert data["round"]["evaluation"]["examples"][0]["candidate"].startswith("Put the egg")
    assert data["reward_vs_kl"] == [
        {"round": seeded.round_id, "status": "registered", "reward_gain": 0.41, "kl": 0.11}
    ]
    assert data["reward_models"][0]["metrics"]["pairwise_accuracy"] == 0.81
    missing = client.get("/admin/console/training?round=999")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "round_not_found"


def test_traffic_page(client: TestClient, seeded: Seeded) -> None:
    data = client.get("/admin/console/traffic?minutes=30").json()
    assert sum(r["answers"] for r in data["answers"]) == seeded.answers
    assert sum(r["ratings"] for r in data["ratings"]) == seeded.ratings
    assert {r["policy"] for r in data["answers"]} == {"base", "v1"}
    for row in data["answers"]:
        lat = row["latency_ms"]
        assert lat["p50"] <= lat["p95"] <= lat["p99"]
        assert row["ingest_lag_s"] >= 0
    bad = client.get("/admin/console/traffic?minutes=0")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "minutes"


def test_round_request_reaches_the_training_loop(client: TestClient, migrated_url: str):
    """The button asks once (a second click while one waits: 409), the loop takes the
    request before its trigger, and a taken request is not taken again."""
    r = client.post("/admin/console/rounds", json={"reason": "new prompts"})
    assert r.status_code == 202 and r.json()["request"]["requested_by"] == "alice"
    again = client.post("/admin/console/rounds", json={"reason": "again"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "request_open"
    assert client.post("/admin/console/rounds", json={"reason": ""}).status_code == 400
    shown = client.get("/admin/console/training").json()["request"]
    assert (shown["requested_by"], shown["taken_at"]) == ("alice", None)

    never = TriggerConfig(min_new_ratings=10**9)  # the trigger alone would never start one
    with connect(migrated_url, autocommit=True) as conn:
        reason, request = _next_round(conn, never)
        assert reason == "requested by alice: new prompts" and request is not None
        assert _next_round(conn, never) == (None, None)
    shown = client.get("/admin/console/training").json()["request"]
    assert shown["taken_at"] is not None
    assert client.post("/admin/console/rounds", json={"reason": "next"}).status_code == 202


def test_live_numbers_come_from_the_processes_metrics(
    migrated_url: str, tokens: AdminTokens
) -> None:
    """A target that answers gives its samples; one that does not is reported down."""
    port, dead = free_port(), free_port()
    urls = [f"http://127.0.0.1:{port}/metrics", f"http://127.0.0.1:{dead}/metrics"]
    server, thread = serve_in_thread(create_app(migrated_url, tokens, urls), "127.0.0.1", port)
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/admin/console/live", headers=AUTH, timeout=30)
    finally:
        server.should_exit = True
        thread.join(10)
    up, down = r.json()["targets"]
    assert up["up"] is True and isinstance(up["samples"], dict)
    assert down["up"] is False and down["error"]


def test_page_and_chart_library_need_no_token(client: TestClient) -> None:
    anonymous = {"Authorization": ""}
    page = client.get("/console/", headers=anonymous)
    assert page.status_code == 200 and 'id="login-form"' in page.text
    js = client.get("/console/static/vendor/plotly.min.js", headers=anonymous)
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert len(js.content) > 1_000_000  # the real library, not a stub
    assert client.get("/console/static/console.js").status_code == 200
    assert client.get("/console/static/..%2Fviews.py").status_code == 404
