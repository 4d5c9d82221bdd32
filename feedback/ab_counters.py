"""Live A/B counters per policy version (the ``policy_stats`` table).

The canary controller compares policies on these numbers, so they must be exact under
redelivery, re-rating and out-of-order arrival. They are maintained *incrementally*, inside
the ingestor's batch transaction, from what that batch actually changed (the scratch tables
``new_interactions`` and ``rating_changes`` filled by
:func:`feedback.ingest.writer.write_batch`):

* ``served``  += number of choices of each interaction actually inserted (a redelivered
  interaction inserts nothing, so counts nothing);
* ``ups`` / ``downs``: a current rating is counted once it can be attributed to a policy,
  i.e. once its interaction is known (``feedback_current.counted_policy``). A rating whose
  interaction has not arrived yet stays pending and is attributed when it does. A counted
  rating that flips (up → down) moves one count from ``ups`` to ``downs``;
* ``rated``   += 1 when an answer gets its first counted rating.

Erasure and the retention purge (:mod:`feedback.erasure`) take rows away; they subtract
exactly what they removed (:func:`subtract_removed`), in their own transaction.

:func:`recount_policy_counts` recomputes the same numbers from scratch; tests compare the
two, and an operator can use it to check a live database.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import psycopg


@dataclass(frozen=True)
class PolicyCounts:
    served: int = 0
    rated: int = 0
    ups: int = 0
    downs: int = 0

    @property
    def up_rate(self) -> float | None:
        """Share of current ratings that are up; None before any rating."""
        total = self.ups + self.downs
        return self.ups / total if total else None

    def to_dict(self) -> dict[str, float | int | None]:
        """The counts and the up rate, as the admin API and ``alignloop policy`` show them."""
        return {**asdict(self), "up_rate": self.up_rate}


def policy_counts(
    conn: psycopg.Connection, versions: Iterable[str] | None = None
) -> dict[str, PolicyCounts]:
    """The counters of the given policy versions (all when None); unknown versions get
    zeros, so a just-started canary reads as 'nothing yet' rather than a missing key."""
    if versions is None:
        rows = conn.execute(
            "SELECT policy_version, served, rated, ups, downs FROM policy_stats"
        ).fetchall()
        return {row[0]: PolicyCounts(*row[1:]) for row in rows}
    wanted = list(versions)
    rows = conn.execute(
        "SELECT policy_version, served, rated, ups, downs FROM policy_stats"
        " WHERE policy_version = ANY(%s)",
        (wanted,),
    ).fetchall()
    found = {row[0]: PolicyCounts(*row[1:]) for row in rows}
    return {v: found.get(v, PolicyCounts()) for v in wanted}


def recount_policy_counts(conn: psycopg.Connection) -> dict[str, PolicyCounts]:
    """The counters recomputed from the stored rows (slow: full scans; for checks)."""
    rows = conn.execute(
        """
        WITH served AS (
            SELECT i.policy_version, count(*) AS served
            FROM interactions i JOIN interaction_choices c USING (response_id)
            GROUP BY 1
        ), ratings AS (
            SELECT i.policy_version,
                   count(DISTINCT (fc.response_id, fc.choice_index)) AS rated,
                   count(*) FILTER (WHERE fc.rating = 'up') AS ups,
                   count(*) FILTER (WHERE fc.rating = 'down') AS downs
            FROM feedback_current fc JOIN interactions i USING (response_id)
            GROUP BY 1
        )
        SELECT policy_version, coalesce(s.served, 0), coalesce(r.rated, 0),
               coalesce(r.ups, 0), coalesce(r.downs, 0)
        FROM served s FULL JOIN ratings r USING (policy_version)
        """
    ).fetchall()
    return {row[0]: PolicyCounts(*row[1:]) for row in rows}


# Every update is "add these deltas"; rows are touched in policy order so two writers
# never lock policy rows in opposite orders.
_ADD_DELTAS = """
    INSERT INTO policy_stats AS ps (policy_version, served, rated, ups, downs)
    SELECT policy_version, sum(served), sum(rated), sum(ups), sum(downs)
    FROM deltas GROUP BY policy_version ORDER BY policy_version
    ON CONFLICT (policy_version) DO UPDATE SET
        served = ps.served + EXCLUDED.served,
        rated = ps.rated + EXCLUDED.rated,
        ups = ps.ups + EXCLUDED.ups,
        downs = ps.downs + EXCLUDED.downs,
        updated_at = now()
"""

_SERVED = (
    """
    WITH deltas AS (
        SELECT policy_version, answers AS served, 0 AS rated, 0 AS ups, 0 AS downs
        FROM new_interactions
    )"""
    + _ADD_DELTAS
)

_FLIPS = (
    """
    WITH deltas AS (
        SELECT counted_policy AS policy_version, 0 AS served, 0 AS rated,
               (new_rating = 'up')::int - (old_rating = 'up')::int AS ups,
               (new_rating = 'down')::int - (old_rating = 'down')::int AS downs
        FROM rating_changes
        WHERE counted_policy IS NOT NULL AND old_rating IS DISTINCT FROM new_rating
    )"""
    + _ADD_DELTAS
)

# Attribute pending ratings whose interaction is now known: the ratings this batch created
# and the older ones waiting for an interaction this batch inserted. All parts of one
# statement see the same snapshot, so `earlier` sees counted_policy *before* this UPDATE.
_ATTRIBUTE = (
    """
    WITH attributed AS (
        UPDATE feedback_current fc SET counted_policy = i.policy_version
        FROM interactions i
        WHERE fc.counted_policy IS NULL
          AND i.response_id = fc.response_id
          AND fc.response_id IN (SELECT response_id FROM new_interactions
                                 UNION SELECT response_id FROM rating_changes)
        RETURNING fc.response_id, fc.choice_index, fc.rating, fc.counted_policy
    ), first_rated AS (
        SELECT DISTINCT a.counted_policy, a.response_id, a.choice_index
        FROM attributed a
        WHERE NOT EXISTS (
            SELECT 1 FROM feedback_current earlier
            WHERE earlier.response_id = a.response_id
              AND earlier.choice_index = a.choice_index
              AND earlier.counted_policy IS NOT NULL)
    ), deltas AS (
        SELECT counted_policy AS policy_version, 0 AS served, 0 AS rated,
               (rating = 'up')::int AS ups, (rating = 'down')::int AS downs
        FROM attributed
        UNION ALL
        SELECT counted_policy, 0, 1, 0, 0 FROM first_rated
    )"""
    + _ADD_DELTAS
)


def apply_batch_changes(conn: psycopg.Connection) -> None:
    """Fold one batch's changes into ``policy_stats``; call inside the batch transaction,
    after :func:`feedback.ingest.writer.write_batch` filled the scratch tables."""
    conn.execute(_SERVED)
    conn.execute(_FLIPS)
    conn.execute(_ATTRIBUTE)


# What erasure or the retention purge removed (the scratch tables ``removed_answers``: the
# answers of each deleted interaction per policy, and ``removed_ratings``: the deleted
# ``feedback_current`` rows), subtracted. Run after the deletes: an answer stops counting as
# rated only when no counted rating of it is left.
_REMOVED = (
    """
    WITH unrated AS (
        SELECT DISTINCT r.counted_policy, r.response_id, r.choice_index
        FROM removed_ratings r
        WHERE r.counted_policy IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM feedback_current fc
            WHERE fc.response_id = r.response_id AND fc.choice_index = r.choice_index
              AND fc.counted_policy IS NOT NULL)
    ), deltas AS (
        SELECT policy_version, -answers AS served, 0 AS rated, 0 AS ups, 0 AS downs
        FROM removed_answers
        UNION ALL
        SELECT counted_policy, 0, 0, -(rating = 'up')::int, -(rating = 'down')::int
        FROM removed_ratings WHERE counted_policy IS NOT NULL
        UNION ALL
        SELECT counted_policy, 0, -1, 0, 0 FROM unrated
    )"""
    + _ADD_DELTAS
)


def subtract_removed(conn: psycopg.Connection) -> None:
    """Take removed rows out of ``policy_stats``; call inside the removing transaction,
    after :mod:`feedback.erasure` filled ``removed_answers`` and ``removed_ratings`` and
    deleted the rows."""
    conn.execute(_REMOVED)
