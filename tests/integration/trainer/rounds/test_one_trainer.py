"""One trainer per database: real ``alignloop train loop`` / ``train ppo`` processes against
real Postgres. A second trainer is refused with a message naming the holder, before it
touches a model; a killed holder's lease is free for the next; a holder whose lease
connection is cut stops.

The loops idle (no feedback, no trigger due), so a directory with an empty ``config.json``
stands in for the base model: nothing loads it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.policies import leases
from feedback.db import connect
from tests.fixtures.polling import wait_until

ROOT = Path(__file__).resolve().parents[4]
ENV = {**os.environ, "ALIGNLOOP_LEASE_HEARTBEAT_S": "0.3", "ALIGNLOOP_KAFKA_BOOTSTRAP": ""}


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    return tmp_path / "model"


def _argv(url: str, model: Path, target: str) -> list[str]:
    argv = [sys.executable, "-m", "deploy.cli", "train", target, "--database-url", url,
            "--base-model", str(model), "--state-dir", str(model.parent / "state")]  # fmt: skip
    if target == "loop":
        argv += ["--min-new-ratings", "1000000", "--poll-s", "0.3"]
    return argv


def _start_loop(url: str, model: Path, log_path: Path) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        argv = _argv(url, model, "loop")
        return subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=log, stderr=log)


def _holds(url: str, proc: subprocess.Popen, log_path: Path) -> bool:
    assert proc.poll() is None, log_path.read_text()
    with connect(url, autocommit=True) as conn:
        rows = leases.read(conn, leases.TRAINER)
    return bool(rows) and rows[0].released_at is None and rows[0].holder.endswith(f":{proc.pid}")


def test_a_second_trainer_is_refused_and_the_next_one_takes_over(
    migrated_url: str, model_dir: Path, tmp_path: Path
) -> None:
    first = _start_loop(migrated_url, model_dir, tmp_path / "first.log")
    third = None
    try:
        wait_until(lambda: _holds(migrated_url, first, tmp_path / "first.log"), 120, "the lease")
        for target in ("loop", "ppo"):
            second = subprocess.run(
                _argv(migrated_url, model_dir, target),
                cwd=ROOT, env=ENV, capture_output=True, timeout=120,
            )  # fmt: skip
            said = second.stderr.decode()
            assert second.returncode == leases.EXIT_LEASE_HELD, said
            assert "alignloop train: not started: the 'trainer' lease is held by" in said
            assert f":{first.pid} since " in said
        assert first.poll() is None  # the holder carries on

        first.send_signal(signal.SIGKILL)
        first.wait(30)
        third = _start_loop(migrated_url, model_dir, tmp_path / "third.log")
        wait_until(lambda: _holds(migrated_url, third, tmp_path / "third.log"), 120, "a holder")

        # Cut the holder's lease connection: it stops and says why.
        with connect(migrated_url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name"
                " = 'alignloop lease trainer' AND datname = current_database()"
            )
        try:
            code = third.wait(120)  # generous: a bound for a loaded CI machine, not a latency
        except subprocess.TimeoutExpired:
            pytest.fail(
                "the holder kept running without its lease:\n"
                + (tmp_path / "third.log").read_text()
            )
        assert code == leases.EXIT_LEASE_LOST, (tmp_path / "third.log").read_text()
        assert "stopped: lost the 'trainer' lease" in (tmp_path / "third.log").read_text()
    finally:
        for proc in (first, third):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(30)
