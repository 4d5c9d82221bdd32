"""Simulated canaries: thousands of A/B experiments at once, decided by the same vectorized
rules the controller uses (:func:`deploy.canary_stats.confidence_sequence`,
:func:`~deploy.canary_stats.rule_actions`). Tests use it to check error rates and power,
``benchmarks/canary.py`` to report them, operators to size a canary before running one.

The world being simulated, per experiment:

* ``users`` users with heavy-tailed activity (log-normal weights): a few vote a lot;
* each user has a bounded personal offset on the up-rate (votes of one user correlate);
* the baseline up-rate drifts linearly over the run (``baseline`` start → end);
* votes arrive ``votes_per_batch`` at a time; each rated answer was routed to the canary
  with the stage's weight (per request, or sticky per user when ``sticky``); an up-rating
  has probability
  ``baseline(t) + offset_user + effect · is_canary`` (bounded in (0, 1) by construction,
  so the true difference is exactly ``effect`` for every vote);
* ``requests_per_vote - 1`` unrated requests accompany each vote (routed the same way) and
  count towards the served totals of the SRM test; with sticky routing the SRM test counts
  distinct voting users per arm instead, as the controller must;
* ``srm_loss`` drops that share of canary-routed traffic before it is logged (a broken
  router), for the sample-ratio-mismatch check.

After every batch the experiment looks at all its data and may promote, roll back, advance
the ramp or continue; decided experiments stop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deploy.canary_stats import (
    ADVANCE,
    CANARY,
    CONTINUE,
    PROMOTE,
    ROLLBACK,
    CanaryConfig,
    confidence_sequence,
    rule_actions,
    srm_p_value,
)


@dataclass(frozen=True)
class Scenario:
    effect: float
    """True canary − stable difference in up-rate."""
    baseline: tuple[float, float] = (0.60, 0.70)
    """Stable up-rate at the start and at ``max_batches`` (linear drift)."""
    users: int = 1000
    activity_sigma: float = 1.0
    """Log-normal sigma of per-user activity: 1.0 puts ~2.7× the mean on a typical vote's user."""
    user_spread: float = 0.2
    """Per-user offsets lie in ±user_spread (scaled Beta(2, 2))."""
    votes_per_batch: int = 200
    requests_per_vote: int = 3
    batch_seconds: float = 600.0
    max_batches: int = 400
    sticky: bool = False
    srm_loss: float = 0.0


@dataclass(frozen=True)
class SimResult:
    action: np.ndarray
    """(experiments,) final action code: PROMOTE, ROLLBACK or CONTINUE (ran out of batches)."""
    batches: np.ndarray
    """(experiments,) batches until the decision."""
    votes: np.ndarray
    """(experiments,) votes (both arms) until the decision."""
    srm_flagged: np.ndarray
    """(experiments,) the SRM test fired at some look."""

    def rate(self, code: int) -> float:
        return float(np.mean(self.action == code))


def simulate(
    config: CanaryConfig,
    scenario: Scenario,
    experiments: int,
    seed: int,
    chunk: int = 250,
) -> SimResult:
    """Run ``experiments`` independent canaries (in chunks, to bound memory)."""
    parts = [
        _simulate_chunk(config, scenario, min(chunk, experiments - start), seed + start)
        for start in range(0, experiments, chunk)
    ]
    return SimResult(
        *(np.concatenate([getattr(p, f) for p in parts]) for f in SimResult.__dataclass_fields__)
    )


def _simulate_chunk(config: CanaryConfig, sc: Scenario, e: int, seed: int) -> SimResult:
    rng = np.random.default_rng(seed)
    u, s, r = sc.users, len(config.stages), sc.votes_per_batch
    stages = np.asarray(config.stages)
    activity = rng.lognormal(0.0, sc.activity_sigma, size=(e, u))
    cum = np.cumsum(activity / activity.sum(axis=1, keepdims=True), axis=1)
    cum[:, -1] = 1.0
    # Sample users for all experiments with one searchsorted: offset row i by i.
    cum_flat = (cum + np.arange(e)[:, None]).ravel()
    offset = sc.user_spread * (2 * rng.beta(2, 2, size=(e, u)) - 1)
    hashes = rng.random((e, u))  # sticky routing: user i is canary while hash < weight
    votes = np.zeros((e, u, 2, s), dtype=np.float64)
    ups = np.zeros((e, u, 2, s), dtype=np.float64)
    served = np.zeros((e, 2, s), dtype=np.int64)
    served_votes = np.zeros((e, 2, s))  # votes per arm and stage, kept incrementally
    stage = np.zeros(e, dtype=np.int64)
    stage_start = np.zeros(e)
    action = np.full(e, CONTINUE)
    decided_batch = np.full(e, sc.max_batches)
    decided_votes = np.zeros(e, dtype=np.int64)
    srm_flag = np.zeros(e, dtype=bool)
    active = np.ones(e, dtype=bool)
    rows = np.arange(e)
    for b in range(sc.max_batches):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        k = idx.size
        draws = rng.random((k, r)) + idx[:, None]
        user = np.searchsorted(cum_flat, draws.ravel()).reshape(k, r) - idx[:, None] * u
        user = np.clip(user, 0, u - 1)
        weight = stages[stage[idx]][:, None] * (1 - sc.srm_loss)
        routing_draw = hashes[idx[:, None], user] if sc.sticky else rng.random((k, r))
        canary = routing_draw < weight
        base = sc.baseline[0] + (sc.baseline[1] - sc.baseline[0]) * b / sc.max_batches
        p_up = base + offset[idx[:, None], user] + sc.effect * canary
        up = rng.random((k, r)) < p_up
        arm = canary.astype(np.int64)
        st = stage[idx][:, None]
        cell = ((idx[:, None] * u + user) * 2 + arm) * s + st
        size = e * u * 2 * s
        votes += (
            np.bincount(cell.ravel(), minlength=size)
            .astype(np.float64)
            .astype(np.int64)
            .reshape(votes.shape)
        )
        ups += (
            np.bincount(cell.ravel(), weights=up.ravel(), minlength=size)
            .astype(np.int64)
            .reshape(ups.shape)
        )
        served_cell = ((idx[:, None] * 2 + arm) * s + st).ravel()
        new_votes = np.bincount(served_cell, minlength=e * 2 * s).reshape(served.shape)
        served_votes += new_votes
        # Unrated requests: as many more per stage, split between arms by the routing.
        extra = (sc.requests_per_vote - 1) * r
        canary_extra = rng.binomial(extra, stages[stage[idx]] * (1 - sc.srm_loss))
        served[idx, CANARY, stage[idx]] += canary_extra
        served[idx, 1 - CANARY, stage[idx]] += extra - canary_extra
        served += new_votes.astype(np.int64)

        # --- look ---
        now = (b + 1) * sc.batch_seconds
        everyone = k == e  # plain views instead of fancy-index copies while all run
        est = confidence_sequence(
            config, votes if everyone else votes[idx], ups if everyone else ups[idx]
        )
        stage_votes = served_votes[idx, CANARY, stage[idx]]
        codes = rule_actions(config, est, stage[idx], now, now - stage_start[idx], stage_votes)
        # Sticky routing: count distinct voting users per arm and stage, not requests.
        srm_counts = (votes[idx] > 0).sum(axis=1) if sc.sticky else served[idx]
        p_srm = srm_p_value(srm_counts, stages, config.srm_min_served)
        srm_flag[idx] |= p_srm < config.srm_p_value
        done = (codes == PROMOTE) | (codes == ROLLBACK)
        fin = idx[done]
        action[fin] = codes[done]
        decided_batch[fin] = b + 1
        decided_votes[fin] = est.votes[done].sum(axis=-1)
        active[fin] = False
        adv = idx[codes == ADVANCE]
        stage[adv] += 1
        stage_start[adv] = now
    still = rows[active]
    if still.size:
        decided_votes[still] = served_votes[still].sum(axis=(1, 2))
    return SimResult(action, decided_batch, decided_votes, srm_flag)
