"""Simulated canaries: thousands of A/B experiments at once, decided by the same vectorized
rules the controller uses (:func:`deploy.canary_stats.confidence_sequence`,
:func:`~deploy.canary_stats.rule_actions`, :func:`~deploy.canary_stats.srm_p_value`). Tests
use it to check error rates and power, ``benchmarks/canary.py`` to report them, operators to
size a canary before running one.

The world being simulated, per experiment:

* ``users`` users with heavy-tailed activity (log-normal weights): a few vote a lot;
* each user has a bounded personal offset on the up-rate (votes of one user correlate);
* the baseline up-rate drifts linearly over the run (``baseline`` start → end);
* ``votes_per_batch`` votes arrive per batch, each with ``requests_per_vote - 1`` unrated
  requests of users drawn the same way; every request is routed to the canary with the
  stage's weight, per request, or sticky per user when ``sticky`` (as serving does: a
  user's bucket is a fixed uniform number, canary while bucket < weight, so a growing
  weight only moves users from stable to canary); an up-rating has probability
  ``baseline(t) + offset_user + effect · is_canary`` (bounded in (0, 1) by construction,
  so the true difference is exactly ``effect`` for every vote);
* the SRM test sees each user once, at its first request, with that request's stage and
  arm, as :mod:`deploy.canary_data` counts them;
* ``srm_loss`` is a broken router or logger: that share of canary users (sticky; of
  canary requests per request) never reaches the logs, neither their requests nor their
  votes.

After every batch the experiment looks at all its data and may promote, roll back, advance
the ramp or continue; decided experiments stop. The SRM test is evaluated at every look
and recorded (``srm_flagged``), without stopping the experiment.
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
    """Requests (rated or not) per vote; all of them count as appearances for the SRM test."""
    batch_seconds: float = 600.0
    max_batches: int = 400
    sticky: bool = False
    srm_loss: float = 0.0
    settle_seconds: float = 0.0
    """Requests in the first seconds of each stage are left out of the test, as
    :mod:`deploy.canary_data` leaves out each stratum's settle window; a user first seen
    there is never counted by the SRM test."""


DEMO_SCENARIO = Scenario(
    effect=0.0,
    baseline=(0.55, 0.60),
    users=300,
    votes_per_batch=150,
    batch_seconds=30.0,
    max_batches=40,
    sticky=True,
    settle_seconds=30.0,
)
"""``alignloop up`` on a laptop: 300 simulated users of log-normal activity, 5 votes/s in
all, sticky routing, a look every 30 s (the controller's default ``--poll-seconds``), the
first 30 s of each stage left out (its default settle window), 1,200 s at most (the demo
config times out at 900 s)."""


@dataclass(frozen=True)
class SimResult:
    action: np.ndarray
    """(experiments,) final action code: PROMOTE, ROLLBACK or CONTINUE (ran out of batches)."""
    batches: np.ndarray
    """(experiments,) batches until the decision."""
    votes: np.ndarray
    """(experiments,) votes (both arms) until the decision."""
    srm_flagged: np.ndarray
    """(experiments,) the SRM test fired at some look (p < ``config.srm_p_value``)."""
    srm_min_p: np.ndarray
    """(experiments,) the smallest SRM p-value over the looks: the false-hold rate at any
    level a is ``mean(srm_min_p < a)``."""
    seconds: np.ndarray
    """(experiments,) simulated seconds from the canary start to the decision."""

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
    n_req = r * max(sc.requests_per_vote, 1)  # requests per batch; the first r are rated
    stages = np.asarray(config.stages)
    k_srm = config.srm_concentration()
    activity = rng.lognormal(0.0, sc.activity_sigma, size=(e, u))
    cum = np.cumsum(activity / activity.sum(axis=1, keepdims=True), axis=1)
    cum[:, -1] = 1.0
    # Sample users for all experiments with one searchsorted: offset row i by i.
    cum_flat = (cum + np.arange(e)[:, None]).ravel()
    offset = sc.user_spread * (2 * rng.beta(2, 2, size=(e, u)) - 1)
    hashes = rng.random((e, u))  # sticky routing: user i is canary while hash < weight
    lost_user = rng.random((e, u)) < sc.srm_loss  # sticky: these canary users never log
    votes = np.zeros((e, u, 2, s), dtype=np.float64)
    ups = np.zeros((e, u, 2, s), dtype=np.float64)
    seen = np.zeros((e, u), dtype=bool)  # the user's first request has been counted
    new_users = np.zeros((e, 2, s))  # users by the arm and stage of their first request
    served_votes = np.zeros((e, 2, s))  # votes per arm and stage, kept incrementally
    stage = np.zeros(e, dtype=np.int64)
    stage_start = np.zeros(e)
    action = np.full(e, CONTINUE)
    decided_batch = np.full(e, sc.max_batches)
    decided_votes = np.zeros(e, dtype=np.int64)
    srm_min_p = np.ones(e)
    active = np.ones(e, dtype=bool)
    rows = np.arange(e)
    for b in range(sc.max_batches):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        k = idx.size
        draws = rng.random((k, n_req)) + idx[:, None]
        user = np.searchsorted(cum_flat, draws.ravel()).reshape(k, n_req) - idx[:, None] * u
        user = np.clip(user, 0, u - 1)
        weight = stages[stage[idx]][:, None]
        if sc.sticky:
            canary = hashes[idx[:, None], user] < weight
            logged = ~(canary & lost_user[idx[:, None], user])
        else:
            canary = rng.random((k, n_req)) < weight
            logged = ~(canary & (rng.random((k, n_req)) < sc.srm_loss))
        settling = b * sc.batch_seconds < stage_start[idx] + sc.settle_seconds  # (k,)
        counted = logged & ~settling[:, None]
        arm = canary.astype(np.int64)
        st = stage[idx][:, None]

        # Votes: the first r requests of the batch, when logged.
        base = sc.baseline[0] + (sc.baseline[1] - sc.baseline[0]) * b / sc.max_batches
        p_up = base + offset[idx[:, None], user[:, :r]] + sc.effect * canary[:, :r]
        up = rng.random((k, r)) < p_up
        rated = counted[:, :r]
        cell = (((idx[:, None] * u + user[:, :r]) * 2 + arm[:, :r]) * s + st)[rated]
        size = e * u * 2 * s
        votes += np.bincount(cell, minlength=size).reshape(votes.shape)
        ups += np.bincount(cell, weights=up[rated], minlength=size).reshape(ups.shape)
        arm_stage = ((idx[:, None] * 2 + arm[:, :r]) * s + st)[rated]
        served_votes += np.bincount(arm_stage, minlength=e * 2 * s).reshape(served_votes.shape)

        # First appearances: each user's first logged request, with its arm and stage;
        # not counted (ever) when it falls in a settle window.
        fresh = logged & ~seen[idx[:, None], user]
        who = (idx[:, None] * u + user)[fresh]
        if who.size:
            who, first = np.unique(who, return_index=True)  # first request of each user
            seen.flat[who] = True
            keep = ~np.broadcast_to(settling[:, None], fresh.shape)[fresh][first]
            exp = who[keep] // u
            cells = (exp * 2 + arm[fresh][first][keep]) * s + stage[exp]
            new_users += np.bincount(cells, minlength=e * 2 * s).reshape(new_users.shape)

        # --- look ---
        now = (b + 1) * sc.batch_seconds
        everyone = k == e  # plain views instead of fancy-index copies while all run
        est = confidence_sequence(
            config, votes if everyone else votes[idx], ups if everyone else ups[idx]
        )
        stage_votes = served_votes[idx, CANARY, stage[idx]]
        codes = rule_actions(config, est, stage[idx], now, now - stage_start[idx], stage_votes)
        p_srm = srm_p_value(new_users[idx], stages, k_srm, config.srm_min_users)
        srm_min_p[idx] = np.minimum(srm_min_p[idx], p_srm)
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
    return SimResult(
        action,
        decided_batch,
        decided_votes,
        srm_min_p < config.srm_p_value,
        srm_min_p,
        decided_batch * sc.batch_seconds,
    )
