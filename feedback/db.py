"""Postgres connections and the schema migration runner.

Migrations are the SQL files ``schemas/migrations/NNNN_name.sql``, applied in version order,
each recorded in ``schema_migrations``. The whole run happens in one transaction that first
takes a transaction-level advisory lock, so two processes starting at once (two ingestors,
an ingestor and the trainer) never apply the same file twice: the second waits, then sees
the first one's rows and has nothing to do.

Only the owner migrates. A component connecting as its own least-privilege role
(:mod:`schemas.db_roles`) runs :func:`migrate` at start as every process does: with nothing
pending it is a read of ``schema_migrations``; with something pending it raises
:class:`MigrationRefused` (run ``alignloop db migrate`` with the owner's URL first) instead of
failing halfway on a permission error. The owner is whoever owns ``schema_migrations`` (the
role that created the schema), or any role that is a member of it.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import re
from dataclasses import dataclass

import psycopg
from psycopg import sql

from schemas import db_roles

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


class MigrationRefused(RuntimeError):
    """Migrations are pending (or no schema exists) and this role may not apply them."""


def migrate(conn: psycopg.Connection, migrations: list[Migration] | None = None) -> list[int]:
    """Apply the migrations not yet recorded; returns the versions applied (empty: no-op).

    A file that changed after it was applied is reported, not re-run: migrations are
    append-only, a fix is a new file. A role that does not own the schema gets
    :class:`MigrationRefused` when anything is pending. After applying, the grants of the
    registered group roles (:func:`apply_grants`) are brought up to date in the same
    transaction.
    """
    pending = load_migrations() if migrations is None else migrations
    applied_now: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
        _create_migrations_table(conn)
        done = _applied(conn)
        for migration in pending:
            if migration.version in done and done[migration.version] != migration.checksum:
                log.warning(
                    "migration %04d_%s changed after it was applied; not re-running",
                    migration.version,
                    migration.name,
                )
        todo = [m for m in pending if m.version not in done]
        if todo and not owns_schema(conn):
            names = ", ".join(f"{m.version:04d}_{m.name}" for m in todo)
            raise MigrationRefused(
                f"the database schema is behind this alignloop (pending: {names}) and role "
                f"{_current_user(conn)!r} does not own it: run `alignloop db migrate` with the "
                'owner\'s database URL first (docs/deploy.md, "Database roles")'
            )
        for migration in todo:
            log.info("applying migration %04d_%s", migration.version, migration.name)
            # No parameters: psycopg sends the file as one simple query, several statements.
            conn.execute(migration.sql.encode())
            conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
            )
            applied_now.append(migration.version)
        if applied_now:
            apply_grants(conn)
    return applied_now


def _create_migrations_table(conn: psycopg.Connection) -> None:
    """Create ``schema_migrations`` if it is missing; a role that may not (a component's
    least-privilege role on an empty database) gets :class:`MigrationRefused`."""
    if _regclass(conn, "schema_migrations"):
        return
    try:
        with conn.transaction():  # a savepoint: the refusal leaves the caller's transaction
            conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version    integer PRIMARY KEY,
                       name       text NOT NULL,
                       checksum   text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now()
                   )"""
            )
    except psycopg.errors.InsufficientPrivilege as exc:
        raise MigrationRefused(
            f"the database has no alignloop schema and role {_current_user(conn)!r} may not "
            "create it: run `alignloop db migrate` with the owner's database URL first "
            '(docs/deploy.md, "Database roles")'
        ) from exc


def _applied(conn: psycopg.Connection) -> dict[int, str]:
    """version -> checksum of the applied migrations; a role that may not even read them
    (not granted yet) gets :class:`MigrationRefused` saying what to do."""
    try:
        with conn.transaction():
            rows = conn.execute("SELECT version, checksum FROM schema_migrations").fetchall()
    except psycopg.errors.InsufficientPrivilege as exc:
        raise MigrationRefused(
            f"role {_current_user(conn)!r} may not read schema_migrations: it is in no "
            "alignloop group role yet (`alignloop db roles`, then `alignloop db login`, with "
            'the owner\'s URL; docs/deploy.md, "Database roles")'
        ) from exc
    return dict(rows)


def _regclass(conn: psycopg.Connection, name: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()
    return bool(row and row[0])


def _current_user(conn: psycopg.Connection) -> str:
    row = conn.execute("SELECT current_user").fetchone()
    return str(row[0]) if row else "?"


def owns_schema(conn: psycopg.Connection) -> bool:
    """Whether the connected role owns ``schema_migrations`` (or is a member of its owner, or
    a superuser): the owner of the schema, the one role that migrates."""
    row = conn.execute(
        "SELECT pg_has_role(current_user, relowner, 'USAGE') FROM pg_class"
        " WHERE oid = to_regclass('schema_migrations')"
    ).fetchone()
    return bool(row and row[0])


def registered_roles(conn: psycopg.Connection) -> dict[str, str]:
    """component -> group role recorded in ``db_roles`` whose role still exists."""
    if not _regclass(conn, "db_roles"):
        return {}
    rows = conn.execute(
        "SELECT d.component, d.role_name FROM db_roles d"
        " JOIN pg_roles r ON r.rolname = d.role_name ORDER BY d.component"
    ).fetchall()
    return dict(rows)


def apply_grants(conn: psycopg.Connection, roles: dict[str, str] | None = None) -> None:
    """Give each group role exactly its component's privileges of
    :data:`schemas.db_roles.GRANTS` on this schema: everything on tables and sequences
    revoked, then the listed privileges granted, plus USAGE on the sequences of the tables it
    may insert into, and USAGE on the schema. ``roles``: component -> role (default: the
    ones recorded in ``db_roles``). One transaction (the caller's, if one is open); only the
    owner may run it."""
    roles = registered_roles(conn) if roles is None else roles
    if not roles:
        return
    with conn.transaction():
        row = conn.execute("SELECT current_schema()").fetchone()
        schema = sql.Identifier(str(row[0])) if row else sql.Identifier("public")
        unknown = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            " AND NOT (tablename = ANY(%s)) ORDER BY 1",
            (list(db_roles.GRANTS),),
        ).fetchall()
        if unknown:
            log.warning("tables with no grant decision in schemas/db_roles.py: %s", unknown)
        for component in db_roles.COMPONENTS:
            if component not in roles:
                continue
            who = sql.Identifier(roles[component])
            conn.execute(
                sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA {} FROM {}").format(schema, who)
            )
            conn.execute(
                sql.SQL("REVOKE ALL ON ALL SEQUENCES IN SCHEMA {} FROM {}").format(schema, who)
            )
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, who))
            for table in db_roles.GRANTS:
                granted = db_roles.privileges(table, component)
                if not granted or not _regclass(conn, table):
                    continue
                conn.execute(
                    sql.SQL("GRANT {} ON TABLE {} TO {}").format(
                        sql.SQL(", ").join(sql.SQL(p) for p in granted), sql.Identifier(table), who
                    )
                )
                if "INSERT" in granted:
                    for (seq,) in _owned_sequences(conn, table):
                        conn.execute(
                            sql.SQL("GRANT USAGE ON SEQUENCE {} TO {}").format(
                                sql.Identifier(seq), who
                            )
                        )


def _owned_sequences(conn: psycopg.Connection, table: str) -> list[tuple[str]]:
    """The sequences of ``table``'s serial columns (owned by the table)."""
    return conn.execute(
        "SELECT s.relname FROM pg_class s"
        " JOIN pg_depend d ON d.objid = s.oid AND d.classid = 'pg_class'::regclass"
        " AND d.refclassid = 'pg_class'::regclass AND d.deptype = 'a'"
        " WHERE s.relkind = 'S' AND d.refobjid = to_regclass(%s) ORDER BY 1",
        (table,),
    ).fetchall()


def register_roles(conn: psycopg.Connection, prefix: str, *, create: bool) -> dict[str, str]:
    """Record the group roles ``<prefix>_<component>`` in ``db_roles`` and grant them
    (:func:`apply_grants`); ``create``: make the missing ones (NOLOGIN; needs CREATEROLE),
    else a missing role is an error. Returns component -> role. Only the owner may."""
    if not owns_schema(conn):
        raise MigrationRefused(
            f"role {_current_user(conn)!r} does not own the alignloop schema: run this with "
            "the owner's database URL (after `alignloop db migrate`)"
        )
    roles: dict[str, str] = {c: db_roles.group_role(prefix, c) for c in db_roles.COMPONENTS}
    with conn.transaction():
        for component, role in roles.items():
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
            if not exists:
                if not create:
                    raise LookupError(f"role {role!r} does not exist (--create makes it)")
                conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
            conn.execute(
                "INSERT INTO db_roles (component, role_name) VALUES (%s, %s)"
                " ON CONFLICT (component) DO UPDATE SET role_name = EXCLUDED.role_name,"
                " granted_at = now()",
                (component, role),
            )
        apply_grants(conn, roles)
    return roles


def create_login(conn: psycopg.Connection, name: str, component: str, password: str | None) -> str:
    """Make (or update) the LOGIN role ``name`` as a member of ``component``'s registered
    group role; returns the group. The password travels as a SCRAM-SHA-256 verifier made
    on this side (libpq's PQencryptPasswordConn), so the cleartext is in no statement the
    server could log. Needs CREATEROLE."""
    group = registered_roles(conn).get(component)
    if group is None:
        raise LookupError(f"no group role registered for {component!r}: run `alignloop db roles`")
    who = sql.Identifier(name)
    with conn.transaction():
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
        verb = sql.SQL("ALTER ROLE {} LOGIN") if exists else sql.SQL("CREATE ROLE {} LOGIN")
        statement = verb.format(who)
        if password is not None:
            verifier = conn.pgconn.encrypt_password(
                password.encode(), name.encode(), b"scram-sha-256"
            ).decode()
            statement = sql.SQL("{} PASSWORD {}").format(statement, sql.Literal(verifier))
        conn.execute(statement)
        conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), who))
    return group


def connect_and_migrate(url: str) -> psycopg.Connection:
    """A ready-to-use connection to an up-to-date schema."""
    conn = connect(url)
    try:
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn
