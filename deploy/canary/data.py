"""Live A/B data for the canary controller: a read-only query over the feedback tables.

Reads ``interactions`` (who was served which policy, when, how fast) and
``feedback_current`` (each user's latest rating of each answer) — both written by the
feedback ingestor (migration 0001) — and never writes anything. The per-policy counters in
``policy_stats`` are not enough for the test: it needs votes *per user* (users are the
clusters of the variance) and *per stratum* (the traffic weight the canary had when the
answer was served).

Which interactions count:

* only answers served under the routed model name (``model = 'alignloop'`` by default):
  a client that pins a version (``model: "base"``) chose its arm itself, so it is not part
  of the randomized comparison and would also skew the sample-ratio test;
* only answers of the canary and of the stable version it is compared with;
* stratum s covers ``[started_at_s + settle, started_at_{s+1})``: right after a weight
  change some replicas still route with the old weight until they see the NOTIFY, so the
  first ``settle_seconds`` of each stratum are left out.

A rating's cluster is the served user (``interactions.user_id``), else the rating user,
else the response itself (an anonymous answer is its own cluster), within the principal
(the API key) it was served to: two products' users named alike are two users.

One principal's votes weigh at most ``principal_cap`` of all votes
(:mod:`feedback.principal_weights`): a key that floods ratings through many user ids has
its users' votes scaled down together, so it cannot move a decision by itself; the SRM
test's user counts are not weighted (routing, not voting, is what it checks).

The sample-ratio test counts distinct users, not requests (routing is sticky per user, so
one heavy user would move thousands of requests into one arm): each user once, in the
stratum of its *first* routed interaction since the canary started, with the arm it was
served then (:mod:`deploy.canary.stats`, point 5, says why only the first). A user first
seen in a settle window is not counted at all (the weight it was routed with is
uncertain), nor is it counted later. Interactions without a user are left out: serving
routes them by API key or client address, which the interaction does not record.

Adapter health: ``adapter_load_failures`` (migration 0004, filled by the ingestor from
serving's ``AdapterLoadFailed`` events) counted for the canary version since its canary
start, by the replica's ``occurred_at``. Failures from an earlier canary run of the same
version do not count; the replica and Postgres clocks are assumed to agree to well within
the time a replica takes to notice a routing change and load the adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import numpy as np
import psycopg

from deploy.canary.stats import CANARY, Health, Observations
from feedback.principal_weights import principal_weights

_VOTES = """
WITH strata AS (
    SELECT * FROM unnest(%(stratum)s::int[], %(lo)s::timestamptz[], %(hi)s::timestamptz[])
        AS s(stratum, lo, hi)
), routed AS (
    SELECT i.response_id, i.user_id, i.principal, s.stratum,
           (i.policy_version = %(canary)s)::int AS arm
    FROM interactions i
    JOIN strata s ON i.occurred_at >= s.lo AND i.occurred_at < s.hi
    WHERE i.policy_version IN (%(canary)s, %(stable)s) AND i.model = %(model)s
)
SELECT coalesce(r.principal, '') AS principal,
       coalesce(r.user_id, nullif(fc.user_key, ''), 'anonymous:' || r.response_id) AS who,
       r.arm, r.stratum, count(*) AS votes, count(*) FILTER (WHERE fc.rating = 'up') AS ups
FROM routed r JOIN feedback_current fc USING (response_id)
GROUP BY 1, 2, 3, 4
"""

_NEW_USERS = """
WITH strata AS (
    SELECT * FROM unnest(%(stratum)s::int[], %(lo)s::timestamptz[], %(hi)s::timestamptz[])
        AS s(stratum, lo, hi)
), first_seen AS (
    SELECT DISTINCT ON (i.user_id) i.user_id, i.occurred_at,
           (i.policy_version = %(canary)s)::int AS arm
    FROM interactions i
    WHERE i.policy_version IN (%(canary)s, %(stable)s) AND i.model = %(model)s
      AND i.user_id IS NOT NULL AND i.occurred_at >= %(since)s
    ORDER BY i.user_id, i.occurred_at, i.response_id
)
SELECT f.arm, s.stratum, count(*)
FROM first_seen f
JOIN strata s ON f.occurred_at >= s.lo AND f.occurred_at < s.hi
GROUP BY 1, 2
"""

_LATENCY = """
SELECT (policy_version = %(canary)s)::int AS arm, count(*),
       percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms)
FROM interactions
WHERE policy_version IN (%(canary)s, %(stable)s) AND model = %(model)s
  AND occurred_at >= %(since)s
GROUP BY 1
"""


# Pinned requests never produce a failure event (serving leaves them out); rows from
# before principals were recorded count as one unknown principal.
_REQUEST_FAILURES = """
SELECT CASE WHEN version = %(canary)s THEN 1 ELSE 0 END AS arm, count(*),
       count(DISTINCT coalesce(principal, ''))
FROM request_failures
WHERE version IN (%(canary)s, %(stable)s) AND occurred_at >= %(since)s
  AND coalesce(arm, '') <> 'pinned'
GROUP BY 1
"""

_ADAPTER_FAILURES = """
SELECT count(*) FROM adapter_load_failures
WHERE version = %(canary)s AND occurred_at >= %(since)s
"""


def _weighted_votes(
    rows: Sequence[tuple[str, str, int, int, int, int]], n_strata: int, principal_cap: float
) -> tuple[np.ndarray, np.ndarray]:
    """Votes and ups per (user, arm, stratum) from ``_VOTES`` rows, each principal's scaled
    by its weight (:func:`feedback.principal_weights.principal_weights`)."""
    users = {key: i for i, key in enumerate(sorted({(row[0], row[1]) for row in rows}))}
    per_principal: dict[str, float] = {}
    for principal, _, _, _, n, _ in rows:
        per_principal[principal] = per_principal.get(principal, 0.0) + n
    weight = principal_weights(per_principal, principal_cap)
    votes = np.zeros((len(users), 2, n_strata))
    ups = np.zeros_like(votes)
    for principal, who, arm, stratum, n, n_up in rows:
        votes[users[principal, who], arm, stratum] = n * weight[principal]
        ups[users[principal, who], arm, stratum] = n_up * weight[principal]
    return votes, ups


def load_observations(
    conn: psycopg.Connection,
    canary: str,
    stable: str,
    strata: Sequence[tuple[int, int, float, datetime]],
    now: datetime,
    *,
    model_name: str = "alignloop",
    settle_seconds: float = 30.0,
    principal_cap: float = 1.0,
) -> Observations:
    """Votes per (user, arm, stratum), distinct users by first appearance (for the SRM
    test), and the guardrails' health of one canary.

    ``strata``: the canary's (stratum, stage, weight, started_at) rows in order, as
    :func:`deploy.policies.registry.canary_strata` returns them. Adapter load failures and
    server-side request failures (serving's ``RequestFailed`` events) are counted since the
    first stratum's start (the canary start), with how many distinct principals they came
    from; a failed request counts as a request too."""
    if not strata:
        empty = np.zeros((0, 2, 0))
        return Observations(empty, empty, np.zeros((2, 0)), np.zeros(0))
    settle = timedelta(seconds=settle_seconds)
    starts = [row[3] for row in strata]
    params = {
        "stratum": list(range(len(strata))),
        "lo": [start + settle for start in starts],
        "hi": [*starts[1:], now + timedelta(days=365)],
        "canary": canary,
        "stable": stable,
        "model": model_name,
        "since": starts[0],
    }
    votes, ups = _weighted_votes(
        conn.execute(_VOTES, params).fetchall(), len(strata), principal_cap
    )
    new_users = np.zeros((2, len(strata)))
    for arm, stratum, n in conn.execute(_NEW_USERS, params).fetchall():
        new_users[arm, stratum] = n
    requests = [0, 0]
    p95 = [0.0, 0.0]
    for arm, n, latency in conn.execute(_LATENCY, params).fetchall():
        requests[arm], p95[arm] = int(n), float(latency or 0.0)
    failures = conn.execute(_ADAPTER_FAILURES, params).fetchone()
    assert failures is not None
    errors = [0, 0]
    principals = [0, 0]
    for arm, n, who in conn.execute(_REQUEST_FAILURES, params).fetchall():
        errors[arm], principals[arm] = int(n), int(who)
    requests = [ok + failed for ok, failed in zip(requests, errors, strict=True)]
    health = Health(
        requests=(requests[0], requests[CANARY]),
        errors_5xx=(errors[0], errors[CANARY]),
        failing_principals=(principals[0], principals[CANARY]),
        latency_p95_ms=(p95[0], p95[CANARY]) if all(requests) else None,
        adapter_load_failures=int(failures[0]),
    )
    weights = np.array([row[2] for row in strata], dtype=np.float64)
    return Observations(votes, ups, new_users, weights, health)
