"""Write one batch of events into Postgres, idempotently: the ingestor's storage step.

Its one job: given a batch of parsed events (any mix of types, redeliveries included),
store each event at most once and fold what actually changed into the A/B counters, inside
the caller's transaction. Kafka delivers at least once; this module is what makes it
exactly once in effect.

:func:`write_batch`, step by step:

1. take the transaction-level advisory lock :data:`WRITE_LOCK_KEY`, so batch transactions
   of all ingestors are serialised (the counters can read "the row before this batch"
   without races, and ``seq`` columns become commit-ordered, which the dataset watermark
   relies on; so are erasures, :mod:`feedback.erasure`, which take the same lock); empty
   the session's scratch tables;
2. deduplicate the batch by ``event_id``;
3. per event type in :data:`_STAGED` (interactions, feedback, preferences): COPY its events
   into a session scratch table ``stage_*``; if any user was ever erased, delete from it the
   events of erased users and the ratings and preferences naming an erased answer (so a
   redelivered or late event cannot bring erased rows back); then ``INSERT … SELECT … ON
   CONFLICT DO NOTHING`` into the real table; the rows actually inserted (none for a redelivery) are
   the new ones, and the follow-up statements (answer choices, the current rating) see
   only those;
4. per event type in :data:`_UNNESTED` (adapter load failures, request failures): one
   ``INSERT … SELECT FROM unnest(…) ON CONFLICT DO NOTHING``;
5. fold the batch's changes into ``policy_stats``
   (:func:`feedback.ab_counters.apply_batch_changes`);
6. stamp the transaction in ``ingest_commits`` with ``clock_timestamp()`` (the last
   statement, so the stamp is the time just before COMMIT: migration 0013; ``now()`` would
   be the transaction's start);
7. return how many rows were new per type (:class:`BatchResult`).

``PolicyCandidate`` events are valid and accepted but not stored: the registry row is their
record. Commit (or rollback) is the caller's; :func:`store_events` is the one-transaction
wrapper. The transaction must be READ COMMITTED (the default): its statements after the
lock must see an erasure that committed while it waited, which a REPEATABLE READ snapshot
taken at the lock statement would not. A connection must be prepared once with
:func:`prepare_session` (its scratch tables).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from feedback import ab_counters
from feedback.user_ids import UserIds
from schemas.events import (
    AdapterLoadFailed,
    AnyEvent,
    FeedbackSubmitted,
    InteractionLogged,
    LoggedMessage,
    PreferenceSubmitted,
    RequestFailed,
    prompt_hash,
)

RAW_USER_IDS = UserIds()  # user ids stored as received (no key configured)
WRITE_LOCK_KEY = 0x616C_696E  # "alin": serialises batch transactions of all ingestors

# Session-private scratch tables, emptied at every commit. stage_*: the batch as received;
# new_interactions / new_feedback / rating_changes: what the batch actually changed.
_SCRATCH = """
CREATE TEMP TABLE IF NOT EXISTS stage_interactions (
    event_id uuid, response_id text, user_id text, policy_version text, model text,
    messages jsonb, prompt_text text, prompt_hash text, prompt_tokens int,
    completion_tokens int, latency_ms double precision, ttft_ms double precision,
    stream boolean, sampling jsonb, choices jsonb, occurred_at timestamptz,
    endpoint text, prompt text, tool_turns boolean, principal text
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_feedback (
    event_id uuid, feedback_id uuid, response_id text, choice_index int, user_id text,
    user_key text, rating text, comment text, occurred_at timestamptz, principal text
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_preferences (
    event_id uuid, preference_id uuid, user_id text, chosen_response_id text,
    rejected_response_id text, messages jsonb, chosen text, rejected text,
    occurred_at timestamptz, principal text
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS new_interactions (
    response_id text, event_id uuid, policy_version text, answers int
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS new_feedback (
    event_id uuid, feedback_id uuid, response_id text, choice_index int, user_id text,
    user_key text, rating text, comment text, occurred_at timestamptz
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS rating_changes (
    response_id text, choice_index int, user_key text, old_rating text, new_rating text,
    counted_policy text
) ON COMMIT DELETE ROWS;
"""
_SCRATCH_TABLES = (
    "stage_interactions, stage_feedback, stage_preferences, "
    "new_interactions, new_feedback, rating_changes"
)

# One row per interaction actually inserted goes to new_interactions: this statement's row
# count is the number of new interactions.
_INSERT_INTERACTIONS = """
WITH ins AS (
    INSERT INTO interactions (response_id, event_id, user_id, policy_version, model, messages,
        prompt_text, prompt_hash, prompt_tokens, completion_tokens, latency_ms, ttft_ms,
        stream, sampling, occurred_at, endpoint, prompt, tool_turns, principal)
    SELECT DISTINCT ON (response_id) response_id, event_id, user_id, policy_version, model,
        messages, prompt_text, prompt_hash, prompt_tokens, completion_tokens, latency_ms,
        ttft_ms, stream, sampling, occurred_at, endpoint, prompt, tool_turns, principal
    FROM stage_interactions
    ORDER BY response_id, occurred_at, event_id
    ON CONFLICT DO NOTHING
    RETURNING response_id, event_id, policy_version
)
INSERT INTO new_interactions (response_id, event_id, policy_version, answers)
SELECT ins.response_id, ins.event_id, ins.policy_version, jsonb_array_length(s.choices)
FROM ins JOIN stage_interactions s USING (event_id)
"""

_INSERT_CHOICES = """
INSERT INTO interaction_choices (response_id, choice_index, text, finish_reason,
                                 completion_tokens, tool_calls)
SELECT n.response_id, (c ->> 'index')::int, c ->> 'text', c ->> 'finish_reason',
       (c ->> 'completion_tokens')::int,
       nullif(coalesce(c -> 'tool_calls', '[]'::jsonb), '[]'::jsonb)
FROM new_interactions n
JOIN stage_interactions s USING (event_id)
CROSS JOIN LATERAL jsonb_array_elements(s.choices) AS c
ON CONFLICT DO NOTHING
"""

# Its row count is the number of new feedback events (one new_feedback row each).
_INSERT_FEEDBACK = """
WITH ins AS (
    INSERT INTO feedback_events (event_id, feedback_id, response_id, choice_index, user_id,
                                 user_key, rating, comment, occurred_at, principal)
    SELECT event_id, feedback_id, response_id, choice_index, user_id, user_key, rating,
           comment, occurred_at, principal
    FROM stage_feedback
    ORDER BY occurred_at, event_id
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id, feedback_id, response_id, choice_index, user_id, user_key, rating,
              comment, occurred_at
)
INSERT INTO new_feedback SELECT * FROM ins
"""

# Latest wins, whatever the arrival order: the row is replaced only by a strictly newer
# event ((occurred_at, event_id) order, so ties resolve the same way everywhere). `before`
# reads the pre-image (same snapshot as the upsert), which the counters need for flips.
_UPSERT_CURRENT = """
WITH latest AS (
    SELECT DISTINCT ON (response_id, choice_index, user_key) *
    FROM new_feedback
    ORDER BY response_id, choice_index, user_key, occurred_at DESC, event_id DESC
), before AS (
    SELECT fc.response_id, fc.choice_index, fc.user_key, fc.rating
    FROM feedback_current fc JOIN latest USING (response_id, choice_index, user_key)
), upserted AS (
    INSERT INTO feedback_current AS fc (response_id, choice_index, user_key, user_id, rating,
                                        event_id, feedback_id, comment, occurred_at)
    SELECT response_id, choice_index, user_key, user_id, rating, event_id, feedback_id,
           comment, occurred_at
    FROM latest
    ON CONFLICT (response_id, choice_index, user_key) DO UPDATE SET
        user_id = EXCLUDED.user_id, rating = EXCLUDED.rating, event_id = EXCLUDED.event_id,
        feedback_id = EXCLUDED.feedback_id, comment = EXCLUDED.comment,
        occurred_at = EXCLUDED.occurred_at, updated_at = now()
    WHERE (EXCLUDED.occurred_at, EXCLUDED.event_id) > (fc.occurred_at, fc.event_id)
    RETURNING fc.response_id, fc.choice_index, fc.user_key, fc.rating, fc.counted_policy
)
INSERT INTO rating_changes (response_id, choice_index, user_key, old_rating, new_rating,
                            counted_policy)
SELECT u.response_id, u.choice_index, u.user_key, b.rating, u.rating, u.counted_policy
FROM upserted u LEFT JOIN before b USING (response_id, choice_index, user_key)
"""

_INSERT_PREFERENCES = """
INSERT INTO preferences (event_id, preference_id, user_id, chosen_response_id,
                         rejected_response_id, messages, chosen, rejected, occurred_at,
                         principal)
SELECT event_id, preference_id, user_id, chosen_response_id, rejected_response_id, messages,
       chosen, rejected, occurred_at, principal
FROM stage_preferences
ORDER BY occurred_at, event_id
ON CONFLICT (event_id) DO NOTHING
"""

# Erased users (migration 0010, feedback/erasure.py): before the INSERTs, the staged events
# of a tombstoned user, and ratings and preferences naming an erased answer, are deleted
# from the scratch tables. Checked only when some tombstone exists (one cheap query per
# batch otherwise). Each statement's result is how many staged events it dropped.
_ANY_TOMBSTONE = "SELECT EXISTS (SELECT 1 FROM user_tombstones)"
_TOMBSTONED = (
    "encode(sha256(convert_to({}, 'UTF8')), 'hex') IN (SELECT user_hash FROM user_tombstones)"
)
_ERASED_RESPONSE = "{} IN (SELECT response_id FROM erased_responses)"

# An erased user's interaction arriving late: remembered as erased, and ratings or
# preferences of it that arrived before it (other users', pending) are deleted with it.
_DROP_INTERACTIONS = f"""
WITH dropped AS (
    DELETE FROM stage_interactions s
    WHERE s.user_id IS NOT NULL AND {_TOMBSTONED.format("s.user_id")}
    RETURNING s.response_id
), remembered AS (
    INSERT INTO erased_responses (response_id) SELECT DISTINCT response_id FROM dropped
    ON CONFLICT DO NOTHING
), events AS (
    DELETE FROM feedback_events f USING dropped d WHERE f.response_id = d.response_id
), pending AS (
    DELETE FROM feedback_current f USING dropped d WHERE f.response_id = d.response_id
), compared AS (
    DELETE FROM preferences p USING dropped d
    WHERE d.response_id IN (p.chosen_response_id, p.rejected_response_id)
)
SELECT count(*) FROM dropped
"""

_DROP_FEEDBACK = f"""
WITH dropped AS (
    DELETE FROM stage_feedback s
    WHERE {_TOMBSTONED.format("s.user_key")} OR {_ERASED_RESPONSE.format("s.response_id")}
    RETURNING 1
)
SELECT count(*) FROM dropped
"""

_DROP_PREFERENCES = f"""
WITH dropped AS (
    DELETE FROM stage_preferences s
    WHERE (s.user_id IS NOT NULL AND {_TOMBSTONED.format("s.user_id")})
       OR {_ERASED_RESPONSE.format("s.chosen_response_id")}
       OR {_ERASED_RESPONSE.format("s.rejected_response_id")}
    RETURNING 1
)
SELECT count(*) FROM dropped
"""

# Step 6. Several write_batch calls in one transaction (the per-event savepoint fallback,
# store_events called in an open transaction) share one row: the last stamp wins.
# The stamps older than a day go in the same statement (an index range scan over the few
# rows that aged out since the last batch), so the table never needs a purge job.
_STAMP_COMMIT = """
WITH expired AS (
    DELETE FROM ingest_commits WHERE committed_at < clock_timestamp() - interval '1 day'
)
INSERT INTO ingest_commits AS ic (xact, committed_at, events)
VALUES (pg_current_xact_id(), clock_timestamp(), %s)
ON CONFLICT (xact) DO UPDATE SET committed_at = EXCLUDED.committed_at,
                                 events = ic.events + EXCLUDED.events
"""

_INSERT_REQUEST_FAILURES = """
INSERT INTO request_failures (event_id, version, status, error, producer, occurred_at,
                              model, arm, principal)
SELECT * FROM unnest(%s::uuid[], %s::text[], %s::int[], %s::text[], %s::text[],
                     %s::timestamptz[], %s::text[], %s::text[], %s::text[])
ORDER BY 6, 1
ON CONFLICT (event_id) DO NOTHING
"""

_INSERT_ADAPTER_FAILURES = """
INSERT INTO adapter_load_failures (event_id, version, adapter_uri, error, producer, occurred_at)
SELECT * FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::text[], %s::text[],
                     %s::timestamptz[])
ORDER BY 6, 1
ON CONFLICT (event_id) DO NOTHING
"""


@dataclass(frozen=True)
class BatchResult:
    """Rows that were new (a fully redelivered batch gives all zeros)."""

    interactions: int
    feedback: int
    preferences: int
    adapter_load_failures: int = 0
    request_failures: int = 0
    erased: int = 0
    """Events dropped because their user, or the answer they name, was erased."""


def _prompt_text(messages: Sequence[LoggedMessage], prompt: str | None = None) -> str:
    if prompt is not None and not messages:
        return prompt
    users = [m.content for m in messages if m.role == "user"]
    return users[-1] if users else (messages[-1].content if messages else "")


def _messages_json(messages: Sequence[LoggedMessage] | None) -> str | None:
    if messages is None:
        return None
    return json.dumps(
        [m.model_dump(mode="json", exclude_none=True) for m in messages], ensure_ascii=False
    )


def _interaction_row(e: InteractionLogged, user: str | None) -> tuple[object, ...]:
    return (
        e.event_id, e.response_id, user, e.policy_version, e.model,
        _messages_json(e.messages), _prompt_text(e.messages, e.prompt),
        prompt_hash(e.messages, e.prompt), e.prompt_tokens, e.completion_tokens,
        e.latency_ms, e.ttft_ms, e.stream, e.sampling.model_dump_json(),
        json.dumps([c.model_dump(mode="json") for c in e.choices]), e.occurred_at,
        e.endpoint, e.prompt, any(m.role == "tool" or m.tool_calls for m in e.messages),
        e.principal,
    )  # fmt: skip


def _feedback_row(e: FeedbackSubmitted, user: str | None) -> tuple[object, ...]:
    return (
        e.event_id, e.feedback_id, e.response_id, e.choice_index, user, user or "",
        e.rating, e.comment, e.occurred_at, e.principal,
    )  # fmt: skip


def _preference_row(e: PreferenceSubmitted, user: str | None) -> tuple[object, ...]:
    return (
        e.event_id, e.preference_id, user, e.chosen_response_id, e.rejected_response_id,
        _messages_json(e.messages), e.chosen, e.rejected, e.occurred_at, e.principal,
    )  # fmt: skip


@dataclass(frozen=True)
class _Staged:
    """An event type stored through a scratch table: its events are COPYed into ``stage``
    (``columns``, one ``row(event, stored user id)`` each); ``insert`` moves the new ones
    into the real table, its row count being how many were new (the :class:`BatchResult` field
    ``result``); ``drop`` runs before it when some user was erased (it removes their staged
    events and returns how many); ``then`` runs after it, on what was new."""

    result: str
    event: type[Any]
    stage: str
    columns: tuple[str, ...]
    row: Callable[[Any, str | None], tuple[object, ...]]
    insert: str
    drop: str
    then: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Unnested:
    """An event type stored with one ``unnest`` statement taking one array per field."""

    result: str
    event: type[Any]
    insert: str
    fields: tuple[str, ...]


_STAGED = (
    _Staged(
        "interactions", InteractionLogged, "stage_interactions",
        ("event_id", "response_id", "user_id", "policy_version", "model", "messages",
         "prompt_text", "prompt_hash", "prompt_tokens", "completion_tokens", "latency_ms",
         "ttft_ms", "stream", "sampling", "choices", "occurred_at", "endpoint", "prompt",
         "tool_turns", "principal"),
        _interaction_row, _INSERT_INTERACTIONS, _DROP_INTERACTIONS, (_INSERT_CHOICES,),
    ),
    _Staged(
        "feedback", FeedbackSubmitted, "stage_feedback",
        ("event_id", "feedback_id", "response_id", "choice_index", "user_id", "user_key",
         "rating", "comment", "occurred_at", "principal"),
        _feedback_row, _INSERT_FEEDBACK, _DROP_FEEDBACK, (_UPSERT_CURRENT,),
    ),
    _Staged(
        "preferences", PreferenceSubmitted, "stage_preferences",
        ("event_id", "preference_id", "user_id", "chosen_response_id",
         "rejected_response_id", "messages", "chosen", "rejected", "occurred_at",
         "principal"),
        _preference_row, _INSERT_PREFERENCES, _DROP_PREFERENCES,
    ),
)  # fmt: skip

_UNNESTED = (
    _Unnested(
        "adapter_load_failures", AdapterLoadFailed, _INSERT_ADAPTER_FAILURES,
        ("event_id", "version", "adapter_uri", "error", "producer", "occurred_at"),
    ),
    _Unnested(
        "request_failures", RequestFailed, _INSERT_REQUEST_FAILURES,
        ("event_id", "version", "status", "error", "producer", "occurred_at", "model", "arm",
         "principal"),
    ),
)  # fmt: skip


def prepare_session(conn: psycopg.Connection) -> None:
    """Create this connection's scratch tables (once per connection)."""
    conn.execute(_SCRATCH.encode())


def write_batch(
    conn: psycopg.Connection, events: Sequence[AnyEvent], user_ids: UserIds = RAW_USER_IDS
) -> BatchResult:
    """Store one batch idempotently and update the counters (steps 1-7 of the module
    docstring), user ids stored as ``user_ids`` says (:mod:`feedback.user_ids`). Call
    inside a transaction on a connection prepared with :func:`prepare_session`; commit is
    the caller's."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK_KEY,))
    conn.execute(f"TRUNCATE {_SCRATCH_TABLES}".encode())  # leftovers of a failed savepoint
    # After the lock: an erasure that committed before it is seen (READ COMMITTED).
    erasures = conn.execute(_ANY_TOMBSTONE).fetchone()
    check_erased = bool(erasures and erasures[0])
    unique = list({e.event_id: e for e in events}.values())
    new: dict[str, int] = {"erased": 0}
    with conn.cursor() as cur:
        for staged in _STAGED:
            batch = [e for e in unique if isinstance(e, staged.event)]
            if not batch:
                new[staged.result] = 0
                continue
            columns = ", ".join(staged.columns)
            with cur.copy(f"COPY {staged.stage} ({columns}) FROM STDIN") as copy:
                for e in batch:
                    copy.write_row(staged.row(e, user_ids.stored(e.user)))
            if check_erased:
                dropped = cur.execute(staged.drop).fetchone()
                new["erased"] += int(dropped[0]) if dropped else 0
            cur.execute(staged.insert)
            new[staged.result] = max(cur.rowcount, 0)
            for statement in staged.then:
                cur.execute(statement)
        for unnested in _UNNESTED:
            batch = [e for e in unique if isinstance(e, unnested.event)]
            if not batch:
                new[unnested.result] = 0
                continue
            cur.execute(unnested.insert, [[getattr(e, f) for e in batch] for f in unnested.fields])
            new[unnested.result] = max(cur.rowcount, 0)
        ab_counters.apply_batch_changes(conn)
        cur.execute(_STAMP_COMMIT, (len(unique),))
    return BatchResult(**new)


def store_events(
    conn: psycopg.Connection, events: Sequence[AnyEvent], user_ids: UserIds = RAW_USER_IDS
) -> BatchResult:
    """One committed batch: ``write_batch`` in its own transaction (tests, backfills)."""
    with conn.transaction():
        return write_batch(conn, events, user_ids)
