"""Postgres connections and the schema migration runner.

Migrations are the SQL files ``schemas/migrations/NNNN_name.sql``, applied in version order,
each recorded in ``schema_migrations``. The whole run happens in one transaction that first
takes a transaction-level advisory lock, so two processes starting at once (two ingestors,
an ingestor and the trainer) never apply the same file twice: the second waits, then sees
the first one's rows and has nothing to do.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import re
from dataclasses import dataclass

import psycopg

log = logging.getLogger(__name__)

MIGRATION_LOCK_KEY = 0x616C_6D69  # "almi": any fixed bigint shared by every process
_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def connect(url: str, *, autocommit: bool = False, connect_timeout: int = 5) -> psycopg.Connection:
    """Open a connection; a short connect timeout so an unreachable server fails fast."""
    return psycopg.connect(url, autocommit=autocommit, connect_timeout=connect_timeout)


def load_migrations() -> list[Migration]:
    """The migration files shipped in ``schemas/migrations``, sorted by version."""
    folder = importlib.resources.files("schemas").joinpath("migrations")
    found: list[Migration] = []
    for entry in folder.iterdir():
        match = _FILE_RE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions in {folder}: {versions}")
    return found


def migrate(conn: psycopg.Connection, migrations: list[Migration] | None = None) -> list[int]:
    """Apply the migrations not yet recorded; returns the versions applied (empty: no-op).

    A file that changed after it was applied is reported, not re-run: migrations are
    append-only, a fix is a new file.
    """
    pending = load_migrations() if migrations is None else migrations
    applied_now: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
        conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version    integer PRIMARY KEY,
                   name       text NOT NULL,
                   checksum   text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now()
               )"""
        )
        done = dict(conn.execute("SELECT version, checksum FROM schema_migrations").fetchall())
        for migration in pending:
            if migration.version in done:
                if done[migration.version] != migration.checksum:
                    log.warning(
                        "migration %04d_%s changed after it was applied; not re-running",
                        migration.version,
                        migration.name,
                    )
                continue
            log.info("applying migration %04d_%s", migration.version, migration.name)
            # No parameters: psycopg sends the file as one simple query, several statements.
            conn.execute(migration.sql.encode())
            conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
            )
            applied_now.append(migration.version)
    return applied_now


def connect_and_migrate(url: str) -> psycopg.Connection:
    """A ready-to-use connection to an up-to-date schema."""
    conn = connect(url)
    try:
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn
