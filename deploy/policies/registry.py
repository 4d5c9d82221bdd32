"""The policy registry: which policy versions exist, what state each is in, what serving
routes to, and an audit row for every change (tables in migration 0003).

States and the only allowed moves (:data:`TRANSITIONS`, mirrored in the database table
``policy_transitions`` and enforced there by a trigger as well)::

    candidate   -> canary | stable (operator force-promote) | rejected
    canary      -> stable (promote) | rolled_back | rejected
    stable      -> retired (another version promoted) | rolled_back (rollback away from it)
    retired     -> stable (rollback --to it, or plain rollback to the previous stable)
    rolled_back -> stable (operator decides it was fine after all) | canary (try it again)
    rejected    -> (terminal: register a new version instead)

Commands and what they change, each ONE transaction:

* ``promote(V)``: old stable -> retired, V -> stable; an active canary other than V is
  rolled back too (its A/B test compared against a stable that no longer serves).
* ``rollback()``: with a canary active, the canary -> rolled_back (stable untouched);
  without one, stable -> rolled_back and the most recently retired version -> stable.
  ``rollback(to=V)``: V (retired or rolled_back) -> stable, current stable -> rolled_back,
  any canary -> rolled_back.

Concurrency. Every command first locks the singleton ``policy_routing`` row
(``SELECT ... FOR UPDATE``), so commands serialize; they then read the states they act on
*after* getting the lock. Callers that decided on a snapshot pass ``expect_state`` (the
state they saw the version in) and/or ``expect_generation`` (the routing generation they
saw); if either changed meanwhile the command raises :class:`ConcurrentChange` and changes
nothing. The database backs this up: one stable and one canary at most (partial unique
indexes), at least one stable and routing consistent with states at every commit (deferred
constraint trigger).

Every function takes an *autocommit* connection and runs its own transaction, so the
deferred checks run when the function returns, not at some later commit of the caller.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

STATES = ("candidate", "canary", "stable", "rejected", "rolled_back", "retired")

TRANSITIONS: dict[str, frozenset[str]] = {
    "candidate": frozenset({"canary", "stable", "rejected"}),
    "canary": frozenset({"stable", "rolled_back", "rejected"}),
    "stable": frozenset({"retired", "rolled_back"}),
    "retired": frozenset({"stable"}),
    "rolled_back": frozenset({"stable", "canary"}),
    "rejected": frozenset(),
}
"""The allowed state changes; the single source of truth in code (migration 0003 seeds the
same pairs into ``policy_transitions``; a test checks they agree)."""

NOTIFY_CHANNEL = "alignloop_routing"
"""Postgres NOTIFY channel; the payload is JSON (generation, stable_version, canary_version,
canary_weight, held). Sent by a trigger on every routing change, delivered at commit."""

CONTROLLER = "controller"
"""The actor name the canary controller writes in the audit log."""


class RegistryError(Exception):
    """Base of every registry error."""


class UnknownVersion(RegistryError):
    def __init__(self, version: str) -> None:
        super().__init__(f"unknown policy version {version!r}")
        self.version = version


class VersionExists(RegistryError):
    def __init__(self, version: str) -> None:
        super().__init__(f"policy version {version!r} already exists (versions are immutable)")
        self.version = version


class IllegalTransition(RegistryError):
    def __init__(self, version: str, from_state: str, to_state: str, why: str = "") -> None:
        allowed = ", ".join(sorted(TRANSITIONS.get(from_state, ()))) or "nothing"
        msg = f"cannot move {version!r} from {from_state} to {to_state} (allowed: {allowed})"
        super().__init__(f"{msg}: {why}" if why else msg)
        self.version, self.from_state, self.to_state = version, from_state, to_state


class ConcurrentChange(RegistryError):
    """Someone changed the registry between the caller's look and its command."""


@dataclass(frozen=True)
class PolicyVersion:
    version: str
    state: str
    adapter_uri: str | None
    checksum: str | None
    parent_version: str | None
    reward_model_version: str | None
    training_round: int | None
    metrics: dict[str, Any]
    created_by: str
    created_at: datetime
    state_changed_at: datetime


@dataclass(frozen=True)
class Routing:
    """What serving routes to: ``canary_weight`` of routed traffic to ``canary_version``,
    the rest to ``stable_version``. ``generation`` grows by one on every change."""

    stable_version: str
    canary_version: str | None
    canary_weight: float
    canary_stage: int | None
    canary_started_at: datetime | None
    stage_started_at: datetime | None
    held: bool
    held_by: str | None
    held_reason: str | None
    generation: int
    updated_at: datetime


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: datetime
    actor: str
    action: str
    version: str | None
    from_state: str | None
    to_state: str | None
    reason: str
    statistics: dict[str, Any] | None
    routing_generation: int | None
    """The routing generation the command started from (what ``expect_generation`` means)."""


_VERSION_COLUMNS = (
    "version, state, adapter_uri, checksum, parent_version, reward_model_version, "
    "training_round, metrics, created_by, created_at, state_changed_at"
)
_ROUTING_COLUMNS = (
    "stable_version, canary_version, canary_weight, canary_stage, canary_started_at, "
    "stage_started_at, held, held_by, held_reason, generation, updated_at"
)


# --- reading ---------------------------------------------------------------------------------


def get(conn: psycopg.Connection, version: str) -> PolicyVersion:
    row = conn.execute(
        f"SELECT {_VERSION_COLUMNS} FROM policy_versions WHERE version = %s", (version,)
    ).fetchone()
    if row is None:
        raise UnknownVersion(version)
    return PolicyVersion(*row)


def list_versions(conn: psycopg.Connection, state: str | None = None) -> list[PolicyVersion]:
    """All versions (or those in ``state``), oldest first."""
    rows = conn.execute(
        f"SELECT {_VERSION_COLUMNS} FROM policy_versions"
        " WHERE %(state)s::text IS NULL OR state = %(state)s ORDER BY created_at, version",
        {"state": state},
    ).fetchall()
    return [PolicyVersion(*row) for row in rows]


def routing_table(conn: psycopg.Connection) -> Routing:
    row = conn.execute(f"SELECT {_ROUTING_COLUMNS} FROM policy_routing").fetchone()
    assert row is not None, "migration 0003 seeds the routing row"
    return Routing(*row)


def audit_log(
    conn: psycopg.Connection, version: str | None = None, limit: int = 100
) -> list[AuditEntry]:
    """The newest ``limit`` audit rows (of one version, or all), oldest first."""
    rows = conn.execute(
        "SELECT id, at, actor, action, version, from_state, to_state, reason, statistics,"
        " routing_generation FROM policy_audit"
        " WHERE %(v)s::text IS NULL OR version = %(v)s ORDER BY id DESC LIMIT %(n)s",
        {"v": version, "n": limit},
    ).fetchall()
    return [AuditEntry(*row) for row in reversed(rows)]


# --- the write path ---------------------------------------------------------------------------


@contextmanager
def _locked(conn: psycopg.Connection, expect_generation: int | None = None) -> Iterator[Routing]:
    """One transaction holding the routing row lock; yields the routing as of the lock.

    Database errors that mean "the registry forbids this" surface as registry errors, so a
    trigger backstop and the Python check look the same to callers."""
    if not conn.autocommit:
        raise ValueError("registry commands need an autocommit connection (one txn each)")
    try:
        with conn.transaction():
            row = conn.execute(
                f"SELECT {_ROUTING_COLUMNS} FROM policy_routing FOR UPDATE"
            ).fetchone()
            assert row is not None
            routing = Routing(*row)
            if expect_generation is not None and routing.generation != expect_generation:
                raise ConcurrentChange(
                    f"routing changed since you looked (generation {expect_generation} -> "
                    f"{routing.generation}); look again and retry"
                )
            yield routing
    except psycopg.errors.UniqueViolation as exc:
        raise ConcurrentChange(f"registry invariant held off a concurrent change: {exc}") from exc
    except psycopg.errors.CheckViolation as exc:
        raise RegistryError(f"the database refused the change: {exc}") from exc
    except psycopg.errors.SerializationFailure as exc:
        raise ConcurrentChange(str(exc)) from exc


def _state_for_update(conn: psycopg.Connection, version: str) -> str:
    row = conn.execute(
        "SELECT state FROM policy_versions WHERE version = %s FOR UPDATE", (version,)
    ).fetchone()
    if row is None:
        raise UnknownVersion(version)
    return str(row[0])


def _check(version: str, current: str, target: str, expect_state: str | None) -> None:
    if expect_state is not None and current != expect_state:
        raise ConcurrentChange(
            f"{version!r} is {current}, not {expect_state} as expected: someone changed it "
            "since you looked"
        )
    if target not in TRANSITIONS[current]:
        raise IllegalTransition(version, current, target)


def _move(
    conn: psycopg.Connection,
    version: str,
    from_state: str,
    to_state: str,
    actor: str,
    action: str,
    reason: str,
    stats: dict[str, Any] | None = None,
) -> None:
    if to_state not in TRANSITIONS[from_state]:
        raise IllegalTransition(version, from_state, to_state)
    conn.execute("UPDATE policy_versions SET state = %s WHERE version = %s", (to_state, version))
    _audit(conn, actor, action, version, from_state, to_state, reason, stats)


def _audit(
    conn: psycopg.Connection,
    actor: str,
    action: str,
    version: str | None,
    from_state: str | None,
    to_state: str | None,
    reason: str,
    stats: dict[str, Any] | None = None,
) -> None:
    conn.execute(
        "INSERT INTO policy_audit (actor, action, version, from_state, to_state, reason,"
        " statistics, routing_generation)"
        " SELECT %s, %s, %s, %s, %s, %s, %s::jsonb, generation FROM policy_routing",
        (
            actor,
            action,
            version,
            from_state,
            to_state,
            reason,
            json.dumps(stats, default=str) if stats is not None else None,
        ),
    )


def _set_routing(conn: psycopg.Connection, **columns: Any) -> None:
    assignments = ", ".join(f"{name} = %({name})s" for name in columns)
    conn.execute(f"UPDATE policy_routing SET {assignments}", columns)


def _clear_canary(conn: psycopg.Connection) -> None:
    _set_routing(
        conn,
        canary_version=None,
        canary_weight=0.0,
        canary_stage=None,
        canary_started_at=None,
        stage_started_at=None,
    )


def _add_stratum(conn: psycopg.Connection, version: str, stage: int, weight: float) -> None:
    conn.execute(
        "INSERT INTO canary_strata (version, stratum, stage, weight, started_at)"
        " SELECT %(v)s, coalesce(max(stratum) + 1, 0), %(s)s, %(w)s, now()"
        " FROM canary_strata WHERE version = %(v)s",
        {"v": version, "s": stage, "w": weight},
    )


def _check_weight(weight: float) -> None:
    if not 0.0 < weight < 1.0:
        raise ValueError(f"canary weight must be strictly between 0 and 1, got {weight}")


def _refuse_if_held(routing: Routing, respect_hold: bool) -> None:
    if respect_hold and routing.held:
        raise ConcurrentChange(
            f"the registry is held by {routing.held_by} ({routing.held_reason}); resume first"
        )


# --- commands ---------------------------------------------------------------------------------


def register_candidate(
    conn: psycopg.Connection,
    version: str,
    adapter_uri: str,
    *,
    actor: str,
    checksum: str | None = None,
    parent_version: str | None = None,
    reward_model_version: str | None = None,
    training_round: int | None = None,
    metrics: dict[str, Any] | None = None,
    reason: str = "",
) -> PolicyVersion:
    """Add a new version in state ``candidate``. Names and adapters are immutable: a
    retrained adapter is a new version."""
    if parent_version is not None:
        get(conn, parent_version)
    with _locked(conn):
        try:
            with conn.transaction():  # savepoint: a duplicate leaves the lock txn usable
                conn.execute(
                    "INSERT INTO policy_versions (version, adapter_uri, checksum, parent_version,"
                    " reward_model_version, training_round, metrics, created_by)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb, %s)",
                    (
                        version,
                        adapter_uri,
                        checksum,
                        parent_version,
                        reward_model_version,
                        training_round,
                        json.dumps(metrics or {}),
                        actor,
                    ),
                )
        except psycopg.errors.UniqueViolation as exc:
            raise VersionExists(version) from exc
        _audit(conn, actor, "register", version, None, "candidate", reason)
    return get(conn, version)


def start_canary(
    conn: psycopg.Connection,
    version: str,
    weight: float,
    *,
    actor: str,
    reason: str = "",
    stage: int = 0,
    expect_state: str | None = None,
    expect_generation: int | None = None,
    respect_hold: bool = False,
) -> Routing:
    """Route ``weight`` of traffic to ``version`` (a candidate, or a rolled-back version
    tried again). Only one canary at a time: end the current one first."""
    _check_weight(weight)
    with _locked(conn, expect_generation) as routing:
        _refuse_if_held(routing, respect_hold)
        current = _state_for_update(conn, version)
        _check(version, current, "canary", expect_state)
        if routing.canary_version is not None:
            raise IllegalTransition(
                version, current, "canary", f"{routing.canary_version!r} is the canary now"
            )
        _move(conn, version, current, "canary", actor, "start_canary", reason, {"weight": weight})
        _set_routing(
            conn,
            canary_version=version,
            canary_weight=weight,
            canary_stage=stage,
            canary_started_at=_now(conn),
            stage_started_at=_now(conn),
        )
        _add_stratum(conn, version, stage, weight)
    return routing_table(conn)


def set_canary_weight(
    conn: psycopg.Connection,
    version: str,
    weight: float,
    *,
    actor: str,
    reason: str = "",
    stage: int | None = None,
    expect_generation: int | None = None,
    respect_hold: bool = False,
) -> Routing:
    """Change the active canary's traffic share (a new stratum of its A/B test); ``stage``
    is the controller's ramp stage (unchanged when None)."""
    _check_weight(weight)
    with _locked(conn, expect_generation) as routing:
        _refuse_if_held(routing, respect_hold)
        if routing.canary_version != version:
            get(conn, version)
            raise ConcurrentChange(
                f"{version!r} is not the canary (the canary is {routing.canary_version!r})"
            )
        new_stage = routing.canary_stage if stage is None else stage
        _audit(
            conn,
            actor,
            "set_weight",
            version,
            "canary",
            "canary",
            reason,
            {"from_weight": routing.canary_weight, "weight": weight, "stage": new_stage},
        )
        _set_routing(
            conn, canary_weight=weight, canary_stage=new_stage, stage_started_at=_now(conn)
        )
        _add_stratum(conn, version, int(new_stage or 0), weight)
    return routing_table(conn)


def promote(
    conn: psycopg.Connection,
    version: str,
    *,
    actor: str,
    reason: str = "",
    stats: dict[str, Any] | None = None,
    expect_state: str | None = None,
    expect_generation: int | None = None,
    respect_hold: bool = False,
) -> Routing:
    """Make ``version`` the stable: the old stable retires, a different active canary is
    rolled back (its comparison was against the old stable)."""
    with _locked(conn, expect_generation) as routing:
        _refuse_if_held(routing, respect_hold)
        current = _state_for_update(conn, version)
        _check(version, current, "stable", expect_state)
        old = routing.stable_version
        _move(conn, old, "stable", "retired", actor, "retire", f"{version} promoted: {reason}")
        canary = routing.canary_version
        if canary is not None and canary != version:
            _move(
                conn,
                canary,
                "canary",
                "rolled_back",
                actor,
                "rollback",
                f"stable changed to {version} during the canary",
            )
        _move(conn, version, current, "stable", actor, "promote", reason, stats)
        if canary is not None:
            _clear_canary(conn)
        _set_routing(conn, stable_version=version)
    return routing_table(conn)


def rollback(
    conn: psycopg.Connection,
    *,
    actor: str,
    reason: str = "",
    to: str | None = None,
    expect_canary: str | None = None,
    stats: dict[str, Any] | None = None,
    expect_generation: int | None = None,
) -> Routing:
    """Undo: end the active canary; or, with no canary (or with ``to``), put a previous
    version back as stable. See the module docstring for the exact moves.

    ``expect_canary``: act only if this version is the active canary (the controller uses
    it, so a rollback decided on a canary an operator promoted meanwhile cannot roll back
    the new stable); raises :class:`ConcurrentChange` otherwise."""
    with _locked(conn, expect_generation) as routing:
        canary = routing.canary_version
        if expect_canary is not None and canary != expect_canary:
            state = get(conn, expect_canary).state
            raise ConcurrentChange(
                f"{expect_canary!r} is no longer the canary (it is {state}); nothing rolled back"
            )
        if to is None and canary is not None:
            _move(conn, canary, "canary", "rolled_back", actor, "rollback", reason, stats)
            _clear_canary(conn)
        else:
            target = to or _previous_stable(conn, routing.stable_version)
            current = _state_for_update(conn, target)
            if current not in ("retired", "rolled_back"):
                raise IllegalTransition(
                    target,
                    current,
                    "stable",
                    "rollback goes back to a retired or rolled-back version; use promote",
                )
            old = routing.stable_version
            _move(conn, old, "stable", "rolled_back", actor, "rollback", reason, stats)
            if canary is not None:
                _move(
                    conn,
                    canary,
                    "canary",
                    "rolled_back",
                    actor,
                    "rollback",
                    f"rollback to {target}: {reason}",
                )
                _clear_canary(conn)
            _move(conn, target, current, "stable", actor, "restore", reason)
            _set_routing(conn, stable_version=target)
    return routing_table(conn)


def _previous_stable(conn: psycopg.Connection, stable: str) -> str:
    row = conn.execute(
        "SELECT version FROM policy_versions WHERE state = 'retired'"
        " ORDER BY state_changed_at DESC, version DESC LIMIT 1"
    ).fetchone()
    if row is None:
        raise IllegalTransition(stable, "stable", "rolled_back", "no earlier stable to go back to")
    return str(row[0])


def reject(
    conn: psycopg.Connection,
    version: str,
    *,
    actor: str,
    reason: str = "",
    expect_state: str | None = None,
    stats: dict[str, Any] | None = None,
) -> Routing:
    """Refuse a candidate (or stop a canary for good): terminal."""
    with _locked(conn) as routing:
        current = _state_for_update(conn, version)
        _check(version, current, "rejected", expect_state)
        _move(conn, version, current, "rejected", actor, "reject", reason, stats)
        if routing.canary_version == version:
            _clear_canary(conn)
    return routing_table(conn)


def hold(conn: psycopg.Connection, *, actor: str, reason: str = "") -> bool:
    """Stop the controller from acting (no canary start, stage advance or promotion) until
    :func:`resume`. Operators' own commands still work. Returns False if already held."""
    with _locked(conn) as routing:
        if routing.held:
            return False
        _set_routing(conn, held=True, held_by=actor, held_reason=reason)
        _audit(conn, actor, "hold", routing.canary_version, None, None, reason)
    return True


def resume(conn: psycopg.Connection, *, actor: str, reason: str = "") -> bool:
    """Lift a hold. Returns False if nothing was held."""
    with _locked(conn) as routing:
        if not routing.held:
            return False
        _set_routing(conn, held=False, held_by=None, held_reason=None)
        _audit(conn, actor, "resume", routing.canary_version, None, None, reason)
    return True


def record_decision(
    conn: psycopg.Connection,
    version: str,
    action: str,
    reason: str,
    stats: dict[str, Any],
    *,
    actor: str = CONTROLLER,
) -> None:
    """Append a controller decision (with its statistics) to the audit log; no state change."""
    with conn.transaction():
        _audit(conn, actor, f"decision:{action}", version, None, None, reason, stats)


def canary_strata(conn: psycopg.Connection, version: str, since: datetime) -> list[tuple]:
    """The canary's strata started at or after ``since``: (stratum, stage, weight, started_at)."""
    return conn.execute(
        "SELECT stratum, stage, weight, started_at FROM canary_strata"
        " WHERE version = %s AND started_at >= %s ORDER BY stratum",
        (version, since),
    ).fetchall()


def _now(conn: psycopg.Connection) -> datetime:
    """Transaction time: the same instant for every row a command writes."""
    row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    return row[0]


def transitions_in_database(conn: psycopg.Connection) -> dict[str, frozenset[str]]:
    """``policy_transitions`` as a dict like :data:`TRANSITIONS` (for the agreement test)."""
    found: dict[str, set[str]] = {state: set() for state in STATES}
    with conn.cursor(row_factory=dict_row) as cur:
        for row in cur.execute("SELECT from_state, to_state FROM policy_transitions"):
            found[row["from_state"]].add(row["to_state"])
    return {state: frozenset(targets) for state, targets in found.items()}
