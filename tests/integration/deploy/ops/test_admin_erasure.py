"""``DELETE /admin/users/{user}`` against real Postgres: the same auth as every admin
route, the operator (the token's name) kept with the tombstone, the rows deleted per table,
the OpenAI error shape for a missing or empty reason."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from deploy.ops.admin_api import create_app
from deploy.ops.admin_auth import AdminTokens, add_token
from feedback.ab_counters import policy_counts, recount_policy_counts
from feedback.db import connect
from feedback.ingest.writer import prepare_session, store_events
from tests.fixtures.postgres import make_feedback, make_interaction

TOKEN = "s3cret-admin-token-of-the-admin-api"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ALICE = "alice-s3cret-token-0123456789abcdef"


@pytest.fixture
def client(migrated_url: str, tmp_path: Path) -> Iterator[TestClient]:
    add_token(tmp_path / "admin_tokens.jsonl", "alice", ALICE)
    tokens = AdminTokens(TOKEN, tmp_path / "admin_tokens.jsonl")
    with TestClient(create_app(migrated_url, tokens), headers=AUTH) as c:
        yield c


def _seed(url: str, user: str) -> list[str]:
    mine = make_interaction(user=user, answers=("a", "b"))
    other = make_interaction(user="bob")
    with connect(url, autocommit=True) as conn:
        prepare_session(conn)
        store_events(
            conn,
            [
                mine,
                other,
                make_feedback(mine.response_id, "up", user="bob"),
                make_feedback(other.response_id, "down", user=user),
                make_feedback(other.response_id, "up", user="bob"),
            ],
        )
    return [mine.response_id, other.response_id]


def _scalar(url: str, sql: str, *args: object) -> object:
    with connect(url, autocommit=True) as conn:
        row = conn.execute(sql, args).fetchone()
    assert row is not None
    return row[0]


def test_erase_a_user_over_http(client: TestClient, migrated_url: str) -> None:
    user = "ada@example.com/7"  # ids are opaque: an @ and a slash travel in the path
    mine, _ = _seed(migrated_url, user)
    r = client.request(
        "DELETE",
        "/admin/users/ada@example.com/7",
        json={"reason": "erasure request #12"},
        headers={"Authorization": f"Bearer {ALICE}"},
    )
    assert r.status_code == 200, r.text
    assert r.json() == {
        "user": user,
        "deleted": {
            "interactions": 1,
            "interaction_choices": 2,
            "feedback_events": 2,
            "feedback_current": 2,
            "preferences": 0,
        },
    }
    assert _scalar(migrated_url, "SELECT count(*) FROM interactions WHERE user_id = %s", user) == 0
    assert _scalar(migrated_url, "SELECT count(*) FROM feedback_events") == 1  # bob's of bob's
    sql = "SELECT count(*) FROM feedback_current WHERE response_id = %s"
    assert _scalar(migrated_url, sql, mine) == 0  # bob's rating of ada's answer went with it
    assert _scalar(migrated_url, "SELECT actor || ': ' || reason FROM user_tombstones") == (
        "alice: erasure request #12"
    )
    with connect(migrated_url, autocommit=True) as conn:
        assert policy_counts(conn) == recount_policy_counts(conn)
    # Again: nothing left to delete, the first tombstone stays.
    r = client.request("DELETE", "/admin/users/ada@example.com/7", json={"reason": "again"})
    assert r.status_code == 200 and set(r.json()["deleted"].values()) == {0}
    assert _scalar(migrated_url, "SELECT count(*) FROM user_tombstones") == 1


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"reason": ""}, "reason"),
        ({"reason": "   "}, "reason"),
        ({}, "reason"),
        ({"reason": "x", "extra": 1}, "extra"),
        (None, None),
    ],
    ids=["empty", "blank", "missing", "unknown-field", "no-body"],
)
def test_a_reason_is_required(client: TestClient, migrated_url: str, body, param) -> None:
    _seed(migrated_url, "ada")
    r = client.request("DELETE", "/admin/users/ada", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], error["param"]) == ("invalid_value", param)
    assert _scalar(migrated_url, "SELECT count(*) FROM interactions WHERE user_id = 'ada'") == 1
    assert _scalar(migrated_url, "SELECT count(*) FROM user_tombstones") == 0


@pytest.mark.parametrize(
    ("configured", "headers", "status", "code"),
    [
        (None, AUTH, 503, "admin_disabled"),
        (TOKEN, {}, 401, "missing_token"),
        (TOKEN, {"Authorization": "Bearer not-the-token"}, 403, "invalid_token"),
        (TOKEN, {**AUTH, "X-Alignloop-Operator": "controller"}, 403, "operator_mismatch"),
    ],
    ids=["disabled", "no-header", "wrong", "someone-else's-name"],
)
def test_refused_without_the_admin_token(
    migrated_url: str, configured, headers, status, code
) -> None:
    _seed(migrated_url, "ada")
    with TestClient(create_app(migrated_url, configured)) as c:
        r = c.request("DELETE", "/admin/users/ada", json={"reason": "r"}, headers=headers)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert _scalar(migrated_url, "SELECT count(*) FROM interactions WHERE user_id = 'ada'") == 1
