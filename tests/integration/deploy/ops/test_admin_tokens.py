"""Named admin tokens and the limit on failed authentications, over real HTTP against real
Postgres: the audit log names the token's holder (a header cannot say otherwise), the token
file is re-read without a restart, ``alignloop admin-tokens`` makes tokens that work, a
client address that keeps failing gets 429 with Retry-After while another address is not
affected, and the processes that serve the admin API refuse a token shorter than 32 bytes
at start."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from deploy.local.broker import free_port
from deploy.ops.admin_api import create_app, serve_in_thread
from deploy.ops.admin_auth import AdminTokens, AuthFailures, add_token, revoke_token
from deploy.policies import registry
from feedback.db import connect
from tests.fixtures.polling import wait_until

REPO = Path(__file__).resolve().parents[4]
ADMIN = "the-single-admin-token-0123456789abcdef"
ALICE = "alice-token-0123456789abcdef-0123456789"
BOB = "bob-token-0123456789abcdef-0123456789ab"
OPERATOR = "X-Alignloop-Operator"


def _bearer(token: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **headers}


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "secrets" / "admin_tokens.jsonl"
    add_token(path, "alice", ALICE)
    add_token(path, "bob", BOB)
    return path


@pytest.fixture
def served(migrated_url: str, token_file: Path) -> Iterator[str]:
    failures = AuthFailures(max_failures=3, window_s=2.0)
    app = create_app(migrated_url, AdminTokens(ADMIN, token_file), failures=failures)
    server, thread = serve_in_thread(app, "127.0.0.1", free_port(), metrics=None)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_the_audit_log_names_the_token_not_a_header(served: str, migrated_url: str) -> None:
    with connect(migrated_url, autocommit=True) as conn:
        registry.register_candidate(conn, "v1", "/adapters/v1", actor="trainer")
    with httpx.Client(base_url=served, timeout=30) as c:
        for token, name in ((ADMIN, "admin"), (ALICE, "alice"), (BOB, "bob")):
            assert c.get("/admin/whoami", headers=_bearer(token)).json() == {"operator": name}
        # Alice's token claiming to be bob: refused, nothing changes.
        r = c.post(
            "/admin/policies/v1/canary",
            json={"weight": 0.1, "reason": "as bob"},
            headers=_bearer(ALICE, **{OPERATOR: "bob"}),
        )
        assert r.status_code == 403, r.text
        assert (r.json()["error"]["code"], r.json()["error"]["param"]) == (
            "operator_mismatch",
            OPERATOR,
        )
        r = c.post(
            "/admin/policies/v1/canary",
            json={"weight": 0.1, "reason": "try it"},
            headers=_bearer(ALICE, **{OPERATOR: "alice"}),  # her own name: fine
        )
        assert r.status_code == 200, r.text
        r = c.post("/admin/hold", json={"reason": "incident"}, headers=_bearer(BOB))
        assert r.json()["routing"]["held_by"] == "bob"
        r = c.post("/admin/rollback", json={"reason": "off"}, headers=_bearer(ADMIN))
        assert r.status_code == 200, r.text
    with connect(migrated_url, autocommit=True) as conn:
        trail = [(a.actor, a.action) for a in registry.audit_log(conn, "v1")]
    assert trail == [
        ("trainer", "register"), ("alice", "start_canary"), ("bob", "hold"), ("admin", "rollback"),
    ]  # fmt: skip


def test_the_token_file_is_reread_without_a_restart(served: str, token_file: Path) -> None:
    carol = "carol-token-0123456789abcdef-0123456789"
    with httpx.Client(base_url=served, timeout=30) as c:
        assert c.get("/admin/routing", headers=_bearer(carol)).status_code == 403
        add_token(token_file, "carol", carol)
        revoke_token(token_file, "alice")

        def carol_in() -> bool:
            return c.get("/admin/whoami", headers=_bearer(carol)).status_code == 200

        wait_until(carol_in, 10, "carol's new token to work")
        assert c.get("/admin/routing", headers=_bearer(ALICE)).status_code == 403
        assert c.get("/admin/routing", headers=_bearer(BOB)).status_code == 200


def test_failed_authentications_are_limited_per_client_address(served: str) -> None:
    with httpx.Client(base_url=served, timeout=30) as c:
        assert c.get("/admin/routing").status_code == 401
        assert c.get("/admin/routing", headers=_bearer("guess-" * 8)).status_code == 403
        assert c.get("/admin/routing", headers=_bearer("guess-" * 9)).status_code == 403
        started = time.monotonic()
        r = c.get("/admin/routing", headers=_bearer(ALICE))  # even the right token now
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "too_many_auth_failures"
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        wait = int(r.headers["Retry-After"])
        assert 1 <= wait <= 2
        assert c.get("/metrics").status_code == 200  # not /admin: not limited
        # Another client address is not affected.
        other = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(base_url=served, transport=other, timeout=30) as c2:
            assert c2.get("/admin/routing", headers=_bearer(BOB)).status_code == 200
        time.sleep(max(0.0, wait - (time.monotonic() - started)) + 0.1)
        assert c.get("/admin/routing", headers=_bearer(ALICE)).status_code == 200


def test_admin_tokens_cli_makes_tokens_the_api_accepts(migrated_url: str, tmp_path: Path) -> None:
    path = tmp_path / "tokens.jsonl"
    cli = [sys.executable, "-m", "deploy.cli", "admin-tokens", "--file", str(path)]
    made = subprocess.run([*cli, "create", "dora"], capture_output=True, text=True, cwd=REPO)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert len(token.encode()) >= 32 and token not in path.read_text()
    listed = subprocess.run([*cli, "list"], capture_output=True, text=True, cwd=REPO)
    assert '"name": "dora"' in listed.stdout and token not in listed.stdout
    again = subprocess.run([*cli, "create", "dora"], capture_output=True, text=True, cwd=REPO)
    assert again.returncode == 2 and "exists" in again.stderr
    reserved = subprocess.run([*cli, "create", "controller"], capture_output=True, text=True)
    assert reserved.returncode == 2
    app = create_app(migrated_url, AdminTokens(None, path))
    server, thread = serve_in_thread(app, "127.0.0.1", free_port(), metrics=None)
    try:
        url = f"http://127.0.0.1:{server.config.port}/admin/whoami"
        assert httpx.get(url, headers=_bearer(token)).json() == {"operator": "dora"}
    finally:
        server.should_exit = True
        thread.join(10)


def _start_refused(command: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("ALIGNLOOP_")}
    full |= {"ALIGNLOOP_STATE_DIR": str(tmp_path), "ALIGNLOOP_DATABASE_URL": "postgresql://x"}
    full |= env
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", command, "--port", str(free_port())],
        cwd=REPO, env=full, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize("command", ["canary", "admin"])
def test_a_short_token_or_a_broken_token_file_is_refused_at_start(
    command: str, tmp_path: Path
) -> None:
    done = _start_refused(command, tmp_path, ALIGNLOOP_ADMIN_TOKEN="s3cret-admin-token")
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"alignloop {command}: ALIGNLOOP_ADMIN_TOKEN is 18 bytes; at least 32" in done.stderr
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"name": "eve"}\n')
    done = _start_refused(command, tmp_path, ALIGNLOOP_ADMIN_TOKENS_FILE=str(broken))
    assert done.returncode == 2 and "not an admin token entry" in done.stderr
    twice = tmp_path / "twice.jsonl"
    add_token(twice, "admin", ALICE)  # the name of ALIGNLOOP_ADMIN_TOKEN
    done = _start_refused(
        command, tmp_path, ALIGNLOOP_ADMIN_TOKEN=ADMIN, ALIGNLOOP_ADMIN_TOKENS_FILE=str(twice)
    )
    assert done.returncode == 2 and "the name of ALIGNLOOP_ADMIN_TOKEN" in done.stderr
