"""Canary decision quality by simulation, printed as JSON.

    python -m benchmarks.canary            # production config (m = 0.02), 1,000 runs/effect
    python -m benchmarks.canary --quick    # demo config (m = 0.05), 200 runs/effect

Keys: ``false_promotion_rate`` (canary worse by exactly m: promoted anyway),
``power_at_margin`` (canary better by m: promoted), ``median_votes_to_decision`` and the
promote / rollback rates per effect size, and the false SRM rate. ``switch_seconds_max``
and ``failed_requests`` measure the routing switch on two real serving replicas under load
(`benchmarks/routing_switch.py`; `--no-serving` skips it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script (./dev bench canary), not only with -m
    sys.path.insert(0, str(ROOT))

from deploy.canary_sim import Scenario, simulate  # noqa: E402
from deploy.canary_stats import PROMOTE, ROLLBACK, CanaryConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks.canary", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
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
        config = CanaryConfig.demo()
        scenario = Scenario(effect=0.0, batch_seconds=10, max_batches=200)
        experiments = args.experiments or 200
    else:
        # Production thresholds; time is compressed (a batch = 10 simulated minutes of
        # 1,000 votes) so min/max durations do not bind before the vote limits do.
        config = dataclasses.replace(CanaryConfig(), min_duration_s=0, min_stage_duration_s=0)
        scenario = Scenario(
            effect=0.0, users=5000, votes_per_batch=1000, batch_seconds=600, max_batches=250
        )
        experiments = args.experiments or 1000
    m = config.margin
    started = time.monotonic()
    per_effect = {}
    for label, effect in (("-2m", -2 * m), ("-m", -m), ("0", 0.0), ("+m", m), ("+2m", 2 * m)):
        sc = dataclasses.replace(scenario, effect=effect)
        r = simulate(config, sc, experiments, seed=args.seed)
        decided = r.action != 0
        per_effect[label] = {
            "effect": effect,
            "promote_rate": r.rate(PROMOTE),
            "rollback_rate": r.rate(ROLLBACK),
            "median_votes_to_decision": float(np.median(r.votes[decided]))
            if decided.any()
            else None,
            "false_srm_rate": float(r.srm_flagged.mean()),
        }
    result = {
        "config": "demo" if args.quick else "production",
        "margin": m,
        "alpha": config.alpha,
        "experiments_per_effect": experiments,
        "votes_per_look": scenario.votes_per_batch,
        "max_votes_per_arm": config.max_votes_per_arm,
        "false_promotion_rate": per_effect["-m"]["promote_rate"],
        "power_at_margin": per_effect["+m"]["promote_rate"],
        "promotion_rate_at_zero": per_effect["0"]["promote_rate"],
        "median_votes_to_decision": {
            k: v["median_votes_to_decision"] for k, v in per_effect.items()
        },
        "per_effect": per_effect,
        "switch_seconds_max": None,
        "failed_requests": None,
    }
    if not args.no_serving:
        from benchmarks.routing_switch import run as measure_switch

        switch = measure_switch(args.flips)
        result.update(switch)
    result["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
