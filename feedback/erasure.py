"""Erase one user's data, and purge rows older than a retention period.

Its one job: take rows out of the feedback tables for privacy reasons, keeping the A/B
counters exact and making sure the ingestor cannot bring the rows back.

:func:`erase_user` (``alignloop data delete --user U``, ``DELETE /admin/users/{user}``),
in ONE transaction:

1. take the ingestor's write lock (:data:`feedback.ingest.writer.WRITE_LOCK_KEY`), so the
   erasure and ingestor batches are serialised: a batch in flight commits first and its
   rows are then erased here; a batch that starts after waits, and its statements (READ
   COMMITTED: each sees what committed before it began) see the tombstone and drop the
   user's events (see :func:`feedback.ingest.writer.write_batch`). Either way the erasure
   wins;
2. the user's interactions, with everything that hangs on them: their answers
   (``interaction_choices``), every rating of those answers (``feedback_events``,
   ``feedback_current``), *other users' ratings included* (the answer they rated is gone),
   and every preference naming one of them;
3. the user's own ratings of other answers and the user's own preferences;
4. ``policy_stats`` minus exactly what was removed
   (:func:`feedback.ab_counters.subtract_removed`);
5. a tombstone (``user_tombstones``: the sha256 of the stored user id, when, by whom, why)
   and the erased answers' response ids (``erased_responses``), which the writer checks in
   every later batch.

User ids may be stored as keyed hashes (:mod:`feedback.user_ids`): the operator still types
the id serving received; erasure hashes it with the same key (and also looks for the raw id,
for rows stored before the key was configured).

It returns how many rows it deleted per table. Datasets are computed from the tables as of a
watermark (:mod:`feedback.datasets`), so no later export or training round can contain the
erased rows; files already exported, and models already trained on them, are outside the
database (docs/feedback.md, "Privacy").

:func:`purge_older_than` (``alignloop data purge``, and the ingestor every hour when
``ALIGNLOOP_RETENTION_DAYS`` is set) deletes interactions, ratings and preferences that
occurred before the cut-off, with the same counter bookkeeping, in chunks of
``chunk`` rows per table and transaction, so ingestion is held up for one chunk at a time.
An interaction goes with every rating and preference of it, however recent.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg

from feedback import ab_counters
from feedback.ingest.writer import WRITE_LOCK_KEY
from feedback.user_ids import UserIds

TABLES = (
    "interactions",
    "interaction_choices",
    "feedback_events",
    "feedback_current",
    "preferences",
)

# Session scratch tables of one removal, emptied at commit (created once per connection).
_SCRATCH = """
CREATE TEMP TABLE IF NOT EXISTS doomed_responses (response_id text PRIMARY KEY)
    ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS removed_answers (policy_version text, answers bigint)
    ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS removed_ratings (
    response_id text, choice_index int, rating text, counted_policy text
) ON COMMIT DELETE ROWS;
"""

_DOOMED = "SELECT response_id FROM doomed_responses"


def user_hash(stored_user_id: str) -> str:
    """What a tombstone keeps of a user id: its hex sha256 (the writer computes the same in
    SQL: ``encode(sha256(convert_to(user_id, 'UTF8')), 'hex')``)."""
    return hashlib.sha256(stored_user_id.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class _Also:
    """Rows to remove besides those hanging on ``doomed_responses``: a condition on
    ``feedback_current``, ``feedback_events`` and ``preferences`` each."""

    current: str
    events: str
    preferences: str


def _begin(conn: psycopg.Connection) -> None:
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK_KEY,))
    conn.execute(_SCRATCH.encode())


def _remove(conn: psycopg.Connection, also: _Also, params: dict[str, object]) -> dict[str, int]:
    """Steps 2-4 of the module docstring for the interactions in ``doomed_responses`` and
    the rows ``also`` names; inside the caller's transaction, after :func:`_begin`."""
    n: dict[str, int] = {}
    conn.execute(
        "INSERT INTO removed_answers"
        " SELECT i.policy_version, count(c.choice_index) FROM interactions i"
        " JOIN doomed_responses d USING (response_id)"
        " LEFT JOIN interaction_choices c USING (response_id) GROUP BY 1"
    )
    cur = conn.execute(
        "WITH gone AS (DELETE FROM feedback_current fc"
        f" WHERE fc.response_id IN ({_DOOMED}) OR {also.current}"
        " RETURNING response_id, choice_index, rating, counted_policy)"
        " INSERT INTO removed_ratings SELECT * FROM gone",
        params,
    )
    n["feedback_current"] = cur.rowcount
    row = conn.execute("SELECT coalesce(sum(answers), 0) FROM removed_answers").fetchone()
    n["interaction_choices"] = int(row[0]) if row else 0
    cur = conn.execute(f"DELETE FROM interactions WHERE response_id IN ({_DOOMED})")
    n["interactions"] = cur.rowcount
    ab_counters.subtract_removed(conn)
    cur = conn.execute(
        f"DELETE FROM feedback_events fe WHERE fe.response_id IN ({_DOOMED}) OR {also.events}",
        params,
    )
    n["feedback_events"] = cur.rowcount
    cur = conn.execute(
        f"DELETE FROM preferences p WHERE p.chosen_response_id IN ({_DOOMED})"
        f" OR p.rejected_response_id IN ({_DOOMED}) OR {also.preferences}",
        params,
    )
    n["preferences"] = cur.rowcount
    return {t: n[t] for t in TABLES}


_USER_ROWS = _Also(
    current="fc.user_key = ANY(%(users)s)",
    events="fe.user_key = ANY(%(users)s)",
    preferences="p.user_id = ANY(%(users)s)",
)

RAW_USER_IDS = UserIds()


def erase_user(
    conn: psycopg.Connection,
    user: str,
    *,
    actor: str,
    reason: str,
    user_ids: UserIds = RAW_USER_IDS,
) -> dict[str, int]:
    """Erase ``user`` (the id as serving received it: under a key, its rows are found by
    hashing it the way the ingestor did, ``user_ids``) and tombstone it; returns the rows
    deleted per table (:data:`TABLES`). One transaction (the caller's, if one is open).
    Erasing an already erased user deletes what may have slipped in before its tombstone
    (nothing, normally) and keeps the first tombstone. Raises
    :class:`feedback.user_ids.KeyMismatch` rather than look for the wrong ids."""
    if not user:
        raise ValueError("a user id is required (anonymous rows cannot be told apart)")
    if not reason.strip():
        raise ValueError("a reason is required (it is kept with the tombstone)")
    if not actor.strip():
        raise ValueError("an actor is required (it is kept with the tombstone)")
    forms = user_ids.forms(user)
    params: dict[str, object] = {"users": forms}
    with conn.transaction():
        user_ids.check(conn, record=False)
        _begin(conn)
        conn.execute(
            "INSERT INTO doomed_responses SELECT response_id FROM interactions"
            " WHERE user_id = ANY(%(users)s)",
            params,
        )
        counts = _remove(conn, _USER_ROWS, params)
        conn.execute(
            "INSERT INTO erased_responses (response_id) SELECT response_id"
            " FROM doomed_responses ON CONFLICT DO NOTHING"
        )
        for form in forms:
            conn.execute(
                "INSERT INTO user_tombstones (user_hash, actor, reason) VALUES (%s, %s, %s)"
                " ON CONFLICT DO NOTHING",
                (user_hash(form), actor.strip(), reason.strip()),
            )
    return counts


def is_erased(conn: psycopg.Connection, user: str, user_ids: UserIds = RAW_USER_IDS) -> bool:
    """Whether ``user`` has a tombstone."""
    hashes = [user_hash(form) for form in user_ids.forms(user)]
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM user_tombstones WHERE user_hash = ANY(%s))", (hashes,)
    ).fetchone()
    return bool(row and row[0])


def _aged(table: str, alias: str) -> str:
    cond = "WHERE occurred_at < %(cutoff)s LIMIT %(chunk)s"
    return f"{alias}.ctid IN (SELECT ctid FROM {table} {cond})"


_AGED_ROWS = _Also(
    current=_aged("feedback_current", "fc"),
    events=_aged("feedback_events", "fe"),
    preferences=_aged("preferences", "p"),
)


def purge_before(
    conn: psycopg.Connection, cutoff: datetime, *, chunk: int = 5000
) -> dict[str, int]:
    """Delete what occurred before ``cutoff`` (and everything hanging on a deleted
    interaction); returns the rows deleted per table. One transaction per chunk: up to
    ``chunk`` interactions and ``chunk`` rows of each other table, until nothing is left."""
    if chunk < 1:
        raise ValueError("chunk must be at least 1")
    params: dict[str, object] = {"cutoff": cutoff, "chunk": chunk}
    total = dict.fromkeys(TABLES, 0)
    while True:
        with conn.transaction():
            _begin(conn)
            conn.execute(
                "INSERT INTO doomed_responses SELECT response_id FROM interactions"
                " WHERE occurred_at < %(cutoff)s ORDER BY occurred_at LIMIT %(chunk)s",
                params,
            )
            counts = _remove(conn, _AGED_ROWS, params)
        for table, n in counts.items():
            total[table] += n
        if not any(counts.values()):
            return total


def purge_older_than(
    conn: psycopg.Connection, days: float, *, now: datetime | None = None, chunk: int = 5000
) -> dict[str, int]:
    """:func:`purge_before` with the cut-off ``days`` before ``now`` (default: now)."""
    if days <= 0:
        raise ValueError("days must be positive")
    return purge_before(conn, (now or datetime.now(UTC)) - timedelta(days=days), chunk=chunk)
