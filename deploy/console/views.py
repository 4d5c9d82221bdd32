"""What each console page shows, as JSON: one read-only function per page over Postgres.

The console's browser code draws these and the browser tests check them, so what a page
shows is testable without a browser. Nothing here writes; the console's buttons call the
admin API's commands (:mod:`deploy.ops.admin_api`) and :func:`request_round`.

* :func:`policies` — every version, its live counters, its share of traffic, the audit log;
* :func:`canary` — one canary experiment as the controller saw it, tick by tick: the
  controller records each decision's statistics in the audit log
  (:func:`deploy.policies.registry.record_decision`), so the band's history is read back,
  not recomputed, and shows exactly what the controller acted on;
* :func:`training` — rounds, one round's per-iteration curves, reward models;
* :func:`traffic` — requests, tokens, latency and feedback per minute and per policy, from
  the rows the ingestor wrote (the live process metrics come from :mod:`.scrape`).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from datetime import datetime
from typing import Any

import psycopg

from deploy.policies import registry
from feedback.ab_counters import policy_counts
from trainer.rounds import records as round_records
from trainer.rounds import requests as round_requests

MAX_POINTS = 400  # the canary chart's points: enough for the band's shape, light to draw
TERMINAL = ("stable", "rolled_back", "rejected")


def wilson_interval(ups: int, total: int, z: float = 1.96) -> tuple[float, float] | None:
    """The Wilson score interval of a thumbs-up rate (95 % by default); None without votes.
    Unlike the normal approximation it stays inside [0, 1] and is honest at 0 or all ups."""
    if total <= 0:
        return None
    p = ups / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def thin(points: list[Any], limit: int = MAX_POINTS) -> list[Any]:
    """At most ``limit`` points, evenly spaced, always keeping the first and the last."""
    if len(points) <= limit:
        return points
    step = (len(points) - 1) / (limit - 1)
    return [points[round(i * step)] for i in range(limit)]


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at is not None else None


def _audit_json(entry: registry.AuditEntry) -> dict[str, Any]:
    return {**asdict(entry), "at": _iso(entry.at)}


# --- Policies ------------------------------------------------------------------------------

_PROMOTED = """
SELECT DISTINCT ON (version) version, at FROM policy_audit
WHERE to_state = 'stable' ORDER BY version, id DESC
"""

_SERVED_RECENTLY = """
SELECT policy_version, count(*) FROM interactions
WHERE occurred_at >= now() - make_interval(mins => %s) GROUP BY 1
"""


def routed_share(routing: registry.Routing, version: str) -> float:
    """The share of routed traffic the routing table sends to ``version`` (pinned requests
    choose their version themselves and are not part of it)."""
    if version == routing.canary_version:
        return routing.canary_weight
    if version == routing.stable_version:
        return 1.0 - routing.canary_weight
    return 0.0


def policies(conn: psycopg.Connection, *, recent_minutes: int = 15) -> dict[str, Any]:
    """Every version (newest first) with its lineage, times, live counters (thumbs-up rate
    with its Wilson interval), routed share and measured share of the last minutes'
    answers; the routing table; the newest audit entries."""
    routing = registry.routing_table(conn)
    versions = registry.list_versions(conn)
    live = policy_counts(conn, [v.version for v in versions])
    promoted = dict(conn.execute(_PROMOTED).fetchall())
    served = dict(conn.execute(_SERVED_RECENTLY, (recent_minutes,)).fetchall())
    total_served = sum(served.values())
    rows = []
    for v in reversed(versions):
        counts = live[v.version]
        rows.append(
            {
                **{k: val for k, val in asdict(v).items() if k not in ("metrics",)},
                "created_at": _iso(v.created_at),
                "state_changed_at": _iso(v.state_changed_at),
                "promoted_at": _iso(promoted.get(v.version)),
                "routed_share": routed_share(routing, v.version),
                "served_share": served.get(v.version, 0) / total_served if total_served else None,
                "live": counts.to_dict(),
                "up_rate_interval": wilson_interval(counts.ups, counts.ups + counts.downs),
                "offline": v.metrics.get("evaluation", {}),
            }
        )
    routing_json = {
        **asdict(routing),
        **{k: _iso(getattr(routing, k)) for k in ("canary_started_at", "stage_started_at")},
        "updated_at": _iso(routing.updated_at),
    }
    return {
        "versions": rows,
        "routing": routing_json,
        "recent_minutes": recent_minutes,
        "audit": [_audit_json(e) for e in reversed(registry.audit_log(conn, limit=20))],
    }


def audit(
    conn: psycopg.Connection, *, actor: str | None = None, limit: int = 20
) -> list[dict[str, Any]]:
    """The newest audit entries (of one actor, e.g. the console's operator), newest first."""
    rows = conn.execute(
        "SELECT id, at, actor, action, version, from_state, to_state, reason, statistics,"
        " routing_generation FROM policy_audit"
        " WHERE %(a)s::text IS NULL OR actor = %(a)s ORDER BY id DESC LIMIT %(n)s",
        {"a": actor, "n": limit},
    ).fetchall()
    return [_audit_json(registry.AuditEntry(*row)) for row in rows]


# --- Canary --------------------------------------------------------------------------------


def _experiment_version(conn: psycopg.Connection, routing: registry.Routing) -> str | None:
    """The running canary, else the version of the newest canary start."""
    if routing.canary_version is not None:
        return routing.canary_version
    row = conn.execute(
        "SELECT version FROM policy_audit WHERE to_state = 'canary' ORDER BY id DESC LIMIT 1"
    ).fetchone()
    return row[0] if row else None


def _experiment_entries(
    conn: psycopg.Connection, version: str
) -> tuple[list[registry.AuditEntry], registry.AuditEntry | None]:
    """The audit entries of ``version``'s newest canary run, from its start (inclusive),
    and the entry that ended it (None while it runs)."""
    entries = registry.audit_log(conn, version, limit=100_000)
    # A weight change is canary → canary; a start comes from another state.
    starts = [
        i for i, e in enumerate(entries) if e.to_state == "canary" and e.from_state != "canary"
    ]
    if not starts:
        return [], None
    run = entries[starts[-1] :]
    end = next((e for e in run[1:] if e.from_state == "canary" and e.to_state in TERMINAL), None)
    if end is not None:
        run = [e for e in run if e.id <= end.id]
    return run, end


def _point(entry: registry.AuditEntry) -> dict[str, Any]:
    s = entry.statistics or {}
    return {
        "at": _iso(entry.at),
        "action": entry.action.removeprefix("decision:"),
        "estimate": s.get("estimate"),
        "lower": s.get("lower"),
        "upper": s.get("upper"),
        "threshold": s.get("threshold"),
        "stage": s.get("stage"),
        "votes": s.get("votes"),
        "users": s.get("users"),
        "srm_p_value": s.get("srm_p_value"),
    }


def per_stage(decisions: list[registry.AuditEntry]) -> list[dict[str, Any]]:
    """Votes per arm gained in each ramp stage (the cumulative counts at each stage's last
    decision, minus the previous stage's), and the new users per arm the sample-ratio test
    counted in it, from the newest decision's per-stratum counts."""
    last_by_stage: dict[int, dict[str, Any]] = {}
    for entry in decisions:
        s = entry.statistics or {}
        if "stage" in s and "votes" in s:
            last_by_stage[int(s["stage"])] = s
    newest = (decisions[-1].statistics or {}) if decisions else {}
    new_users = newest.get("srm_new_users") or {"stable": [], "canary": []}
    weights = newest.get("strata_weights") or []
    stages, before = [], {"stable": 0, "canary": 0}
    for stage in sorted(last_by_stage):
        s = last_by_stage[stage]
        votes = {arm: int(s["votes"][arm]) - before[arm] for arm in ("stable", "canary")}
        before = {arm: int(s["votes"][arm]) for arm in ("stable", "canary")}
        stages.append(
            {
                "stage": stage,
                "weight": weights[stage] if stage < len(weights) else None,
                "votes": votes,
                "new_users": {
                    arm: (new_users[arm][stage] if stage < len(new_users[arm]) else None)
                    for arm in ("stable", "canary")
                },
            }
        )
    return stages


def canary(conn: psycopg.Connection, version: str | None = None) -> dict[str, Any]:
    """One canary experiment (the running one by default, else the newest): its band over
    time, the threshold, the decision that ended it, votes and users per arm per stage,
    the sample-ratio check, the guardrails and the controller's newest decisions."""
    routing = registry.routing_table(conn)
    version = version or _experiment_version(conn, routing)
    if version is None:
        return {"experiment": None}
    run, end = _experiment_entries(conn, version)
    if not run:
        return {"experiment": None, "version": version}
    decisions = [e for e in run if e.action.startswith("decision:") and e.statistics]
    newest = (decisions[-1].statistics or {}) if decisions else {}
    return {
        "experiment": {
            "version": version,
            "compared_with": routing.stable_version if end is None else None,
            "started_at": _iso(run[0].at),
            "started_by": run[0].actor,
            "running": end is None and routing.canary_version == version,
            "weight": routing.canary_weight if routing.canary_version == version else None,
            "held": routing.held,
            "held_reason": routing.held_reason,
        },
        "points": thin([_point(e) for e in decisions]),
        "ticks": len(decisions),
        "threshold": newest.get("threshold"),
        "test": newest.get("test"),
        "alpha": newest.get("alpha"),
        "outcome": None if end is None else _audit_json(end),
        "stages": per_stage(decisions),
        "srm": {
            "p_value": newest.get("srm_p_value"),
            "threshold": newest.get("srm_threshold"),
            "new_users": newest.get("srm_new_users"),
        },
        "guardrails": {
            "breaches": newest.get("guardrail_breaches", []),
            "health": newest.get("health"),
        },
        "decisions": [_audit_json(e) for e in reversed(run[-12:])],
    }


# --- Training ------------------------------------------------------------------------------

CURVES = (
    "reward_raw",
    "reward_normalized",
    "kl_ref",
    "kl_coef",
    "clip_fraction",
    "entropy",
    "response_length",
    "explained_variance",
)


def _round_json(r: round_records.TrainingRound) -> dict[str, Any]:
    data = r.to_json()
    data["iterations_planned"] = r.config.get("iterations")
    data["evaluation"] = r.metrics.get("evaluation")
    return data


def curves(steps: list[tuple[int, dict[str, Any]]]) -> dict[str, list[Any]]:
    """Per-iteration series of :data:`CURVES` (None where an iteration lacks a value)."""
    series: dict[str, list[Any]] = {"iteration": [i for i, _ in steps]}
    for name in CURVES:
        series[name] = [m.get(name) for _, m in steps]
    return series


_REWARD_MODELS = """
SELECT version, status, kind, parent_version, metrics, reason, created_at
FROM reward_models ORDER BY number DESC LIMIT %s
"""


def training(conn: psycopg.Connection, round_id: int | None = None) -> dict[str, Any]:
    """The newest rounds, one round's curves (``round_id``, else the newest with recorded
    iterations), its offline evaluation and side-by-side answers, reward against KL across
    rounds, the reward-model versions, and the operator's newest round request."""
    rounds = round_records.list_rounds(conn, limit=30)
    chosen = None
    if round_id is not None:
        chosen = next((r for r in rounds if r.id == round_id), None) or round_records.get_round(
            conn, round_id
        )
    steps: list[tuple[int, dict[str, Any]]] = []
    for r in [chosen] if chosen else rounds:
        steps = round_records.steps(conn, r.id)
        if steps or chosen:
            chosen = r
            break
    request = round_requests.last_request(conn)
    reward_models = [
        {
            "version": v,
            "status": status,
            "kind": kind,
            "parent_version": parent,
            "metrics": metrics,
            "reason": reason,
            "created_at": _iso(at),
        }
        for v, status, kind, parent, metrics, reason, at in conn.execute(_REWARD_MODELS, (20,))
    ]
    return {
        "rounds": [_round_json(r) for r in rounds],
        "round": _round_json(chosen) if chosen else None,
        "curves": curves(steps),
        "reward_vs_kl": [
            {
                "round": r.id,
                "status": r.status,
                "reward_gain": (r.metrics.get("evaluation") or {}).get("reward_gain"),
                "kl": (r.metrics.get("evaluation") or {}).get("kl_to_reference"),
            }
            for r in reversed(rounds)
            if r.metrics.get("evaluation")
        ],
        "reward_models": reward_models,
        "request": None if request is None else {**asdict(request), **_request_times(request)},
    }


def _request_times(request: round_requests.RoundRequest) -> dict[str, str | None]:
    return {"requested_at": _iso(request.requested_at), "taken_at": _iso(request.taken_at)}


# --- Traffic and feedback ------------------------------------------------------------------

_TRAFFIC = """
SELECT date_trunc('minute', occurred_at) AS minute, policy_version, count(*),
       sum(completion_tokens),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms),
       percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms),
       percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms),
       avg(extract(epoch FROM ingested_at - occurred_at))
FROM interactions WHERE occurred_at >= now() - make_interval(mins => %s)
GROUP BY 1, 2 ORDER BY 1, 2
"""

_FEEDBACK = """
SELECT date_trunc('minute', f.ingested_at) AS minute, coalesce(i.policy_version, '?'),
       count(*), count(*) FILTER (WHERE f.rating = 'up'),
       avg(extract(epoch FROM f.ingested_at - f.occurred_at))
FROM feedback_events f LEFT JOIN interactions i USING (response_id)
WHERE f.ingested_at >= now() - make_interval(mins => %s)
GROUP BY 1, 2 ORDER BY 1, 2
"""

_FAILURES = """
SELECT date_trunc('minute', occurred_at), version, count(*) FROM request_failures
WHERE occurred_at >= now() - make_interval(mins => %s) GROUP BY 1, 2 ORDER BY 1, 2
"""


def traffic(conn: psycopg.Connection, *, minutes: int = 60) -> dict[str, Any]:
    """Per minute and policy over the last ``minutes``: answers, tokens/s, latency
    percentiles, ingest lag (event time to row), ratings per minute with their up share,
    server-side failures. Minutes without rows are absent (the chart leaves gaps)."""
    answers = [
        {
            "minute": _iso(minute),
            "policy": policy,
            "answers": n,
            "tokens_per_s": float(tokens or 0) / 60.0,
            "latency_ms": {"p50": p50, "p95": p95, "p99": p99},
            "ingest_lag_s": float(lag) if lag is not None else None,
        }
        for minute, policy, n, tokens, p50, p95, p99, lag in conn.execute(_TRAFFIC, (minutes,))
    ]
    ratings = [
        {
            "minute": _iso(minute),
            "policy": policy,
            "ratings": n,
            "ups": ups,
            "ingest_lag_s": float(lag) if lag is not None else None,
        }
        for minute, policy, n, ups, lag in conn.execute(_FEEDBACK, (minutes,))
    ]
    failures = [
        {"minute": _iso(minute), "policy": policy, "failures": n}
        for minute, policy, n in conn.execute(_FAILURES, (minutes,))
    ]
    return {"minutes": minutes, "answers": answers, "ratings": ratings, "failures": failures}
