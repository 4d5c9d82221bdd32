"""Which policy version answers a request, and how every replica learns of a change.

The routing table (stable version, canary version and its traffic weight) lives in
Postgres (`policy_routing`, `policy_versions`; schema in `schemas/migrations/0003`). Each
replica holds an immutable snapshot of it and swaps in a new one when the database
NOTIFYs channel ``alignloop_routing`` (sent by a trigger on every change), with a
periodic re-read as a safety net for a missed notification. A request resolves against
the snapshot current when it arrives, so in-flight requests finish on the version they
started on. Serving only *reads* the table, and never on a request's path.

Arm assignment is sticky: ``bucket(user) = sha256(salt, user) / 2**64`` is a fixed number
in [0, 1) per user, and a user is in the canary arm while ``bucket < canary_weight``. Raising
the weight (5 % → 50 %) moves only users from stable to canary, never back, and a user
keeps their arm for as long as the weight does not cross their bucket.

A replica cut off from Postgres keeps serving its last snapshot, and says how old it is:
the gauge ``alignloop_routing_table_loaded_timestamp_seconds``, and the age on ``/healthz``
and ``/readyz`` (503 once older than ``routing_stale_after_s``; see ``serving/app.py``).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge

if TYPE_CHECKING:  # psycopg is imported by the watcher thread, not with this module
    from psycopg import Connection
    from psycopg.rows import TupleRow

log = logging.getLogger(__name__)

BASE_VERSION = "base"
CHANNEL = "alignloop_routing"

ROUTING_GENERATION = Gauge(
    "alignloop_routing_generation", "Generation of the routing table this replica applies."
)
ROUTING_RELOADS = Counter(
    "alignloop_routing_reloads_total", "Routing table reads, by trigger.", ["trigger"]
)
ROUTING_LOADED_AT = Gauge(
    "alignloop_routing_table_loaded_timestamp_seconds",
    "Unix time of this replica's last successful read of the routing table from Postgres "
    "(on start, on each NOTIFY and every routing_refresh_s); 0 if never read.",
)


@dataclass(frozen=True)
class RoutingTable:
    """One consistent snapshot of the routing state."""

    generation: int
    stable: str
    canary: str | None = None
    canary_weight: float = 0.0
    # Every version a request may name explicitly -> its adapter directory (None: the base
    # weights). Rejected versions are absent.
    adapters: Mapping[str, str | None] = field(default_factory=dict)
    # Version -> the registered checksum of its adapter directory (the sha256 of its
    # MANIFEST.json, schemas.durable); None: registered without one, loaded unverified.
    checksums: Mapping[str, str | None] = field(default_factory=dict)
    # The versions that were stable before (retired), most recently retired first: where
    # the stable arm goes when the stable's adapter cannot load (the registry's rollback
    # goes to the first of them too).
    previous_stables: tuple[str, ...] = ()

    @classmethod
    def base_only(cls) -> RoutingTable:
        """Without a database: the base model is the only version."""
        return cls(generation=0, stable=BASE_VERSION, adapters={BASE_VERSION: None})


def bucket(salt: str, user_key: str) -> float:
    """A user's fixed position in [0, 1); the canary arm is [0, canary_weight)."""
    digest = hashlib.sha256(f"{salt}\x00{user_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def routing_key(principal: str, user: str | None, client_host: str | None = None) -> str:
    """The identity sticky routing hashes: the API key's principal and the end user the
    product named, or, when it names none, the principal and the client's address. (The
    canary simulation, tests/fixtures/canary_sim.py, routes its users through this and
    :func:`bucket` too.)"""
    who = f"addr:{client_host or 'unknown'}" if user is None else f"user:{user}"
    return f"{principal}\0{who}"


def choose_version(table: RoutingTable, salt: str, user_key: str) -> str:
    """The routed version for a user (not for a request that names a version)."""
    if table.canary is not None and bucket(salt, user_key) < table.canary_weight:
        return table.canary
    return table.stable


_TABLE_SQL = """
SELECT r.generation, r.stable_version, r.canary_version, r.canary_weight
FROM policy_routing r
"""
_VERSIONS_SQL = """
SELECT version, adapter_uri, checksum, state FROM policy_versions WHERE state <> 'rejected'
ORDER BY state_changed_at DESC, version DESC
"""


def read_table(conn: Connection[TupleRow]) -> RoutingTable:
    """Read a snapshot (one transaction, so the two queries agree)."""
    with conn.transaction():
        row = conn.execute(_TABLE_SQL).fetchone()
        assert row is not None, "policy_routing has one row, never deleted (migration 0003)"
        generation, stable, canary, weight = row
        versions = conn.execute(_VERSIONS_SQL).fetchall()
    return RoutingTable(
        int(generation),
        stable,
        canary,
        float(weight),
        adapters={v: uri for v, uri, _, _ in versions},
        checksums={v: checksum for v, _, checksum, _ in versions},
        previous_stables=tuple(v for v, _, _, state in versions if state == "retired"),
    )


class RoutingWatcher:
    """Keeps a replica's table current: LISTEN for changes, re-read on each, and every
    ``refresh_s`` anyway. Reconnects with backoff if the database goes away; meanwhile the
    last snapshot stays in force (serving never stops because Postgres did)."""

    def __init__(
        self, database_url: str, apply: Callable[[RoutingTable], None], refresh_s: float = 5.0
    ) -> None:
        self.database_url = database_url
        self.apply = apply
        self.refresh_s = refresh_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()  # set after the first successful read
        self.loaded_at: float | None = None  # time.time() of the last successful read

    def start(self, wait_s: float = 10.0) -> None:
        self._thread = threading.Thread(target=self._run, name="routing-watcher", daemon=True)
        self._thread.start()
        if not self.ready.wait(wait_s):
            log.warning(
                "routing table not read within %.0f s; serving the base model until "
                "Postgres answers",
                wait_s,
            )

    def age_s(self) -> float | None:
        """Seconds since the last successful read of the table; None before the first."""
        loaded_at = self.loaded_at
        return None if loaded_at is None else max(0.0, time.time() - loaded_at)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        import psycopg

        backoff = 0.5
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.database_url, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._reload(conn, "start")
                    backoff = 0.5
                    while not self._stop.is_set():
                        # Wakes on the first notification or after refresh_s; a burst of
                        # notifications collapses into one re-read.
                        notified = any(
                            True for _ in conn.notifies(timeout=self.refresh_s, stop_after=1)
                        )
                        if not self._stop.is_set():
                            self._reload(conn, "notify" if notified else "periodic")
            except Exception as exc:  # keep the last table; try again
                log.warning("routing watcher: %s; retrying in %.1f s", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def _reload(self, conn: Connection[TupleRow], trigger: str) -> None:
        table = read_table(conn)
        ROUTING_RELOADS.labels(trigger).inc()
        ROUTING_LOADED_AT.set_to_current_time()  # read succeeded: the snapshot is current
        self.loaded_at = time.time()
        self.apply(table)
        self.ready.set()
