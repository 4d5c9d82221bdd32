"""``alignloop simulate``: the command line of the traffic simulator.

Contract. :func:`add_arguments` puts the simulator's flags on a parser and
:func:`config_from_args` turns the parsed flags into a :class:`SimConfig` (both reused by
``benchmarks/loop.py``); :func:`main` runs one simulation: the per-minute table on stdout,
then the JSON summary (also written to ``--json-out``). Ctrl-C stops the run early and
still prints the summary. Exit status: 0 when the run finished (errors are counted in the
summary, not fatal), 2 when it could not start (bad flags, unreadable prompts file,
``--until`` without admin access).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path

from deploy.simulator.driver import DEFAULT_ADMIN_URL, SimConfig, SimulationError, Until, run
from deploy.simulator.population import PopulationConfig
from deploy.simulator.preferences import BUILTINS


def _until(text: str) -> Until:
    try:
        return Until.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# Long on purpose: the flag declarations of `alignloop simulate`, one after another.
def add_arguments(ap: argparse.ArgumentParser, *, with_target: bool = True) -> None:
    """The simulator's flags; ``with_target`` False leaves out where the stack is (for a
    caller that starts the stack itself)."""
    d, p = SimConfig(), PopulationConfig()
    if with_target:
        target = ap.add_argument_group("the alignloop to drive")
        target.add_argument("--base-url", default=d.base_url, help="chat API (default %(default)s)")
        target.add_argument(
            "--api-key",
            help="chat API key (default: ALIGNLOOP_API_KEY, else STATE_DIR/api_key)",
        )
        target.add_argument(
            "--admin-url",
            default=DEFAULT_ADMIN_URL,
            help="admin API for registry events (default %(default)s; '' = do not track)",
        )
        target.add_argument(
            "--admin-token",
            help="admin bearer token (default: ALIGNLOOP_ADMIN_TOKEN, else STATE_DIR/admin_token)",
        )
        target.add_argument(
            "--state-dir",
            help="where to find admin_token and api_key (default: ALIGNLOOP_STATE_DIR or "
            "./.alignloop)",
        )
    g = ap.add_argument_group("traffic")
    g.add_argument("--users", type=int, default=p.users, help="simulated users (%(default)s)")
    g.add_argument("--rate", type=float, default=d.rate, help="turns per second (%(default)s)")
    g.add_argument(
        "--concurrency", type=int, default=d.concurrency, help="turns in flight (%(default)s)"
    )
    g.add_argument("--minutes", type=float, default=d.minutes, help="run length (%(default)s)")
    g.add_argument(
        "--until",
        type=_until,
        help="stop early at: candidate, canary, promotion, rollback or N-promotions (admin API)",
    )
    g.add_argument("--model", default=d.model, help="model name to ask for (%(default)s)")
    g.add_argument("--max-tokens", type=int, default=d.max_tokens, help="(%(default)s)")
    g.add_argument("--temperature", type=float, default=d.temperature, help="(%(default)s)")
    g.add_argument(
        "--prompts", dest="prompts_file", help="JSONL prompts file (default: built-in templates)"
    )
    g.add_argument(
        "--answerable-share",
        type=float,
        default=d.answerable_share,
        help="share of answerable built-in questions (%(default)s)",
    )
    g.add_argument("--seed", type=int, default=d.seed, help="(%(default)s)")
    u = ap.add_argument_group("the users")
    u.add_argument(
        "--preference",
        default=d.preference,
        help=f"hidden preference: {', '.join(BUILTINS)}, A+B, or module:callable "
        "(default %(default)s)",
    )
    u.add_argument(
        "--rate-share", type=float, default=p.rate_share, help="share who rate (%(default)s)"
    )
    u.add_argument(
        "--rate-prob",
        type=float,
        default=p.rate_prob,
        help="probability a rater rates an answer (%(default)s)",
    )
    u.add_argument(
        "--noise", type=float, default=p.noise, help="vote flip probability (%(default)s)"
    )
    u.add_argument(
        "--bias-sd", type=float, default=p.bias_sd, help="per-user bias sd (%(default)s)"
    )
    u.add_argument(
        "--activity-sigma",
        type=float,
        default=p.activity_sigma,
        help="log-normal activity sigma; 0 = uniform (%(default)s)",
    )
    u.add_argument(
        "--compare-share",
        type=float,
        default=p.compare_share,
        help="share who send A-vs-B preferences (%(default)s)",
    )
    u.add_argument(
        "--compare-prob",
        type=float,
        default=p.compare_prob,
        help="how often such a user compares (%(default)s)",
    )
    o = ap.add_argument_group("output")
    o.add_argument(
        "--report-interval",
        type=float,
        default=d.report_interval_s,
        help="seconds per table row (%(default)s)",
    )
    o.add_argument("--json-out", type=Path, help="also write the JSON summary here")


def config_from_args(args: argparse.Namespace, **overrides) -> SimConfig:
    """A :class:`SimConfig` from :func:`add_arguments`' flags (``overrides`` win)."""
    population = PopulationConfig(
        users=args.users,
        rate_share=args.rate_share,
        rate_prob=args.rate_prob,
        noise=args.noise,
        bias_sd=args.bias_sd,
        activity_sigma=args.activity_sigma,
        compare_share=args.compare_share,
        compare_prob=args.compare_prob,
        seed=args.seed,
    )
    values = {
        "population": population,
        "minutes": args.minutes,
        "rate": args.rate,
        "concurrency": args.concurrency,
        "until": args.until,
        "model": args.model,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "prompts_file": args.prompts_file,
        "answerable_share": args.answerable_share,
        "preference": args.preference,
        "report_interval_s": args.report_interval,
        "seed": args.seed,
    }
    for name in ("base_url", "api_key", "admin_url", "admin_token", "state_dir"):
        if hasattr(args, name):
            values[name] = getattr(args, name)
    if values.get("admin_url") == "":
        values["admin_url"] = None
    values.update(overrides)
    return SimConfig(**values)


async def run_until_interrupted(config: SimConfig, out=sys.stdout):
    """:func:`run`, with SIGINT / SIGTERM ending it gracefully (summary still made)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    return await run(config, out=out, stop=stop)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="alignloop simulate",
        description="Drive a running alignloop with simulated users (chat, thumbs, "
        "preferences) and report, per minute and per policy version, what they saw.",
    )
    add_arguments(ap)
    args = ap.parse_args(argv)
    try:
        config = config_from_args(args)
        summary = asyncio.run(run_until_interrupted(config))
    except (SimulationError, ValueError) as e:
        print(f"alignloop simulate: {e}", file=sys.stderr)
        return 2
    text = json.dumps(summary.to_dict(), indent=2)
    print(text, flush=True)
    if args.json_out is not None:
        args.json_out.write_text(text + "\n")
    return 0
