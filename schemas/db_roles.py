"""Who may do what in Postgres: the least privileges of each component's database role.

Every component can connect as its own role (docs/deploy.md, "Database roles"): a NOLOGIN
group role per component holds the privileges below, operators make LOGIN roles in those
groups, and only the owner role (the one that ran the migrations, owner of every table) may
change the schema. :func:`feedback.db.apply_grants` turns this table into exact GRANTs
(everything else revoked) and :func:`feedback.db.migrate` re-applies it after each migration
it runs, so a new table gets its grants where it is created.

``GRANTS`` is the one decision per table: table -> component -> privileges. A table no
component may touch is listed with an empty mapping (the owner alone uses it), so a
migration that adds a table without a decision fails a test
(tests/unit/schemas/test_db_roles.py) instead of leaving the table unreachable or open.

No privilege is needed for the rest of what the components do: advisory locks, LISTEN /
NOTIFY (the routing trigger notifies as whoever updates the row), temporary tables (granted
to PUBLIC on every database unless a DBA revoked it), and the trigger functions of 0003 (a
trigger runs without EXECUTE; they read policy_versions, policy_routing and
policy_transitions as the writer, who therefore holds SELECT on them). Cascaded deletes run
as the table owner, so deleting interactions needs no DELETE on interaction_choices.
Inserting into a table with a ``bigserial`` column needs USAGE on its sequence, which
:func:`feedback.db.apply_grants` grants with INSERT.
"""

from __future__ import annotations

import re
from typing import Literal

Component = Literal["serving", "ingest", "trainer", "controller"]

COMPONENTS: tuple[Component, ...] = ("serving", "ingest", "trainer", "controller")

# Which process connects as which role (each reads ALIGNLOOP_DATABASE_URL from its own env).
PROCESSES: dict[str, str] = {
    "serving": "alignloop serve (reads the routing table and the policy versions' adapters)",
    "ingest": "alignloop ingest (writes the feedback tables; retention purge: data purge)",
    "trainer": "alignloop train ..., alignloop reward, alignloop data export",
    "controller": "alignloop canary, alignloop admin (admin API, console), alignloop policy, "
    "alignloop data delete",
}

PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE")
# One privilege, on the whole table or on some columns: "UPDATE (updated_at)".
_PRIVILEGE = re.compile(r"^(SELECT|INSERT|UPDATE|DELETE)( \([a-z_]+(, [a-z_]+)*\))?$")
_TOP_LEVEL_COMMA = re.compile(r",\s*(?![^()]*\))")

_ALL_READ: dict[Component, str] = {c: "SELECT" for c in COMPONENTS}

# table -> component -> privileges (comma separated, from PRIVILEGES). The owner has all.
GRANTS: dict[str, dict[Component, str]] = {
    # feedback.db.migrate reads it in every process to see whether anything is pending.
    "schema_migrations": _ALL_READ,
    # --- the feedback store (0001, 0007, 0011): the ingestor writes, erasure and retention
    # delete, the trainer and the canary read.
    "interactions": {
        "ingest": "SELECT, INSERT, DELETE",
        "trainer": "SELECT",
        "controller": "SELECT, DELETE",
    },
    "interaction_choices": {
        "ingest": "SELECT, INSERT",
        "trainer": "SELECT",
        "controller": "SELECT",
    },
    "feedback_events": {
        "ingest": "SELECT, INSERT, DELETE",
        "trainer": "SELECT",
        "controller": "SELECT, DELETE",
    },
    "feedback_current": {
        "ingest": "SELECT, INSERT, UPDATE, DELETE",
        "trainer": "SELECT",
        "controller": "SELECT, DELETE",
    },
    "preferences": {
        "ingest": "SELECT, INSERT, DELETE",
        "trainer": "SELECT",
        "controller": "SELECT, DELETE",
    },
    # The A/B counters: the ingestor's batches add, an erasure (admin API) subtracts.
    "policy_stats": {"ingest": "SELECT, INSERT, UPDATE", "controller": "SELECT, INSERT, UPDATE"},
    # When each ingest batch committed (0013): the ingestor stamps it (and each stamp deletes
    # the day-old ones), benchmarks read it.
    "ingest_commits": {"ingest": "SELECT, INSERT, UPDATE, DELETE"},
    # --- health events from serving replicas, through Kafka (0004, 0005)
    # (ON CONFLICT (event_id) reads the arbiter index's column: SELECT.)
    "adapter_load_failures": {"ingest": "SELECT, INSERT", "controller": "SELECT"},
    "request_failures": {"ingest": "SELECT, INSERT", "controller": "SELECT"},
    # --- erasure (0010): the admin API erases, the ingestor drops what erased users send.
    "user_tombstones": {"ingest": "SELECT", "controller": "SELECT, INSERT"},
    "erased_responses": {"ingest": "SELECT, INSERT", "controller": "SELECT, INSERT"},
    "user_id_keying": {"ingest": "SELECT, INSERT", "controller": "SELECT"},
    # --- training (0002, 0006, 0008)
    "reward_models": {"trainer": "SELECT, INSERT, UPDATE", "controller": "SELECT"},
    "training_rounds": {"trainer": "SELECT, INSERT, UPDATE", "controller": "SELECT"},
    "training_steps": {"trainer": "SELECT, INSERT, UPDATE", "controller": "SELECT"},
    # The console asks for a round, the training loop takes the request.
    "round_requests": {"trainer": "SELECT, UPDATE", "controller": "SELECT, INSERT"},
    # --- the policy registry (0003): serving reads, the trainer registers candidates (and
    # audits that), the controller and operators move states and routing.
    "policy_transitions": {"trainer": "SELECT", "controller": "SELECT"},
    "policy_versions": {
        "serving": "SELECT",
        "trainer": "SELECT, INSERT",
        "controller": "SELECT, UPDATE",
    },
    # Registering a candidate locks the routing row (SELECT ... FOR UPDATE, to serialise with
    # every registry change), which needs an UPDATE privilege: the trainer's is on
    # updated_at alone, and an update of it only bumps the generation (the triggers).
    "policy_routing": {
        "serving": "SELECT",
        "trainer": "SELECT, UPDATE (updated_at)",
        "controller": "SELECT, UPDATE",
    },
    "canary_strata": {"controller": "SELECT, INSERT"},
    "policy_audit": {"trainer": "SELECT, INSERT", "controller": "SELECT, INSERT"},
    # --- one canary controller and one trainer at a time (0009)
    "leases": {"trainer": "SELECT, INSERT, UPDATE", "controller": "SELECT, INSERT, UPDATE"},
    # --- the group roles the grants go to (0012): the owner's bookkeeping alone.
    "db_roles": {},
}


def privileges(table: str, component: Component) -> tuple[str, ...]:
    """The privileges ``component`` holds on ``table`` (empty: none), each one validated
    (``SELECT``, ``UPDATE (col, col)``, ...): they are spliced into GRANT statements."""
    text = GRANTS[table].get(component, "")
    words = tuple(p.strip() for p in _TOP_LEVEL_COMMA.split(text) if p.strip())
    bad = [p for p in words if not _PRIVILEGE.match(p)]
    if bad:
        raise ValueError(f"unknown privileges {bad} for {component} on {table}")
    return words


def group_role(prefix: str, component: Component) -> str:
    """The NOLOGIN group role of ``component`` under ``prefix`` (``alignloop_serving``)."""
    return f"{prefix}_{component}"
