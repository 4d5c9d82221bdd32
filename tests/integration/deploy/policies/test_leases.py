"""Leases against real Postgres: one holder per name and database, a clear refusal naming
the holder, the heartbeat, release, and a holder whose connection dies losing the lease
(and noticing)."""

from __future__ import annotations

import threading

import psycopg
import pytest

from deploy.policies import leases
from deploy.policies.leases import Lease, LeaseHeld
from feedback.db import connect
from tests.fixtures.polling import wait_until
from tests.fixtures.postgres import create_database, drop_database


def _row(url: str, name: str) -> leases.LeaseRow:
    with connect(url, autocommit=True) as conn:
        (row,) = leases.read(conn, name)
    return row


def test_one_holder_per_name_and_a_refusal_that_names_it(migrated_url: str) -> None:
    with Lease.acquire(migrated_url, "job", heartbeat_s=0.2, holder="host-a:1") as first:
        with pytest.raises(LeaseHeld) as refused:
            Lease.acquire(migrated_url, "job", heartbeat_s=0.2, holder="host-b:2")
        message = str(refused.value)
        assert "'job' lease is held by host-a:1 since " in message
        assert "last heartbeat" in message and "stale" not in message
        assert refused.value.row is not None and refused.value.row.holder == "host-a:1"
        # another name is another lease
        with Lease.acquire(migrated_url, "other", holder="host-b:2"):
            pass
        # the heartbeat moves while the holder lives
        before = _row(migrated_url, "job").heartbeat_at
        wait_until(lambda: _row(migrated_url, "job").heartbeat_at > before, 5, "a heartbeat")
        assert not first.lost.is_set()
    released = _row(migrated_url, "job")
    assert released.holder == "host-a:1" and released.released_at is not None
    with Lease.acquire(migrated_url, "job", holder="host-b:2"):
        row = _row(migrated_url, "job")
        assert (row.holder, row.released_at) == ("host-b:2", None)


def test_a_lease_is_per_database(migrated_url: str) -> None:
    other = create_database()  # empty: Lease.acquire migrates it
    try:
        with Lease.acquire(migrated_url, "job"), Lease.acquire(other, "job"):
            assert _row(other, "job").holder == _row(migrated_url, "job").holder
    finally:
        drop_database(other)


def test_a_dead_holders_lock_goes_with_its_connection(migrated_url: str) -> None:
    lost = threading.Event()
    holder = Lease.acquire(migrated_url, "job", heartbeat_s=0.2, on_lost=lost.set)
    with connect(migrated_url, autocommit=True) as conn:
        killed = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'alignloop lease job' AND datname = current_database()"
        ).fetchall()
    assert killed == [(True,)]
    # The holder notices at its next heartbeat and says so; the lock is free at once.
    wait_until(lost.is_set, 5, "the holder to notice it lost the lease")
    assert holder.lost.is_set()
    with Lease.acquire(migrated_url, "job", holder="next:1"):
        assert _row(migrated_url, "job").holder == "next:1"
    holder.release()  # closing a dead connection is fine


def test_a_stale_heartbeat_is_called_stale(migrated_url: str) -> None:
    with Lease.acquire(migrated_url, "job", heartbeat_s=60, holder="quiet:1"):
        with connect(migrated_url, autocommit=True) as conn:
            conn.execute("UPDATE leases SET heartbeat_at = now() - interval '10 minutes'")
        with pytest.raises(LeaseHeld, match=r"heartbeat 60\d\.\d s ago \(stale: it may be cut"):
            Lease.acquire(migrated_url, "job", heartbeat_s=60)


def test_unreachable_postgres_is_an_operational_error_and_waiting_can_stop() -> None:
    url = "postgresql://postgres@127.0.0.1:1/none"
    with pytest.raises(psycopg.OperationalError):
        Lease.acquire(url, "job")
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    assert leases.acquire_waiting(url, "job", stop) is None
    assert stop.is_set()
