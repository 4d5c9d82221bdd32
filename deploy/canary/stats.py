"""Statistics of the canary A/B test: pure functions over numpy arrays, no I/O.

The question: do live users prefer the canary — is its thumbs-up rate higher than the
stable's (``test="superiority"``, the default), or at most ``margin`` lower
(``test="non_inferiority"``)? Judged on live votes that arrive continuously and are looked
at again and again.

Data layout. ``votes`` and ``ups`` have shape ``(..., users, 2, strata)``: the number of
current ratings and of "up" ratings per user, per arm (index 0 = stable, 1 = canary), per
stratum (one stratum per traffic weight the canary ran at: the ramp stages). Any leading
dimensions are independent experiments: the simulator evaluates thousands at once with the
same code the controller uses for one.

Method.

1. *Stratified difference.* In stratum s the arm rates are ratio estimators
   ``p_as = Y_as / N_as``. Across strata the baseline drifts and the canary share changes,
   so pooling would confound time with arm (Simpson); instead
   ``Δ̂ = Σ_s w_s (p_1s − p_0s)`` with Cochran–Mantel–Haenszel weights
   ``w_s ∝ N_0s N_1s / (N_0s + N_1s)`` (the precision weights under a common Bernoulli
   variance; they depend on counts only, never on outcomes, so they add no bias).
2. *Cluster-robust variance.* Users who vote many times are clusters of correlated votes.
   Each user i has the influence ``e_i = Σ_s w_s [(y_i1s − p_1s n_i1s)/N_1s −
   (y_i0s − p_0s n_i0s)/N_0s]`` (all strata, both arms: a user seen in both arms or in
   several stages is still one cluster) and ``V_CR = G/(G−1) Σ_i e_i²`` (CR1, G users).
   We use ``V = max(V_CR, V_iid)``, the independent-votes variance as a floor, because
   a sandwich estimate from few clusters is too small more often than not.
3. *Always-valid confidence sequence.* The normal-mixture boundary (Robbins; Johari et al.
   2017 "Always Valid Inference" mSPRT; Howard et al. 2021 "Time-uniform, nonparametric,
   nonasymptotic confidence sequences", eq. for the normal mixture) in estimator space:
   ``Δ̂ ± sqrt( V (V + τ²)/τ² · log((V + τ²)/(V α²)) )``. It covers the true difference at
   every look simultaneously with probability ≥ 1 − α (asymptotically, with V estimated:
   Waudby-Smith et al. 2023, "Time-uniform central limit theory"), so the controller may
   look after every vote. τ² (the mixing variance) sets where the boundary is tightest; we
   tune it to ``tuning_votes_per_arm`` (see :meth:`CanaryConfig.mixture_variance`).
4. *Decisions* (:func:`rule_actions`) against a threshold θ (:attr:`CanaryConfig.threshold`):
   θ = 0 for superiority, θ = −margin for non-inferiority. Roll back when
   ``upper < θ`` (users like it less: shown worse than the threshold); promote when
   ``lower > θ`` (users prefer it; or, non-inferiority, it is shown no worse than the
   margin), only at the last ramp stage and after the warm-up gate. Either error
   (promoting a canary whose true difference is ≤ θ, rolling back one whose difference is
   ≥ θ) has probability ≤ α over the whole canary, peeking included. There is no separate
   futility rule: ``max_votes_per_arm`` / ``max_duration_s`` end an undecided canary in
   favour of the stable, so under superiority a canary that is merely no better times out
   to stable.
5. *Sample-ratio mismatch* (:func:`srm_e_value`, :func:`srm_p_value`), on distinct users,
   because routing is sticky per user (``serving.routing``: a user's bucket is fixed and
   the user is in the canary while bucket < weight). Request counts are the wrong unit:
   one heavy user moves thousands of requests into one arm. Each user is counted *once*,
   in the stratum of its first routed interaction since the canary started, with the arm
   it was served then. At that moment the user has not yet been exposed to the canary, so
   whether and when it shows up cannot depend on its arm, and its arm is an independent
   Bernoulli(w_s) draw (a fresh bucket, whatever the weight history). Counting a returning
   user again in a later stratum would not be: a canary user stays canary when the weight
   grows from 5 % to 50 %, a stable one moves with probability (w₁ − w₀)/(1 − w₀), and
   whether it returns at all may depend on what it was served.
   The test is the Beta-binomial mixture likelihood ratio (Lindon & Malek 2020,
   "Anytime-valid inference for multinomial count data", their Dirichlet-multinomial test
   with two categories), per stratum
   ``E_s = B(a_s + x_1s, b_s + x_0s) / B(a_s, b_s) / (w_s^x_1s (1 − w_s)^x_0s)`` with the
   prior centred on the null, ``a_s = k w_s``, ``b_s = k (1 − w_s)``, and ``E = Π_s E_s``.
   Under correct routing E is a nonnegative martingale with mean 1 over the stream of
   first appearances (strata follow one another in time), so by Ville's inequality
   ``P(E ever ≥ 1/a) ≤ a``: ``p = min(1, 1/E)`` is a p-value valid under continuous
   peeking. A stratum with fewer than ``srm_min_users`` users contributes 1 (it waits);
   its data joins the product once it has that many. That is still a test martingale:
   how many users show up does not depend on their arms, so waiting only means the
   first ``srm_min_users`` arms of a stratum are revealed together, and a stratum that
   ends below the minimum is left out on a count fixed independently of its arms. The
   guarantee assumes the canary does not change who shows up before being served (with
   one routing salt for every canary, a previous canary that drove its users away would
   show here too, and rightly: the arms are no longer comparable). A mismatch means the
   routing or the logging is broken, so every statistic above is suspect: hold for a
   human.
6. *Guardrails* (:func:`guardrail_breaches`): 5xx rate excess, adapter load failures,
   latency p95 ratio. Tripwires with a minimum sample, not tests: roll back at once.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import numpy as np
from scipy import optimize, special

from schemas.config import ConfigBase

STABLE, CANARY = 0, 1

CONTINUE, ADVANCE, PROMOTE, ROLLBACK, HOLD = range(5)
ACTIONS = ("continue", "advance_stage", "promote", "rollback", "hold")
"""Action names by code (the codes are what the vectorized functions return)."""


CanaryTest = Literal["superiority", "non_inferiority"]
TESTS: tuple[str, ...] = typing.get_args(CanaryTest)
"""The decision rules :attr:`CanaryConfig.test` may name."""


@dataclass(frozen=True)
class CanaryConfig(ConfigBase):
    """Every knob of the canary test. Defaults are for production traffic; :meth:`demo`
    gives values a laptop demo reaches in minutes."""

    # --- the test -------------------------------------------------------------------------
    test: CanaryTest = field(
        default="superiority",
        metadata={
            "help": 'Which question promotes. ``"superiority"``: promote only when users are '
            "shown to prefer the canary (lower bound > 0), roll back when they are "
            "shown to like it less (upper bound < 0); a canary that is merely no better "
            "reaches ``max_votes_per_arm`` or ``max_duration_s`` and goes back to "
            'stable. ``"non_inferiority"``: promote when the canary is shown at most '
            "``margin`` worse (lower bound > −margin), roll back when it is shown worse "
            "than that (upper bound < −margin); for updates that must not hurt rather "
            "than help (a cheaper model, a refactor)."
        },
    )
    alpha: float = field(
        default=0.05,
        metadata={
            "help": "Error probability of each decision over the whole canary, peeking "
            "included: a canary no better than the threshold is promoted, or one at "
            "least as good as the threshold rolled back, with probability ≤ alpha."
        },
    )
    margin: float = field(
        default=0.02,
        metadata={
            "help": "Non-inferiority margin m on the thumbs-up rate (absolute, 0.02 = 2 "
            'points); used only when ``test == "non_inferiority"``: a canary up to m '
            "worse than stable is acceptable. 0 is allowed (then the rules are "
            "superiority's)."
        },
    )
    tuning_votes_per_arm: int = field(
        default=10_000,
        metadata={
            "help": "Votes per arm at which the confidence sequence is tightest (sets τ²). Pick "
            "about the sample where you expect decisions; the boundary is valid for any "
            "choice."
        },
    )

    # --- the ramp ---------------------------------------------------------------------------
    stages: tuple[float, ...] = field(
        default=(0.05, 0.5),
        metadata={
            "help": "Canary traffic weight of each ramp stage; promotion happens only in the "
            "last one."
        },
    )
    min_stage_votes: int = field(
        default=500,
        metadata={
            "help": "Canary votes a stage must collect before the ramp advances (or, in the "
            "last stage, before promotion)."
        },
    )
    min_stage_duration_s: float = field(
        default=2 * 3600,
        metadata={
            "help": "Seconds a stage must last before the ramp advances (or promotion, in the "
            "last)."
        },
    )

    # --- warm-up gate: no statistical decision before all of these ---------------------------
    min_votes_per_arm: int = field(
        default=1_000,
        metadata={
            "help": "Current ratings per arm before the confidence sequence is trusted at all."
        },
    )
    min_ups_per_arm: int = field(
        default=100,
        metadata={"help": "'Up' ratings per arm: the variance estimate is meaningless with none."},
    )
    min_downs_per_arm: int = field(
        default=100,
        metadata={"help": "'Down' ratings per arm, likewise."},
    )
    min_users_per_arm: int = field(
        default=200,
        metadata={
            "help": "Distinct voting users per arm: the cluster-robust variance needs many "
            "clusters."
        },
    )
    min_duration_s: float = field(
        default=24 * 3600,
        metadata={
            "help": "Seconds since the canary started before it may be promoted (one daily "
            "cycle). Statistical rollbacks need only the vote minimums: a clearly worse "
            "canary goes at once."
        },
    )

    # --- the end ------------------------------------------------------------------------------
    max_votes_per_arm: int = field(
        default=50_000,
        metadata={
            "help": "Canary votes after which an undecided canary is rolled back (falls back to "
            "stable)."
        },
    )
    max_duration_s: float = field(
        default=7 * 86400,
        metadata={"help": "Seconds after which an undecided canary is rolled back."},
    )

    # --- sample-ratio mismatch (module docstring, 5) --------------------------------------------
    srm_p_value: float = field(
        default=0.001,
        metadata={
            "help": "Hold for a human when the anytime-valid SRM p-value (1 / the Beta-binomial "
            "mixture likelihood ratio over distinct users) falls below this. It is "
            "valid under continuous peeking: over a whole canary with correct routing, "
            "the chance of a false hold is at most this."
        },
    )
    srm_min_users: int = field(
        default=100,
        metadata={
            "help": "Distinct users a stratum needs (counted at their first appearance, both "
            "arms) before it enters the SRM test; until then it waits (contributes no "
            "evidence either way). A canary seen by a handful of client identities is "
            "never held for SRM."
        },
    )
    srm_tuning_users: int = field(
        default=5_000,
        metadata={
            "help": "Distinct users per stratum at which the SRM test detects the smallest "
            "imbalance: sets the prior concentration k of the mixture "
            "(:meth:`srm_concentration`). Valid for any choice; smaller values favour "
            "large imbalances on few users."
        },
    )

    max_principal_vote_share: float = field(
        default=0.5,
        metadata={
            "help": "No API key's votes weigh more than this share of all votes in the "
            "comparison (its users' votes are scaled down together; feedback/"
            "principal_weights.py): one flooding key cannot move a decision alone. 1 = no cap. "
            "With a single key (the demo) nothing is capped."
        },
    )

    # --- guardrails -------------------------------------------------------------------------
    guardrail_min_requests: int = field(
        default=200,
        metadata={"help": "Canary requests before the 5xx and latency guardrails are evaluated."},
    )
    max_5xx_excess: float = field(
        default=0.01,
        metadata={"help": "Roll back when canary 5xx rate − stable 5xx rate exceeds this."},
    )
    guardrail_min_failing_principals: int = field(
        default=3,
        metadata={
            "help": "The 5xx guardrail fires only when the canary's failures come from at least "
            "this many API keys (principals), so one caller that found a request which crashes "
            "the engine cannot roll back any canary it likes. The demo config, with one key, "
            "uses 1."
        },
    )
    max_adapter_load_failures: int = field(
        default=0,
        metadata={"help": "Roll back when the canary adapter failed to load more often than this."},
    )
    max_latency_p95_ratio: float = field(
        default=1.5,
        metadata={"help": "Roll back when canary p95 latency / stable p95 latency exceeds this."},
    )
    guardrails_override_hold: bool = field(
        default=True,
        metadata={
            "help": "A guardrail breach rolls back even while an operator holds the controller: "
            "hold stops the controller from advancing, not from protecting users."
        },
    )

    def checks(self) -> list[tuple[bool, str, str]]:
        return [
            (0.0 < self.alpha < 1.0, "alpha", "must lie strictly between 0 and 1"),
            (0.0 < self.srm_p_value < 1.0, "srm_p_value", "must lie strictly between 0 and 1"),
            (self.margin >= 0, "margin", "must be >= 0"),
            (
                0.0 < self.max_principal_vote_share <= 1.0,
                "max_principal_vote_share",
                "must lie in (0, 1]",
            ),
            (
                bool(self.stages) and all(0.0 < w < 1.0 for w in self.stages),
                "stages",
                "must be weights strictly between 0 and 1",
            ),
        ]

    @property
    def threshold(self) -> float:
        """θ of the rules: 0 for superiority, −margin for non-inferiority."""
        return -self.margin if self.test == "non_inferiority" and self.margin else 0.0

    @classmethod
    def demo(cls) -> CanaryConfig:
        """Thresholds for ``alignloop up``: a laptop with a few hundred simulated users and
        a few votes per second in all. Measured with :mod:`tests.fixtures.canary_sim`
        (``python -m benchmarks.canary --quick``: :data:`tests.fixtures.canary_sim.DEMO_SCENARIO`,
        5 votes/s from 300 users of log-normal activity, a look every 30 s, 400 runs): how
        soon a canary users prefer by 20 or 15 points is promoted and one they like 20
        points less is rolled back, and how rarely one that is no better is promoted by
        mistake before it times out to stable (``max_duration_s``, 15 minutes): the figures
        are in docs/benchmarks.md, "Canary decisions (simulated)"."""
        return cls(
            margin=0.05,
            tuning_votes_per_arm=300,
            stages=(0.1, 0.5),
            min_stage_votes=40,
            min_stage_duration_s=60,
            min_votes_per_arm=100,
            min_ups_per_arm=10,
            min_downs_per_arm=10,
            min_users_per_arm=20,
            min_duration_s=180,
            max_votes_per_arm=5_000,
            max_duration_s=900,
            srm_min_users=50,
            srm_tuning_users=200,
            guardrail_min_requests=50,
            guardrail_min_failing_principals=1,
        )

    def mixture_variance(self) -> float:
        """τ² of the normal mixture, chosen so the boundary is narrowest when each arm has
        ``tuning_votes_per_arm`` votes of maximal Bernoulli variance 1/4:
        ``τ² = x*(α) · V*`` with ``V* = 2 · 0.25 / n*`` and x* minimizing the radius."""
        return _optimal_ratio(self.alpha) * 0.5 / self.tuning_votes_per_arm

    def srm_concentration(self) -> float:
        """k of the SRM mixture's Beta(k w, k (1 − w)) prior. The prior variance of the
        canary share is w(1 − w)/(k + 1) and the share's sampling variance on n users is
        w(1 − w)/n, so their ratio is n/(k + 1); the rejection boundary at level a is
        narrowest at the ratio x*(a) of :func:`_optimal_ratio` (the same normal-mixture
        algebra as :meth:`mixture_variance`), hence ``k = n*/x*(a) − 1`` (at least 1)."""
        return max(self.srm_tuning_users / _optimal_ratio(self.srm_p_value) - 1.0, 1.0)


@lru_cache(maxsize=16)
def _optimal_ratio(alpha: float) -> float:
    """x = τ²/V minimizing radius²/V = (1 + 1/x)(log(1 + x) + 2 log(1/α)); ≈ 8.5 at α=0.05."""
    two_log = 2.0 * math.log(1.0 / alpha)
    result = optimize.minimize_scalar(
        lambda lx: (1 + math.exp(-lx)) * (math.log1p(math.exp(lx)) + two_log),
        bounds=(-5.0, 10.0),
        method="bounded",
    )
    return float(math.exp(result.x))


@dataclass(frozen=True)
class Health:
    """Guardrail inputs per arm (index 0 stable, 1 canary); None = not measured."""

    requests: tuple[int, int] | None = None
    errors_5xx: tuple[int, int] | None = None
    failing_principals: tuple[int, int] | None = None
    """Distinct principals among the 5xx failures (None: not measured: no floor)."""
    latency_p95_ms: tuple[float, float] | None = None
    adapter_load_failures: int | None = None


@dataclass(frozen=True)
class Observations:
    """What the controller knows about one canary at one look."""

    votes: np.ndarray
    """(users, 2, strata) current ratings per user, arm, stratum."""
    ups: np.ndarray
    """(users, 2, strata) 'up' ratings, same layout."""
    new_users: np.ndarray
    """(2, strata) distinct routed users counted once each, by the arm and the stratum of
    their first routed interaction since the canary started (the SRM test's counts)."""
    weights: np.ndarray
    """(strata,) configured canary weight of each stratum."""
    health: Health = field(default_factory=Health)


@dataclass(frozen=True)
class Estimate:
    """The stratified difference canary − stable and its confidence sequence (arrays with
    the leading shape of the input)."""

    estimate: np.ndarray
    variance: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    votes: np.ndarray  # (..., 2) per arm
    ups: np.ndarray  # (..., 2)
    users: np.ndarray  # (..., 2) distinct voting users per arm


def _sum_users(x: np.ndarray) -> np.ndarray:
    """Sum over the users axis (-2) as a matrix product: several times faster than
    ``x.sum(axis=-2)`` on the (experiments, users, few) arrays of the simulator."""
    return np.ones(x.shape[-2]) @ x


def stratified_difference(votes: np.ndarray, ups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Δ̂ = Σ_s w_s (p_1s − p_0s) and its variance max(V_CR, V_iid) (module docstring, 1–2).

    Strata where an arm has no votes carry no weight. With no usable stratum, or fewer
    than two voting users, the estimate is NaN and the variance infinite.

    Implementation note: a user's influence is linear in its counts,
    ``e_i = Σ_as c_as (y_ias − p_as n_ias)`` with ``c_as = ±w_s / N_as``, so it is one
    matrix-vector product over the flattened (arm, stratum) axis: thousands of simulated
    experiments per look stay cheap."""
    votes = np.asarray(votes, dtype=np.float64)
    ups = np.asarray(ups, dtype=np.float64)
    *lead, users, arms, strata = votes.shape
    nv = votes.reshape(*lead, users, arms * strata)  # per user, flattened (arm, stratum)
    yv = ups.reshape(*lead, users, arms * strata)
    n = _sum_users(nv).reshape(*lead, arms, strata)
    y = _sum_users(yv).reshape(*lead, arms, strata)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(n > 0, y / n, 0.0)
        usable = (n > 0).all(axis=-2)  # (..., S)
        h = np.where(usable, n[..., 0, :] * n[..., 1, :] / (n[..., 0, :] + n[..., 1, :]), 0.0)
        h_total = h.sum(axis=-1, keepdims=True)
        w = np.where(h_total > 0, h / h_total, 0.0)  # (..., S)
        estimate = (w * (p[..., 1, :] - p[..., 0, :])).sum(axis=-1)
        inv_n = np.where(n > 0, 1.0 / n, 0.0)
        sign = np.array([-1.0, 1.0])[:, None]  # canary minus stable
        c = (sign * w[..., None, :] * inv_n).reshape(*lead, arms * strata)
        pc = (p.reshape(*lead, arms * strata)) * c
        influence = (yv @ c[..., None] - nv @ pc[..., None])[..., 0]
        in_usable = np.repeat(usable[..., None, :], arms, axis=-2).reshape(*lead, arms * strata)
        clusters = ((nv @ in_usable.astype(np.float64)[..., None])[..., 0] > 0).sum(axis=-1)
        g = clusters.astype(np.float64)
        v_cr = np.where(
            g > 1, g / (g - 1) * np.einsum("...u,...u->...", influence, influence), np.inf
        )
        # Floor: independent votes, with p shrunk off 0/1 so it is never zero.
        p_shrunk = (y + 0.5) / (n + 1.0)
        v_arm = np.where(n > 0, p_shrunk * (1 - p_shrunk) * inv_n, 0.0)
        v_iid = (w**2 * (v_arm[..., 0, :] + v_arm[..., 1, :])).sum(axis=-1)
        variance = np.maximum(v_cr, v_iid)
        no_data = h_total[..., 0] <= 0
        estimate = np.where(no_data, np.nan, estimate)
        variance = np.where(no_data, np.inf, variance)
    return estimate, variance


def cs_radius(variance: np.ndarray | float, alpha: float, tau2: float) -> np.ndarray:
    """Half-width of the normal-mixture confidence sequence for an estimator of variance V:
    ``sqrt(V (V + τ²)/τ² · log((V + τ²)/(V α²)))`` (infinite when V is)."""
    v = np.asarray(variance, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        r2 = v * (v + tau2) / tau2 * np.log((v + tau2) / (v * alpha**2))
    return np.where(np.isfinite(v) & (v > 0), np.sqrt(r2), np.where(v > 0, np.inf, 0.0))


def confidence_sequence(config: CanaryConfig, votes: np.ndarray, ups: np.ndarray) -> Estimate:
    """The estimate, its always-valid bounds at level 1 − α, and the per-arm counts."""
    estimate, variance = stratified_difference(votes, ups)
    radius = cs_radius(variance, config.alpha, config.mixture_variance())
    votes = np.asarray(votes, dtype=np.float64)
    ups = np.asarray(ups, dtype=np.float64)
    per_user_arm = np.einsum("...uas->...ua", votes)
    with np.errstate(invalid="ignore"):
        lower = np.where(np.isnan(estimate), -np.inf, estimate - radius)
        upper = np.where(np.isnan(estimate), np.inf, estimate + radius)
    return Estimate(
        estimate=estimate,
        variance=variance,
        lower=lower,
        upper=upper,
        votes=_sum_users(per_user_arm),
        ups=_sum_users(np.einsum("...uas->...ua", ups)),
        users=(per_user_arm > 0).sum(axis=-2),
    )


def warmed_up(config: CanaryConfig, est: Estimate) -> np.ndarray:
    """The warm-up gate on counts: enough votes, ups, downs and users in both arms."""
    downs = est.votes - est.ups
    return (
        (est.votes >= config.min_votes_per_arm).all(axis=-1)
        & (est.ups >= config.min_ups_per_arm).all(axis=-1)
        & (downs >= config.min_downs_per_arm).all(axis=-1)
        & (est.users >= config.min_users_per_arm).all(axis=-1)
    )


def rule_actions(
    config: CanaryConfig,
    est: Estimate,
    stage: np.ndarray | int,
    elapsed_s: np.ndarray | float,
    stage_elapsed_s: np.ndarray | float,
    stage_canary_votes: np.ndarray | int,
) -> np.ndarray:
    """The statistical part of the decision, vectorized (codes of :data:`ACTIONS`).

    With θ = :attr:`CanaryConfig.threshold` (0 for superiority, −margin for
    non-inferiority), in order of precedence: roll back if the upper bound is below θ
    (after the warm-up counts); promote if the lower bound is above θ, in the last stage,
    with that stage's minimums and the minimum duration met; roll back if the maximum size
    or duration is reached undecided; advance the ramp when the current stage's minimums
    are met; otherwise continue. The ramp is exposure-based (time and votes), not
    significance-based: the early small stage limits the blast radius while the statistics
    accumulate over all stages."""
    stage = np.asarray(stage)
    last = len(config.stages) - 1
    theta = config.threshold
    warm = warmed_up(config, est)
    stage_ready = (np.asarray(stage_elapsed_s) >= config.min_stage_duration_s) & (
        np.asarray(stage_canary_votes) >= config.min_stage_votes
    )
    worse = warm & (est.upper < theta)
    promote = (
        warm
        & (stage >= last)
        & stage_ready
        & (np.asarray(elapsed_s) >= config.min_duration_s)
        & (est.lower > theta)
    )
    advance = (stage < last) & stage_ready
    return np.select(
        [worse, promote, exhausted(config, est, elapsed_s), advance],
        [ROLLBACK, PROMOTE, ROLLBACK, ADVANCE],
        default=CONTINUE,
    )


def exhausted(config: CanaryConfig, est: Estimate, elapsed_s: np.ndarray | float) -> np.ndarray:
    """The canary reached ``max_duration_s`` or ``max_votes_per_arm`` canary votes."""
    return (np.asarray(elapsed_s) >= config.max_duration_s) | (
        est.votes[..., CANARY] >= config.max_votes_per_arm
    )


def srm_e_value(
    users: np.ndarray, weights: np.ndarray, concentration: float, min_users: int = 0
) -> np.ndarray:
    """The SRM test's evidence against correct routing (module docstring, 5):
    ``Π_s B(a_s + x_1s, b_s + x_0s) / B(a_s, b_s) / (w_s^x_1s (1 − w_s)^x_0s)`` with
    ``a_s = k w_s``, ``b_s = k (1 − w_s)``, over the strata with at least ``min_users``
    users (at least one); 1.0 when none qualifies.

    ``users``: ``(..., 2, strata)`` distinct users per arm (0 stable, 1 canary), each
    counted once, at its first appearance; ``weights``: ``(strata,)`` or broadcastable,
    the canary weight of each stratum; ``concentration``: k > 0."""
    x = np.asarray(users, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    x0, x1 = x[..., STABLE, :], x[..., CANARY, :]
    a, b = concentration * w, concentration * (1.0 - w)
    log_e = (
        special.betaln(a + x1, b + x0)
        - special.betaln(a, b)
        - special.xlogy(x1, w)
        - special.xlogy(x0, 1.0 - w)
    )
    use = (x0 + x1) >= max(min_users, 1)
    with np.errstate(over="ignore"):
        return np.exp(np.where(use, log_e, 0.0).sum(axis=-1))


def srm_p_value(
    users: np.ndarray, weights: np.ndarray, concentration: float, min_users: int = 0
) -> np.ndarray:
    """``min(1, 1 / E)`` of :func:`srm_e_value`: an anytime-valid p-value (under correct
    routing the chance that it *ever* drops to a or below, however often one looks, is at
    most a)."""
    with np.errstate(divide="ignore"):
        return np.minimum(1.0, 1.0 / srm_e_value(users, weights, concentration, min_users))


def guardrail_breaches(config: CanaryConfig, health: Health) -> list[str]:
    """Which guardrails the canary breaks (empty: none), each as a readable reason."""
    breaches: list[str] = []
    if (
        health.adapter_load_failures is not None
        and health.adapter_load_failures > config.max_adapter_load_failures
    ):
        breaches.append(f"adapter load failures {health.adapter_load_failures}")
    enough = health.requests is not None and health.requests[CANARY] >= (
        config.guardrail_min_requests
    )
    if enough and health.errors_5xx is not None and health.requests is not None:
        rates = [
            e / r if r else 0.0 for e, r in zip(health.errors_5xx, health.requests, strict=True)
        ]
        who = health.failing_principals
        several = who is None or who[CANARY] >= config.guardrail_min_failing_principals
        if rates[CANARY] - rates[STABLE] > config.max_5xx_excess and several:
            breaches.append(
                f"5xx rate {rates[CANARY]:.3%} vs stable {rates[STABLE]:.3%}"
                f" (allowed excess {config.max_5xx_excess:.2%})"
                + ("" if who is None else f" from {who[CANARY]} principals")
            )
    if enough and health.latency_p95_ms is not None and health.latency_p95_ms[STABLE] > 0:
        ratio = health.latency_p95_ms[CANARY] / health.latency_p95_ms[STABLE]
        if ratio > config.max_latency_p95_ratio:
            breaches.append(f"latency p95 ratio {ratio:.2f} > {config.max_latency_p95_ratio:.2f}")
    return breaches
