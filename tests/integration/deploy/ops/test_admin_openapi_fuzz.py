"""The admin API's OpenAPI document (``/admin/openapi.json``), fuzzed against the app on a
real, migrated Postgres (in process, over ASGI).

For every operation schemathesis sends the coverage cases and generated ones, valid and
invalid, with an admin token; the answers must stay below 500 (no ``database_unavailable``
503 on a healthy database, no 500), every 4xx must be the admin API's error object, which
is the OpenAI one, ``{"error": {"message", "type", "param", "code"}}`` (a bad body is 400
``invalid_value``, never FastAPI's 422 ``detail`` list), and each answer must be one the
document declares. Without a token every operation is a 401. Deterministic: a fixed seed,
derandomised.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from schemathesis import Case

from deploy.ops.admin_api import OPENAPI_PATH, create_app
from deploy.ops.admin_auth import AuthFailures
from deploy.policies import registry
from feedback.db import connect
from tests.fixtures.openapi_fuzz import (
    DOCUMENTED,
    assert_error_shape,
    fuzz_config,
    header,
    run_every_operation,
)

TOKEN = "s3cret-admin-token-of-the-admin-openapi-fuzz"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def admin_app(url: str) -> Any:
    """The admin app on ``url`` with candidates ``v1`` and ``v2`` registered (so some
    commands succeed), and no lockout after failed authentications: schemathesis' auth
    probes would otherwise lock its own client out (the lockout has its own tests)."""
    with connect(url, autocommit=True) as conn:
        for version in ("v1", "v2"):
            registry.register_candidate(conn, version, f"/adapters/{version}", actor="trainer")
    return create_app(url, TOKEN, failures=AuthFailures(0, 60.0))


@pytest.fixture
def admin_schema(migrated_url: str) -> schemathesis.BaseSchema:
    config = fuzz_config(max_examples=15, phases=["examples", "coverage", "fuzzing"])
    return schemathesis.openapi.from_asgi(
        OPENAPI_PATH, admin_app(migrated_url), config=config, headers=AUTH
    )


@pytest.fixture
def anonymous_admin_schema(migrated_url: str) -> schemathesis.BaseSchema:
    config = fuzz_config(max_examples=8, phases=["fuzzing"])
    return schemathesis.openapi.from_asgi(
        OPENAPI_PATH, admin_app(migrated_url), config=config, headers=AUTH
    )


def test_every_admin_operation_answers_as_documented(admin_schema) -> None:
    statuses: Counter[int] = Counter()

    def call(case: Case) -> None:
        response = case.call_and_validate(headers=AUTH)
        statuses[response.status_code] += 1
        if response.status_code >= 400:
            assert_error_shape(response, case.as_curl_command(headers=AUTH))

    assert run_every_operation(admin_schema, call) >= 10
    # The run was answered (registry reads and commands), refused and not found.
    assert statuses[200] and statuses[400] and statuses[404], statuses


def test_without_a_token_every_admin_operation_is_401(anonymous_admin_schema) -> None:
    def call(case: Case) -> None:
        case.headers = {k: v for k, v in case.headers.items() if k.lower() != "authorization"}
        response = case.call()
        where = case.as_curl_command()
        assert response.status_code == 401, where
        assert header(response, "WWW-Authenticate").startswith("Bearer"), where
        assert_error_shape(response, where)
        assert json.loads(response.content)["error"]["code"] == "missing_token", where

    assert run_every_operation(anonymous_admin_schema, call) >= 10


# --- the seeded corpus: known-bad inputs sent every run, as written ---------------------------

HOLD, PROMOTE = "/admin/hold", "/admin/policies/v1/promote"
JSON = "application/json"

# (case id, method, path, body, content type, status, error code)
CORPUS: list[tuple[str, str, str, bytes, str, int, str]] = [
    ("NUL in the reason", "POST", HOLD, b'{"reason": "a\\u0000b"}', JSON, 400, "invalid_value"),
    ("lone surrogate in the reason", "POST", HOLD, b'{"reason": "\\ud800"}', JSON, 400,
     "invalid_value"),
    ("10,000-deep nesting", "POST", HOLD, b'{"reason": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
     JSON, 400, "invalid_value"),
    ("5,000-digit generation", "POST", PROMOTE, b'{"reason": "r", "expect_generation": '
     + b"9" * 5000 + b"}", JSON, 400, "invalid_value"),
    ("generation past bigint", "POST", PROMOTE, json.dumps({"reason": "r",
     "expect_generation": 2**70}).encode(), JSON, 409, "concurrent_change"),
    ("empty body", "POST", HOLD, b"", JSON, 400, "invalid_value"),
    ("not JSON", "POST", HOLD, b"{nope", JSON, 400, "invalid_value"),
    ("form body", "POST", HOLD, b"reason=x", "application/x-www-form-urlencoded", 400,
     "invalid_value"),
    ("NUL in a version", "GET", "/admin/policies/v%001", b"", JSON, 400, "invalid_value"),
    ("non-ASCII version", "POST", "/admin/policies/%C3%A9t%C3%A9/promote", b'{"reason": "r"}',
     JSON, 404, "policy_not_found"),
    ("audit_limit past int64", "GET", "/admin/policies/v1?audit_limit=" + "9" * 30, b"", JSON,
     400, "invalid_value"),
    ("NUL in a user", "DELETE", "/admin/users/a%00b", b'{"reason": "r"}', JSON, 400,
     "invalid_value"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "body", "content_type", "status", "code"),
    [c[1:] for c in CORPUS],
    ids=[c[0] for c in CORPUS],
)
def test_seeded_corpus(admin_schema, method, path, body, content_type, status, code) -> None:
    with TestClient(admin_schema.app, raise_server_exceptions=False) as client:
        r = client.request(
            method, path, content=body, headers={"content-type": content_type, **AUTH}
        )
    assert r.status_code == status, r.text[:500]
    assert_error_shape(r, r.text[:500])
    assert r.json()["error"]["code"] == code, r.text[:500]
    operation = admin_schema.find_operation_by_label(f"{method} {_template(path)}")
    operation.Case().validate_response(r, checks=DOCUMENTED)


def _template(path: str) -> str:
    """The documented path a corpus path is an instance of."""
    path = path.split("?")[0]
    if path.startswith("/admin/users/"):
        return "/admin/users/{user}"
    if path.endswith("/promote"):
        return "/admin/policies/{version}/promote"
    if path.startswith("/admin/policies/"):
        return "/admin/policies/{version}"
    return path


def test_a_method_not_allowed_is_405_with_allow(admin_schema) -> None:
    # RFC 9110: a 405 lists the allowed methods (the error handler once dropped the header).
    with TestClient(admin_schema.app) as client:
        r = client.get(HOLD, headers=AUTH)
    assert r.status_code == 405, r.text
    assert "POST" in {m.strip() for m in r.headers["allow"].split(",")}
    assert_error_shape(r, r.text)
