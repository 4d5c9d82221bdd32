"""deploy/ops/admin_auth.py: the sliding window of failed authentications (on a fake
clock) and what the admin tokens accept and refuse."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from deploy.ops.admin_auth import (
    MIN_TOKEN_BYTES,
    AdminTokens,
    AuthFailures,
    add_token,
    read_entries,
    revoke_token,
)

LONG = "x" * MIN_TOKEN_BYTES


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_address_is_locked_after_max_failures_until_the_window_has_room() -> None:
    clock = Clock()
    failures = AuthFailures(3, 60.0, clock=clock)
    for _ in range(2):
        failures.failed("10.0.0.1")
        clock.now += 10
    assert failures.retry_after("10.0.0.1") is None  # 2 of 3
    failures.failed("10.0.0.1")  # at t=1020; the first was at t=1000
    assert failures.retry_after("10.0.0.1") == 40
    assert failures.retry_after("10.0.0.2") is None  # per address
    clock.now += 39.5
    assert failures.retry_after("10.0.0.1") == 1
    clock.now += 0.5  # the first failure left the window: 2 of 3 again
    assert failures.retry_after("10.0.0.1") is None
    failures.failed("10.0.0.1")
    assert failures.retry_after("10.0.0.1") == 10  # the second (t=1010) leaves at 1070


def test_no_limit_and_a_bounded_memory() -> None:
    off = AuthFailures(0, 60.0)
    for _ in range(100):
        off.failed("a")
    assert off.retry_after("a") is None
    small = AuthFailures(1, 60.0, max_clients=2)
    for client in ("a", "b", "c"):
        small.failed(client)
    assert small.retry_after("a") is None  # forgotten: the least recent beyond 2 addresses
    assert small.retry_after("b") is not None and small.retry_after("c") is not None


def test_tokens_are_named_and_compared_whole(tmp_path: Path) -> None:
    path = tmp_path / "tokens.jsonl"
    add_token(path, "alice", "a" * 40)
    tokens = AdminTokens(SecretStr(LONG), path)
    assert tokens.enabled() and tokens.names() == ["admin", "alice"]
    assert tokens.authenticate(LONG) == "admin"
    assert tokens.authenticate("a" * 40) == "alice"
    assert tokens.authenticate("a" * 39) is None and tokens.authenticate("") is None
    assert "a" * 40 not in path.read_text()  # hashes only
    assert not AdminTokens(None, tmp_path / "missing.jsonl").enabled()


@pytest.mark.parametrize(
    ("name", "token", "message"),
    [
        ("alice", "short", "at least 32"),
        ("controller", LONG, "the loop's own actions"),
        ("trainer", LONG, "the loop's own actions"),
        ("a b", LONG, "a key name is 1 to 64"),
    ],
)
def test_what_the_token_file_refuses(tmp_path: Path, name: str, token: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        add_token(tmp_path / "t.jsonl", name, token)


def test_the_single_token_must_be_long_and_its_name_unique(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ALIGNLOOP_ADMIN_TOKEN is 31 bytes; at least 32"):
        AdminTokens("y" * 31)
    path = tmp_path / "t.jsonl"
    add_token(path, "admin", LONG)
    assert AdminTokens(None, path).authenticate(LONG) == "admin"  # fine alone
    with pytest.raises(ValueError, match="the name of ALIGNLOOP_ADMIN_TOKEN"):
        AdminTokens("z" * 40, path)
    path.write_text(path.read_text() * 2)
    with pytest.raises(ValueError, match="a second token named 'admin'"):
        read_entries(path)


def test_a_broken_file_keeps_the_last_good_set(tmp_path: Path, monkeypatch) -> None:
    import deploy.ops.admin_auth as module

    monkeypatch.setattr(module, "_RELOAD_EVERY_S", 0.0)
    path = tmp_path / "t.jsonl"
    add_token(path, "alice", "a" * 40)
    tokens = AdminTokens(None, path)
    path.write_text("not json\n")
    assert tokens.authenticate("a" * 40) == "alice"
    path.unlink()
    add_token(path, "bob", "b" * 40)
    assert tokens.authenticate("b" * 40) == "bob" and tokens.authenticate("a" * 40) is None
    assert revoke_token(path, "bob") and not revoke_token(path, "bob")
    assert not tokens.enabled()
