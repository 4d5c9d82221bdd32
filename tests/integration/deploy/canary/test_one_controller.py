"""One canary controller per database: real ``alignloop canary`` processes against real
Postgres. A second one is refused with a message naming the first while the first keeps
working; a killed holder's lease is free for the next; a holder whose lease connection is
cut stops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from deploy.policies import leases, registry
from feedback.db import connect
from tests.fixtures.polling import wait_until

REPO = Path(__file__).resolve().parents[4]
ENV = {**os.environ, "ALIGNLOOP_LEASE_HEARTBEAT_S": "0.3"}


def _argv(url: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "deploy.cli", "canary", "--demo", "--database-url", url,
        "--port", "0", "--poll-seconds", "0.3", *extra,
    ]  # fmt: skip


def _start(url: str, log_path: Path) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen(_argv(url), cwd=REPO, env=ENV, stdout=log, stderr=log)


def _holder(url: str) -> str | None:
    with connect(url, autocommit=True) as conn:
        rows = leases.read(conn, leases.CONTROLLER)
    return rows[0].holder if rows and rows[0].released_at is None else None


def _holds(url: str, proc: subprocess.Popen, log_path: Path) -> bool:
    assert proc.poll() is None, log_path.read_text()
    return (_holder(url) or "").endswith(f":{proc.pid}")


def _canary(url: str) -> str | None:
    with connect(url, autocommit=True) as conn:
        return registry.routing_table(conn).canary_version


def _register(url: str, version: str) -> None:
    with connect(url, autocommit=True) as conn:
        registry.register_candidate(conn, version, f"/adapters/{version}", actor="trainer")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


def test_a_second_controller_is_refused_and_the_next_one_takes_over(
    migrated_url: str, tmp_path: Path
) -> None:
    first = _start(migrated_url, tmp_path / "first.log")
    third = None
    try:
        wait_until(lambda: _holds(migrated_url, first, tmp_path / "first.log"), 60, "the lease")
        for extra in ((), ("--once",)):
            second = subprocess.run(
                _argv(migrated_url, *extra), cwd=REPO, env=ENV, capture_output=True, timeout=120
            )
            assert second.returncode == leases.EXIT_LEASE_HELD, second.stderr.decode()
            said = second.stderr.decode()
            assert "alignloop canary: not started: the 'canary-controller' lease is held by" in said
            assert f":{first.pid} since " in said and "last heartbeat" in said
        # The first one still works: it starts a new candidate as the canary.
        _register(migrated_url, "v1")
        wait_until(lambda: _canary(migrated_url) == "v1", 30, "the first to start v1")

        first.send_signal(signal.SIGKILL)
        first.wait(30)
        third = _start(migrated_url, tmp_path / "third.log")
        wait_until(lambda: _holds(migrated_url, third, tmp_path / "third.log"), 60, "a new holder")
        with connect(migrated_url, autocommit=True) as conn:
            registry.reject(conn, "v1", actor="test", reason="make room")
        _register(migrated_url, "v2")
        wait_until(lambda: _canary(migrated_url) == "v2", 30, "the new holder to start v2")
        third.send_signal(signal.SIGTERM)
        assert third.wait(30) == 0, (tmp_path / "third.log").read_text()
        assert _holder(migrated_url) is None  # released on a clean stop
    finally:
        _stop(first)
        if third is not None:
            _stop(third)


def test_a_controller_that_loses_its_lease_connection_stops(
    migrated_url: str, tmp_path: Path
) -> None:
    log_path = tmp_path / "controller.log"
    proc = _start(migrated_url, log_path)
    try:
        wait_until(lambda: _holds(migrated_url, proc, log_path), 60, "the lease")
        with connect(migrated_url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name"
                " = 'alignloop lease canary-controller' AND datname = current_database()"
            )
        assert proc.wait(30) == leases.EXIT_LEASE_LOST, log_path.read_text()
        assert "stopped: lost the 'canary-controller' lease" in log_path.read_text()
    finally:
        _stop(proc)
