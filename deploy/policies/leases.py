"""One of each: a lease per singleton process (the canary controller, the trainer).

A lease is a session-level Postgres advisory lock (``pg_try_advisory_lock``) held on a
connection of the holder's own for as long as it runs. Postgres releases the lock when that
connection closes, so a holder that crashed, was killed or lost its network never blocks the
next one for longer than it takes Postgres to notice the dead connection. The ``leases``
table (migration 0009) only shows who holds what: the holder (``host:pid``) writes its row
on acquiring and a heartbeat thread bumps ``heartbeat_at`` every few seconds.

A second instance gets :class:`LeaseHeld`, whose message names the holder and its last
heartbeat; the commands print it and exit with :data:`EXIT_LEASE_HELD`. A holder whose
heartbeat fails (its lease connection broke, or its row was taken) may have lost the lock:
the lease sets :attr:`Lease.lost` and calls ``on_lost``, and the holder stops acting (the
controller ends its loop, the trainer interrupts its round, which resumes under the next
holder), then exits with :data:`EXIT_LEASE_LOST`.

Why here: the lease's users are the registry's two writers, the trainer (layer 3, it
registers candidates) and the canary controller (layer 5, it moves canaries), and both may
import ``deploy.policies`` (layer 2). ``feedback.db`` (layer 1) holds only connections and
migrations; this module builds on it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import psycopg

log = logging.getLogger(__name__)

CONTROLLER = "canary-controller"
TRAINER = "trainer"
"""The two leases: ``alignloop canary``; ``alignloop train loop`` and ``train ppo``."""

EXIT_LEASE_HELD = 7
"""Exit status of a command refused because another process holds its lease."""
EXIT_LEASE_LOST = 8
"""Exit status of a holder that stopped because its heartbeat failed."""

_LOCK_CLASS = 0x616C_6C65  # "alle": the first key of every lease's two-key advisory lock
_KEEPALIVES = {  # a dead network is noticed in about 10 s, not hours
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
}


def lock_key(name: str) -> tuple[int, int]:
    """The two int4 keys of ``name``'s advisory lock (apart from one-key locks such as the
    migration lock: Postgres keeps two-key and one-key locks in separate spaces)."""
    digest = hashlib.sha256(f"alignloop lease {name}".encode()).digest()
    return _LOCK_CLASS, int.from_bytes(digest[:4], "big", signed=True)


def default_holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class LeaseRow:
    """A row of ``leases``; ``heartbeat_age_s`` as of the database's clock."""

    name: str
    holder: str
    acquired_at: datetime
    heartbeat_at: datetime
    released_at: datetime | None
    heartbeat_age_s: float


class LeaseHeld(RuntimeError):
    """Another process holds the lease."""

    def __init__(self, name: str, row: LeaseRow | None, heartbeat_s: float) -> None:
        self.name, self.row = name, row
        if row is None or row.released_at is not None:
            who = "a process that has not written its row yet"
        else:
            who = (
                f"{row.holder} since {row.acquired_at:%Y-%m-%d %H:%M:%S %Z}, last heartbeat "
                f"{row.heartbeat_age_s:.1f} s ago"
            )
            if row.heartbeat_age_s > 3 * heartbeat_s:
                who += " (stale: it may be cut off from Postgres, which frees the lease once "
                who += "its connection closes)"
        super().__init__(
            f"the {name!r} lease is held by {who}; only one may run against this database. "
            "Stop that one first, or wait for it."
        )


def read(conn: psycopg.Connection, name: str | None = None) -> list[LeaseRow]:
    """The rows of ``leases`` (one, or all by name)."""
    rows = conn.execute(
        "SELECT name, holder, acquired_at, heartbeat_at, released_at,"
        " extract(epoch FROM now() - heartbeat_at)::float8 FROM leases"
        " WHERE %(n)s::text IS NULL OR name = %(n)s ORDER BY name",
        {"n": name},
    ).fetchall()
    return [LeaseRow(*row) for row in rows]


class Lease:
    """A held lease; :meth:`acquire` makes one. Use as a context manager, or call
    :meth:`release` (a holder that just exits releases too: its connection closes)."""

    def __init__(
        self,
        conn: psycopg.Connection,
        name: str,
        holder: str,
        heartbeat_s: float,
        on_lost: Callable[[], None] | None,
    ) -> None:
        self.conn, self.name, self.holder = conn, name, holder
        self.heartbeat_s = heartbeat_s
        self.on_lost = on_lost
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{name}", daemon=True)

    @classmethod
    def acquire(
        cls,
        database_url: str,
        name: str,
        *,
        heartbeat_s: float = 5.0,
        on_lost: Callable[[], None] | None = None,
        holder: str | None = None,
    ) -> Lease:
        """Take the lease or raise :class:`LeaseHeld` (psycopg's ``OperationalError`` when
        Postgres does not answer). Applies pending migrations first."""
        from feedback.db import migrate

        holder = holder or default_holder()
        conn = psycopg.connect(
            database_url,
            autocommit=True,
            connect_timeout=5,
            application_name=f"alignloop lease {name}"[:63],
            **_KEEPALIVES,
        )
        try:
            migrate(conn)
            got = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", lock_key(name)).fetchone()
            if not (got and got[0]):
                rows = read(conn, name)
                raise LeaseHeld(name, rows[0] if rows else None, heartbeat_s)
            conn.execute(
                "INSERT INTO leases (name, holder) VALUES (%s, %s) ON CONFLICT (name) DO UPDATE"
                " SET holder = excluded.holder, acquired_at = now(), heartbeat_at = now(),"
                " released_at = NULL",
                (name, holder),
            )
        except BaseException:
            conn.close()
            raise
        lease = cls(conn, name, holder, heartbeat_s, on_lost)
        lease._thread.start()
        log.info("holding the %r lease as %s", name, holder)
        return lease

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                cur = self.conn.execute(
                    "UPDATE leases SET heartbeat_at = now()"
                    " WHERE name = %s AND holder = %s AND released_at IS NULL",
                    (self.name, self.holder),
                )
                if cur.rowcount == 1:
                    continue
                reason = "its row names another holder"
            except psycopg.Error as exc:
                reason = f"the lease connection failed ({exc})"
            if self._stop.is_set():
                return  # released meanwhile
            log.error("lost the %r lease: %s; stopping", self.name, reason)
            self.lost.set()
            if self.on_lost is not None:
                self.on_lost()
            return

    def release(self) -> None:
        """Let go: stop the heartbeat, mark the row released, unlock, close."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(self.heartbeat_s + 15)
        try:
            if not self.lost.is_set() and not self.conn.closed:
                self.conn.execute(
                    "UPDATE leases SET released_at = now() WHERE name = %s AND holder = %s",
                    (self.name, self.holder),
                )
                self.conn.execute("SELECT pg_advisory_unlock(%s, %s)", lock_key(self.name))
        except psycopg.Error as exc:  # the lock goes with the connection anyway
            log.warning("releasing the %r lease: %s", self.name, exc)
        finally:
            self.conn.close()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire_waiting(
    database_url: str,
    name: str,
    stop: threading.Event,
    *,
    heartbeat_s: float = 5.0,
    on_lost: Callable[[], None] | None = None,
) -> Lease | None:
    """:meth:`Lease.acquire`, retried with backoff while Postgres does not answer (a process
    started before its database waits for it, as before leases); None if ``stop`` is set
    meanwhile. :class:`LeaseHeld` is raised at once."""
    backoff = 1.0
    while not stop.is_set():
        try:
            return Lease.acquire(database_url, name, heartbeat_s=heartbeat_s, on_lost=on_lost)
        except psycopg.OperationalError as exc:
            log.warning("Postgres unavailable (%s); retrying in %.0fs", exc, backoff)
            stop.wait(backoff)
            backoff = min(backoff * 2, 60.0)
    return None
