"""The policy registry against a real Postgres: the transition table (through the API and
the trigger), the one-stable invariants under racing promotes, audit rows, routing NOTIFY,
optimistic concurrency and the operator CLI."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import psycopg
import pytest

from deploy.ops import policy_cli
from deploy.policies import registry
from deploy.policies.registry import (
    STATES,
    TRANSITIONS,
    ConcurrentChange,
    IllegalTransition,
    RegistryError,
    UnknownVersion,
)
from feedback.db import connect


@pytest.fixture
def conn(migrated_url: str) -> Iterator[psycopg.Connection]:
    with connect(migrated_url, autocommit=True) as c:
        yield c


def _register(conn: psycopg.Connection, version: str) -> None:
    registry.register_candidate(conn, version, f"/adapters/{version}", actor="trainer")


def _states(conn: psycopg.Connection) -> dict[str, str]:
    return {v.version: v.state for v in registry.list_versions(conn)}


def _put_in_state(conn: psycopg.Connection, version: str, state: str) -> None:
    """Drive a fresh version into ``state`` through the public API."""
    _register(conn, version)
    if state == "candidate":
        return
    if state == "rejected":
        registry.reject(conn, version, actor="op")
        return
    registry.start_canary(conn, version, 0.1, actor="op")
    if state == "canary":
        return
    if state == "rolled_back":
        registry.rollback(conn, actor="op")
        return
    registry.promote(conn, version, actor="op")
    if state == "stable":
        return
    _register(conn, f"{version}-next")
    registry.promote(conn, f"{version}-next", actor="op")  # version retires
    assert state == "retired"


def test_seed_base_is_stable(conn: psycopg.Connection) -> None:
    assert _states(conn) == {"base": "stable"}
    routing = registry.routing_table(conn)
    assert (routing.stable_version, routing.canary_version, routing.held) == ("base", None, False)
    assert registry.get(conn, "base").adapter_uri is None
    assert [a.action for a in registry.audit_log(conn)] == ["seed"]


def test_code_and_database_transition_tables_agree(conn: psycopg.Connection) -> None:
    assert registry.transitions_in_database(conn) == TRANSITIONS


def _api_move(conn: psycopg.Connection, version: str, target: str) -> None:
    """The API command that moves ``version`` to ``target``."""
    if target == "canary":
        registry.start_canary(conn, version, 0.2, actor="op")
    elif target == "stable":
        state = registry.get(conn, version).state
        if state in ("retired", "rolled_back"):
            registry.rollback(conn, actor="op", to=version)
        else:
            registry.promote(conn, version, actor="op")
    elif target == "rejected":
        registry.reject(conn, version, actor="op")
    elif target == "rolled_back":  # a canary ends; a stable goes back to the previous one
        registry.rollback(conn, actor="op")
    elif target == "retired":
        _register(conn, "successor")
        registry.promote(conn, "successor", actor="op")
    else:
        raise AssertionError(target)


ALLOWED = [(a, b) for a, targets in TRANSITIONS.items() for b in sorted(targets)]


@pytest.mark.parametrize(("from_state", "to_state"), ALLOWED)
def test_every_allowed_transition_through_the_api(
    conn: psycopg.Connection, from_state: str, to_state: str
) -> None:
    if (from_state, to_state) == ("stable", "rolled_back"):
        _put_in_state(conn, "older", "stable")  # something to roll back to
    _put_in_state(conn, "v", from_state)
    assert registry.get(conn, "v").state == from_state
    _api_move(conn, "v", to_state)
    assert registry.get(conn, "v").state == to_state
    assert list(_states(conn).values()).count("stable") == 1
    last = [a for a in registry.audit_log(conn, "v") if a.to_state == to_state][-1]
    assert (last.from_state, last.actor) == (from_state, "op")


ILLEGAL = [
    ("candidate", "rolled_back"),
    ("candidate", "retired"),
    ("rejected", "canary"),
    ("rejected", "stable"),
    ("retired", "canary"),
    ("stable", "canary"),
    ("stable", "candidate"),
    ("rolled_back", "candidate"),
]


@pytest.mark.parametrize(("from_state", "to_state"), ILLEGAL)
def test_illegal_transitions_refused_by_the_trigger(
    conn: psycopg.Connection, from_state: str, to_state: str
) -> None:
    assert to_state not in TRANSITIONS[from_state]
    _put_in_state(conn, "v", from_state)
    before = _states(conn)
    with pytest.raises(psycopg.errors.CheckViolation, match=r"illegal transition|no stable"):
        conn.execute("UPDATE policy_versions SET state = %s WHERE version = 'v'", (to_state,))
    assert _states(conn) == before


def test_illegal_transitions_refused_by_the_api(conn: psycopg.Connection) -> None:
    _put_in_state(conn, "r", "rejected")
    with pytest.raises(IllegalTransition, match="rejected to canary"):
        registry.start_canary(conn, "r", 0.1, actor="op")
    with pytest.raises(IllegalTransition, match="stable to stable"):
        registry.promote(conn, "base", actor="op")
    _register(conn, "c")
    with pytest.raises(IllegalTransition, match="use promote"):
        registry.rollback(conn, actor="op", to="c")
    with pytest.raises(IllegalTransition, match="no earlier stable"):
        registry.rollback(conn, actor="op")
    with pytest.raises(UnknownVersion):
        registry.promote(conn, "nope", actor="op")
    registry.start_canary(conn, "c", 0.1, actor="op")
    _register(conn, "d")
    with pytest.raises(IllegalTransition, match="'c' is the canary now"):
        registry.start_canary(conn, "d", 0.1, actor="op")
    with pytest.raises(ValueError):
        registry.set_canary_weight(conn, "c", 1.0, actor="op")
    assert _states(conn) == {"base": "stable", "r": "rejected", "c": "canary", "d": "candidate"}


def test_database_invariants_hold_without_the_api(conn: psycopg.Connection) -> None:
    _register(conn, "v")
    with pytest.raises(psycopg.errors.CheckViolation, match="immutable"):
        conn.execute("UPDATE policy_versions SET adapter_uri = 'x' WHERE version = 'v'")
    with pytest.raises(psycopg.errors.CheckViolation, match="never deleted"):
        conn.execute("DELETE FROM policy_versions WHERE version = 'v'")
    with pytest.raises(psycopg.errors.CheckViolation, match="starts as candidate"):
        conn.execute(
            "INSERT INTO policy_versions (version, adapter_uri, state, created_by)"
            " VALUES ('w', '/a', 'stable', 'x')"
        )
    with pytest.raises(psycopg.errors.CheckViolation, match="no stable"):
        conn.execute("UPDATE policy_versions SET state = 'retired' WHERE version = 'base'")
    with pytest.raises(psycopg.errors.UniqueViolation):  # two stables, even in one statement
        conn.execute("UPDATE policy_versions SET state = 'stable' WHERE version = 'v'")
    # States changed but routing not: refused at commit by the deferred check.
    with pytest.raises(psycopg.errors.CheckViolation, match="routing"), conn.transaction():
        conn.execute("UPDATE policy_versions SET state = 'retired' WHERE version = 'base'")
        conn.execute("UPDATE policy_versions SET state = 'stable' WHERE version = 'v'")
    with pytest.raises(psycopg.errors.CheckViolation, match="append-only"):
        conn.execute("DELETE FROM policy_audit")
    assert _states(conn) == {"base": "stable", "v": "candidate"}


def test_promote_rollback_cycle_and_audit(conn: psycopg.Connection) -> None:
    _register(conn, "v1")
    registry.start_canary(conn, "v1", 0.05, actor="controller", reason="new")
    registry.set_canary_weight(conn, "v1", 0.5, actor="controller", stage=1, reason="ramp")
    stats = {"lower": -0.01, "upper": 0.03}
    r = registry.promote(conn, "v1", actor="controller", reason="non-inferior", stats=stats)
    assert (r.stable_version, r.canary_version, r.canary_weight) == ("v1", None, 0.0)
    assert _states(conn) == {"base": "retired", "v1": "stable"}
    strata = registry.canary_strata(conn, "v1", registry.get(conn, "v1").created_at)
    assert [(s[0], s[1], s[2]) for s in strata] == [(0, 0, 0.05), (1, 1, 0.5)]

    r = registry.rollback(conn, actor="alice", reason="users complain")
    assert r.stable_version == "base"
    assert _states(conn) == {"base": "stable", "v1": "rolled_back"}

    trail = [
        (a.actor, a.action, a.version, a.from_state, a.to_state) for a in registry.audit_log(conn)
    ]
    assert trail == [
        ("migration", "seed", "base", None, "stable"),
        ("trainer", "register", "v1", None, "candidate"),
        ("controller", "start_canary", "v1", "candidate", "canary"),
        ("controller", "set_weight", "v1", "canary", "canary"),
        ("controller", "retire", "base", "stable", "retired"),
        ("controller", "promote", "v1", "canary", "stable"),
        ("alice", "rollback", "v1", "stable", "rolled_back"),
        ("alice", "restore", "base", "retired", "stable"),
    ]
    promote_row = next(a for a in registry.audit_log(conn) if a.action == "promote")
    assert promote_row.statistics == stats and promote_row.reason == "non-inferior"


def test_rollback_to_and_canary_superseded(conn: psycopg.Connection) -> None:
    for v in ("v1", "v2"):
        _register(conn, v)
        registry.promote(conn, v, actor="op")
    _register(conn, "v3")
    registry.start_canary(conn, "v3", 0.1, actor="controller")
    r = registry.rollback(conn, actor="op", to="base", reason="incident")
    assert (r.stable_version, r.canary_version) == ("base", None)
    assert _states(conn) == {
        "base": "stable", "v1": "retired", "v2": "rolled_back", "v3": "rolled_back",
    }  # fmt: skip
    # Promoting another version while a canary runs ends that canary.
    registry.start_canary(conn, "v3", 0.1, actor="op")
    registry.promote(conn, "v1", actor="op")
    assert _states(conn)["v3"] == "rolled_back"
    assert registry.routing_table(conn).canary_version is None


def test_optimistic_concurrency(conn: psycopg.Connection) -> None:
    _register(conn, "v1")
    seen = registry.routing_table(conn)
    registry.start_canary(conn, "v1", 0.05, actor="controller", expect_generation=seen.generation)
    stale = seen.generation
    # The operator promotes it meanwhile; the controller's decisions on the old look fail.
    registry.promote(conn, "v1", actor="alice")
    with pytest.raises(ConcurrentChange, match="generation"):
        registry.rollback(conn, actor="controller", expect_generation=stale)
    with pytest.raises(ConcurrentChange, match="no longer the canary"):
        registry.rollback(conn, actor="controller", expect_canary="v1")
    with pytest.raises(ConcurrentChange, match="is stable, not canary"):
        registry.promote(conn, "v1", actor="controller", expect_state="canary")
    assert _states(conn) == {"base": "retired", "v1": "stable"}


def test_hold_blocks_the_controller_not_operators(conn: psycopg.Connection) -> None:
    _register(conn, "v1")
    assert registry.hold(conn, actor="alice", reason="investigating")
    assert not registry.hold(conn, actor="bob")
    with pytest.raises(ConcurrentChange, match="held by alice"):
        registry.start_canary(conn, "v1", 0.05, actor="controller", respect_hold=True)
    registry.start_canary(conn, "v1", 0.05, actor="alice")  # operators still can
    with pytest.raises(ConcurrentChange, match="held"):
        registry.promote(conn, "v1", actor="controller", respect_hold=True)
    assert registry.resume(conn, actor="alice")
    registry.promote(conn, "v1", actor="controller", respect_hold=True)
    assert [a.action for a in registry.audit_log(conn) if a.action in ("hold", "resume")] == [
        "hold",
        "resume",
    ]


def test_routing_changes_are_notified(conn: psycopg.Connection, migrated_url: str) -> None:
    with connect(migrated_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {registry.NOTIFY_CHANNEL}")
        _register(conn, "v1")
        registry.start_canary(conn, "v1", 0.25, actor="op")
        registry.promote(conn, "v1", actor="op")
        payloads = [json.loads(n.payload) for n in listener.notifies(timeout=2.0, stop_after=2)]
    assert payloads[0]["canary_version"] == "v1" and payloads[0]["canary_weight"] == 0.25
    assert payloads[-1]["stable_version"] == "v1" and payloads[-1]["canary_version"] is None
    assert payloads[-1]["generation"] == registry.routing_table(conn).generation


def test_concurrent_promotes_keep_exactly_one_stable(
    conn: psycopg.Connection, migrated_url: str
) -> None:
    """Eight operators promote eight different candidates at once, each expecting its
    version to still be a candidate, while a watcher samples the stable set: never zero or
    two stables; every promote either succeeds (serialized) or gets ConcurrentChange."""
    versions = [f"v{i}" for i in range(8)]
    for v in versions:
        _register(conn, v)
    barrier = threading.Barrier(len(versions) + 1)
    outcomes: dict[str, str] = {}
    stop = threading.Event()
    stable_counts: list[int] = []

    def promote(version: str) -> None:
        with connect(migrated_url, autocommit=True) as c:
            barrier.wait()
            try:
                registry.promote(c, version, actor=f"op-{version}", expect_state="candidate")
                outcomes[version] = "promoted"
            except ConcurrentChange:
                outcomes[version] = "conflict"

    def watch() -> None:
        with connect(migrated_url, autocommit=True) as c:
            barrier.wait()
            while not stop.is_set():
                row = c.execute(
                    "SELECT count(*) FROM policy_versions WHERE state = 'stable'"
                ).fetchone()
                stable_counts.append(row[0])  # type: ignore[index]  # count(*) always returns a row

    threads = [threading.Thread(target=promote, args=(v,)) for v in versions]
    watcher = threading.Thread(target=watch)
    for t in [*threads, watcher]:
        t.start()
    for t in threads:
        t.join(30)
    stop.set()
    watcher.join(30)
    assert len(outcomes) == len(versions)
    assert stable_counts and set(stable_counts) == {1}
    states = _states(conn)
    assert list(states.values()).count("stable") == 1
    # Serialized: each promote retired the previous stable, so all of them succeeded.
    assert all(o == "promoted" for o in outcomes.values())
    winner = registry.routing_table(conn).stable_version
    assert states[winner] == "stable"
    promotes = [a for a in registry.audit_log(conn) if a.action == "promote"]
    assert promotes[-1].version == winner and len(promotes) == len(versions)


def test_racing_promote_of_the_same_canary_has_one_winner(
    conn: psycopg.Connection, migrated_url: str
) -> None:
    """Operator and controller promote the same canary at once; each says it expects a
    canary. One wins, the other gets ConcurrentChange; one audit 'promote' row."""
    _register(conn, "v1")
    registry.start_canary(conn, "v1", 0.5, actor="controller")
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def promote(actor: str) -> None:
        with connect(migrated_url, autocommit=True) as c:
            barrier.wait()
            try:
                registry.promote(c, "v1", actor=actor, expect_state="canary")
                outcomes.append("promoted")
            except ConcurrentChange:
                outcomes.append("conflict")

    threads = [threading.Thread(target=promote, args=(f"a{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["conflict"] * 3 + ["promoted"]
    assert len([a for a in registry.audit_log(conn) if a.action == "promote"]) == 1


def test_errors_are_registry_errors(conn: psycopg.Connection) -> None:
    _register(conn, "v1")
    with pytest.raises(registry.VersionExists):
        _register(conn, "v1")
    with pytest.raises(RegistryError):
        registry.register_candidate(conn, "bad name!", "/a", actor="x")
    assert set(_states(conn)) == {"base", "v1"}
    assert set(STATES) >= set(_states(conn).values())


def test_policy_cli(migrated_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with connect(migrated_url, autocommit=True) as c:
        _register(c, "v1")
    base = ["--database-url", migrated_url, "--actor", "alice"]
    assert policy_cli.main(["canary", "v1", "--weight", "0.1", "--reason", "try", *base]) == 0
    assert policy_cli.main(["canary", "v1", "--weight", "0.3", *base]) == 0
    assert policy_cli.main(["hold", "--reason", "look", *base]) == 0
    assert policy_cli.main(["promote", "v1", "--expect", "candidate", *base]) == 1
    assert "not candidate as expected" in capsys.readouterr().err
    assert policy_cli.main(["promote", "v1", "--reason", "good", *base]) == 0
    assert policy_cli.main(["resume", *base]) == 0
    assert policy_cli.main(["rollback", "--reason", "oops", *base]) == 0
    capsys.readouterr()
    assert policy_cli.main(["list", "--json", *base]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["routing"]["stable"] == "base"
    assert {v["version"]: v["state"] for v in listing["versions"]} == {
        "base": "stable",
        "v1": "rolled_back",
    }
    assert policy_cli.main(["show", "v1", *base]) == 0
    out = capsys.readouterr().out
    assert "alice" in out and "good" in out and "oops" in out
    assert policy_cli.main(["show", "nope", *base]) == 1
