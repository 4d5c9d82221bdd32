"""Canary decision quality by simulation, printed as JSON.

    python -m benchmarks.canary            # production config, 1,000 runs per effect
    python -m benchmarks.canary --quick    # demo config in the demo's world, 400 runs
    python -m benchmarks.canary --test non_inferiority   # the other decision rule

Keys: ``test`` and ``threshold`` (θ: 0 for superiority, −m for non-inferiority);
``false_promotion_rate`` (canary exactly at θ: promoted anyway; ≤ α by design);
``power_at_margin`` (canary better than stable by m: promoted); per effect, the promote /
rollback rates, the median votes and the median / 90th-percentile simulated seconds to
each decision; ``srm`` the sample-ratio test on distinct users: false holds per canary
under correct sticky routing, and detection when half of the canary's users are lost;
``by_activity`` the same decision figures (false promotion at θ, power at +m, false SRM
holds, median votes to a decision) for heavy and light users: log-normal activity of
σ 1 and 1.5 and Zipf activity (a few users make most requests). Routing is sticky per user
everywhere, computed by serving's own functions (``serving.routing.bucket`` over
``routing_key``, a secret salt per simulated experiment; ``routing`` in the JSON says so).
With ``--quick`` the effects are in points of thumbs-up rate (±10 to ±25) in
:data:`tests.fixtures.canary_sim.DEMO_SCENARIO` (300 users, 5 votes/s, a look every 30 s), plus the
same at 3 and 10 votes/s: the demo's time to promote, roll back or time out.
``switch_seconds_max`` and ``failed_requests`` measure the routing switch on two real
serving replicas under load (`benchmarks/routing_switch.py`; `--no-serving` skips it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np

from deploy.canary.stats import PROMOTE, ROLLBACK, TESTS, CanaryConfig
from tests.fixtures.canary_sim import DEMO_SCENARIO, Scenario, SimResult, simulate


def _quantiles(seconds: np.ndarray) -> list[float] | None:
    return [round(float(q), 1) for q in np.quantile(seconds, [0.5, 0.9])] if seconds.size else None


def _summary(effect: float, r: SimResult) -> dict:
    decided = r.action != 0
    return {
        "effect": effect,
        "promote_rate": r.rate(PROMOTE),
        "rollback_rate": r.rate(ROLLBACK),
        "median_votes_to_decision": float(np.median(r.votes[decided])) if decided.any() else None,
        "seconds_to_promote_p50_p90": _quantiles(r.seconds[r.action == PROMOTE]),
        "seconds_to_rollback_p50_p90": _quantiles(r.seconds[r.action == ROLLBACK]),
        "false_srm_rate": float(r.srm_flagged.mean()),
    }


# Heavy and light users: who makes the requests (and so the votes) of a canary.
ACTIVITY = {
    "lognormal_sigma_1.0": {"activity_sigma": 1.0},
    "lognormal_sigma_1.5": {"activity_sigma": 1.5},
    "zipf_1.1": {"zipf_exponent": 1.1},
}


def by_activity(
    config: CanaryConfig, scenario: Scenario, experiments: int, seed: int
) -> dict[str, dict]:
    """Per activity model of :data:`ACTIVITY`: false promotion (canary exactly at θ),
    power (at +m), false SRM holds over both (routing is correct, so every hold is false),
    the median votes to a decision, and the busiest user's share of the requests."""
    out: dict[str, dict] = {}
    for name, change in ACTIVITY.items():
        world = dataclasses.replace(scenario, **change, sticky=True)
        at_theta = simulate(config, dataclasses.replace(world, effect=config.threshold),
                            experiments, seed)  # fmt: skip
        at_m = simulate(config, dataclasses.replace(world, effect=config.margin), experiments, seed)
        out[name] = {
            "false_promotion_rate": at_theta.rate(PROMOTE),
            "power_at_margin": at_m.rate(PROMOTE),
            "false_srm_hold_rate": float(
                np.concatenate([at_theta.srm_flagged, at_m.srm_flagged]).mean()
            ),
            "median_votes_to_decision": {
                "θ": _summary(config.threshold, at_theta)["median_votes_to_decision"],
                "+m": _summary(config.margin, at_m)["median_votes_to_decision"],
            },
            "busiest_user_share": busiest_share(world, seed),
        }
    return out


def busiest_share(world: Scenario, seed: int) -> float:
    """The expected share of requests made by the busiest user, in this activity model."""
    rng = np.random.default_rng(seed)
    if world.zipf_exponent is not None:
        w = np.arange(1, world.users + 1, dtype=np.float64) ** (-world.zipf_exponent)
        return round(float(w[0] / w.sum()), 4)
    w = rng.lognormal(0.0, world.activity_sigma, size=(200, world.users))
    return round(float((w.max(axis=1) / w.sum(axis=1)).mean()), 4)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks.canary", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="demo config in the demo's world")
    ap.add_argument("--test", choices=TESTS, default="superiority")
    ap.add_argument("--experiments", type=int)
    ap.add_argument("--seed", type=int, default=2025)
    ap.add_argument("--flips", type=int, default=10, help="routing flips across 2 replicas")
    ap.add_argument(
        "--no-serving",
        action="store_true",
        help="skip the routing switch measurement (it starts 2 vLLM engines)",
    )
    args = ap.parse_args(argv)
    if args.quick:
        config = dataclasses.replace(CanaryConfig.demo(), test=args.test)
        scenario = DEMO_SCENARIO
        experiments = args.experiments or 400
    else:
        # Production thresholds; time is compressed (a batch = 10 simulated minutes of
        # 1,000 votes) so min/max durations do not bind before the vote limits do.
        config = dataclasses.replace(
            CanaryConfig(), test=args.test, min_duration_s=0, min_stage_duration_s=0
        )
        scenario = Scenario(
            effect=0.0,
            users=5000,
            votes_per_batch=1000,
            batch_seconds=600,
            max_batches=250,
            sticky=True,
        )
        experiments = args.experiments or 1000
    m, theta = config.margin, config.threshold
    started = time.monotonic()
    seed = args.seed
    effects = {"θ": theta, "-m": -m, "0": 0.0, "+m": m, "+2m": 2 * m}
    if args.quick:
        effects |= {f"{p:+d}pt": p / 100 for p in (-20, -10, 10, 15, 20, 25)}
    per_effect: dict[str, dict] = {}
    for label, effect in effects.items():
        same = next((v for v in per_effect.values() if v["effect"] == effect), None)
        if same is None:
            sc = dataclasses.replace(scenario, effect=effect)
            same = _summary(effect, simulate(config, sc, experiments, seed=seed))
        per_effect[label] = same
    result: dict = {
        "config": "demo" if args.quick else "production",
        "test": config.test,
        "threshold": theta,
        "margin": m,
        "alpha": config.alpha,
        "experiments_per_effect": experiments,
        "users": scenario.users,
        "votes_per_look": scenario.votes_per_batch,
        "seconds_per_look": scenario.batch_seconds,
        "max_votes_per_arm": config.max_votes_per_arm,
        "max_duration_s": config.max_duration_s,
        "routing": "sticky per user: serving.routing.bucket(salt, routing_key('product', "
        "user)), a secret salt per simulated experiment",
        "activity": "zipf" if scenario.zipf_exponent else f"lognormal σ {scenario.activity_sigma}",
        "false_promotion_rate": per_effect["θ"]["promote_rate"],
        "power_at_margin": per_effect["+m"]["promote_rate"],
        "promotion_rate_at_zero": per_effect["0"]["promote_rate"],
        "median_votes_to_decision": {
            k: v["median_votes_to_decision"] for k, v in per_effect.items()
        },
        "per_effect": per_effect,
    }
    if args.quick:
        result["votes_per_second"] = {}
        for rate in (3, 10):
            world = dataclasses.replace(
                scenario, votes_per_batch=int(rate * scenario.batch_seconds)
            )
            result["votes_per_second"][str(rate)] = {
                f"{p:+d}pt": _summary(
                    p / 100,
                    simulate(config, dataclasses.replace(world, effect=p / 100), experiments, seed),
                )
                for p in (-20, 0, 20)
            }
    srm_world = dataclasses.replace(scenario, activity_sigma=1.5)
    lossy = dataclasses.replace(scenario, users=max(scenario.users, 3000), srm_loss=0.5)
    result["srm"] = {
        "level": config.srm_p_value,
        "false_hold_rate_sticky_lognormal_1.5": float(
            simulate(config, srm_world, experiments, seed=seed).srm_flagged.mean()
        ),
        "detection_rate_half_canary_users_lost": float(
            simulate(config, lossy, min(experiments, 200), seed=seed).srm_flagged.mean()
        ),
        "users_when_lossy": lossy.users,
    }
    result["by_activity"] = by_activity(config, scenario, experiments, seed)
    result["switch_seconds_max"] = None
    result["failed_requests"] = None
    if not args.no_serving:
        from benchmarks.routing_switch import run as measure_switch

        switch = measure_switch(args.flips)
        result.update(switch)
    result["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
