"""``alignloop policy``: the operators' view of and hands on the registry.

    alignloop policy list
    alignloop policy show V
    alignloop policy promote V [--expect STATE]
    alignloop policy rollback [--to V]
    alignloop policy canary V --weight W
    alignloop policy reject V
    alignloop policy hold | resume

``list`` and ``show`` include each version's live A/B counts (the ``policy_stats`` table:
answers served and rated, current thumbs up and down).

Every change needs ``--reason`` (it goes to the audit log with the actor: ``--actor`` or
``$USER``). Exit status: 0 done, 1 refused by the registry (the message says why), 2 usage.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from typing import Any

from deploy.policies import registry
from feedback.ab_counters import PolicyCounts, policy_counts


def _actor(explicit: str | None) -> str:
    if explicit:
        return explicit
    try:
        return os.environ.get("USER") or getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "unknown-operator"


def _parser() -> argparse.ArgumentParser:
    from schemas.settings import Settings

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--database-url", default=Settings().database_url)
    common.add_argument("--actor", help="who is acting (default: $USER)")
    common.add_argument("--reason", default="", help="why (recorded in the audit log)")
    common.add_argument("--json", action="store_true", help="machine-readable output")

    ap = argparse.ArgumentParser(prog="alignloop policy", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("list", parents=[common], help="all versions and the routing table")
    show = sub.add_parser("show", parents=[common], help="one version and its audit trail")
    show.add_argument("version")
    promote = sub.add_parser("promote", parents=[common], help="make V the stable")
    promote.add_argument("version")
    promote.add_argument("--expect", help="fail unless V is in this state now")
    rollback = sub.add_parser(
        "rollback", parents=[common], help="end the canary, or go back to a previous stable"
    )
    rollback.add_argument("--to", help="the version to make stable again")
    canary = sub.add_parser(
        "canary", parents=[common], help="start V as canary, or change the canary's weight"
    )
    canary.add_argument("version")
    canary.add_argument("--weight", type=float, required=True, help="traffic share, 0 < W < 1")
    reject = sub.add_parser("reject", parents=[common], help="refuse a candidate or canary")
    reject.add_argument("version")
    reject.add_argument("--expect", help="fail unless V is in this state now")
    sub.add_parser("hold", parents=[common], help="stop the canary controller from acting")
    sub.add_parser("resume", parents=[common], help="let the canary controller act again")
    return ap


def _routing_dict(r: registry.Routing) -> dict:
    return {
        "stable": r.stable_version,
        "canary": r.canary_version,
        "canary_weight": r.canary_weight,
        "canary_stage": r.canary_stage,
        "held": r.held,
        "held_by": r.held_by,
        "held_reason": r.held_reason,
        "generation": r.generation,
    }


def _print_routing(r: registry.Routing) -> None:
    line = f"routing (generation {r.generation}): stable {r.stable_version}"
    if r.canary_version:
        line += f", canary {r.canary_version} at {r.canary_weight:.0%} (stage {r.canary_stage})"
    if r.held:
        line += f"; HELD by {r.held_by}: {r.held_reason}"
    print(line)


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: Any, fmt: str = "{:+.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def live_counts_line(c: PolicyCounts) -> str:
    """One version's ``policy_stats`` counts, as ``show`` prints them."""
    return (
        f"live counts: served {c.served}, rated {c.rated}, up {c.ups}, down {c.downs}"
        f" (up {_pct(c.up_rate)})"
    )


def comparison_lines(v: registry.PolicyVersion, trail: list[registry.AuditEntry]) -> list[str]:
    """The version's offline evaluation (held-out prompts scored by the reward model, at
    registration) beside its live A/B result (the controller's latest look at users'
    thumbs), as a table: what the trainer expected next to what users did."""
    evaluation = (v.metrics or {}).get("evaluation") or {}
    cand, stab = evaluation.get("candidate") or {}, evaluation.get("stable") or {}
    live = next((a for a in reversed(trail) if a.statistics and "estimate" in a.statistics), None)
    stats = live.statistics if live is not None else {}
    votes, ups = stats.get("votes") or {}, stats.get("ups") or {}
    prompts = evaluation.get("prompts", "-")

    def rate(arm: str) -> float | None:
        return ups[arm] / votes[arm] if votes.get(arm) else None

    rows = [
        ("", "offline: candidate", "stable", "live: canary", "stable"),
        ("score", _num(cand.get("reward")), _num(stab.get("reward")),
         f"up {_pct(rate('canary'))}", f"up {_pct(rate('stable'))}"),
        ("answers / votes", str(prompts), str(prompts),
         str(votes.get("canary", "-")), str(votes.get("stable", "-"))),
        ("length (words)", _num(cand.get("length_words"), "{:.1f}"),
         _num(stab.get("length_words"), "{:.1f}"), "", ""),
        ("distinct-2", _num(cand.get("distinct_2"), "{:.3f}"),
         _num(stab.get("distinct_2"), "{:.3f}"), "", ""),
    ]  # fmt: skip
    lines = [f"{a:16} {b:>20} {c:>10}   {d:>14} {e:>10}" for a, b, c, d, e in rows]
    if evaluation:
        lines.append(
            f"offline: win rate {_num(evaluation.get('win_rate'), '{:.3f}')}, reward gain "
            f"{_num(evaluation.get('reward_gain'))}, KL to the base "
            f"{_num(evaluation.get('kl_to_reference'), '{:.3f}')} nats "
            f"(reward model {v.reward_model_version or '-'}, round {v.training_round or '-'})"
        )
    else:
        lines.append("offline: no evaluation recorded (registered by hand?)")
    if live is not None:
        lines.append(
            f"live: canary − stable {_num(stats.get('estimate'))} "
            f"[{_num(stats.get('lower'))}, {_num(stats.get('upper'))}] "
            f"({live.at:%Y-%m-%d %H:%M:%S}, {live.action}: {live.reason})"
        )
    else:
        lines.append("live: not canaried yet")
    return lines


def main(argv: list[str] | None = None) -> int:
    """``alignloop policy COMMAND``."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if not args.database_url:
        print("alignloop policy: set ALIGNLOOP_DATABASE_URL or --database-url", file=sys.stderr)
        return 2
    from feedback.db import connect, migrate

    actor = _actor(args.actor)
    with connect(args.database_url, autocommit=True) as conn:
        migrate(conn)
        try:
            return _run(conn, args, actor)
        except (registry.RegistryError, ValueError) as exc:
            print(f"alignloop policy {args.command}: {exc}", file=sys.stderr)
            return 1


def _run(conn, args: argparse.Namespace, actor: str) -> int:
    if args.command == "list":
        return _list(conn, args)
    if args.command == "show":
        return _show(conn, args)
    return _change(conn, args, actor)


def _list(conn, args: argparse.Namespace) -> int:
    versions = registry.list_versions(conn)
    routing = registry.routing_table(conn)
    live = policy_counts(conn, [v.version for v in versions])
    if args.json:
        rows = [{"version": v.version, "state": v.state, "adapter": v.adapter_uri,
                 "created_at": v.created_at.isoformat(),
                 "live": live[v.version].to_dict()} for v in versions]  # fmt: skip
        print(json.dumps({"versions": rows, "routing": _routing_dict(routing)}))
        return 0
    print(
        f"{'VERSION':24} {'STATE':12} {'ROUND':>5}  {'CREATED':19}"
        f"  {'SERVED':>7} {'UP':>6} {'DOWN':>6}  ADAPTER"
    )
    for v in versions:
        rnd = "" if v.training_round is None else str(v.training_round)
        created = v.created_at.strftime("%Y-%m-%d %H:%M:%S")
        c = live[v.version]
        print(
            f"{v.version:24} {v.state:12} {rnd:>5}  {created}"
            f"  {c.served:>7} {c.ups:>6} {c.downs:>6}  {v.adapter_uri or '-'}"
        )
    _print_routing(routing)
    return 0


def _show(conn, args: argparse.Namespace) -> int:
    v = registry.get(conn, args.version)
    trail = registry.audit_log(conn, args.version)
    counts = policy_counts(conn, [args.version])[args.version]
    if args.json:
        info = {k: (val.isoformat() if hasattr(val, "isoformat") else val)
                for k, val in v.__dict__.items()}  # fmt: skip
        info["live"] = counts.to_dict()
        info["audit"] = [{"at": a.at.isoformat(), "actor": a.actor, "action": a.action,
                          "from": a.from_state, "to": a.to_state, "reason": a.reason,
                          "statistics": a.statistics} for a in trail]  # fmt: skip
        print(json.dumps(info))
        return 0
    for key, val in v.__dict__.items():
        if key != "metrics":
            print(f"{key:22} {val}")
    print()
    print("\n".join(comparison_lines(v, trail)))
    print(live_counts_line(counts))
    print("\naudit:")
    for a in trail:
        move = f"{a.from_state or '-'} -> {a.to_state or '-'}"
        print(f"  {a.at:%Y-%m-%d %H:%M:%S} {a.actor:12} {a.action:18} {move:24} {a.reason}")
    return 0


def _change(conn, args: argparse.Namespace, actor: str) -> int:
    """promote, rollback, canary, reject, hold, resume: one registry command, then the
    routing it left."""
    cmd = args.command
    if cmd == "promote":
        r = registry.promote(
            conn, args.version, actor=actor, reason=args.reason, expect_state=args.expect
        )
    elif cmd == "rollback":
        r = registry.rollback(conn, actor=actor, reason=args.reason, to=args.to)
    elif cmd == "canary":
        current = registry.routing_table(conn)
        if current.canary_version == args.version:
            r = registry.set_canary_weight(
                conn, args.version, args.weight, actor=actor, reason=args.reason,
                expect_generation=current.generation,
            )  # fmt: skip
        else:
            r = registry.start_canary(
                conn, args.version, args.weight, actor=actor, reason=args.reason,
                expect_generation=current.generation,
            )  # fmt: skip
    elif cmd == "reject":
        r = registry.reject(
            conn, args.version, actor=actor, reason=args.reason, expect_state=args.expect
        )
    elif cmd in ("hold", "resume"):
        changed = (registry.hold if cmd == "hold" else registry.resume)(
            conn, actor=actor, reason=args.reason
        )
        if not changed:
            print(f"already {'held' if cmd == 'hold' else 'not held'}; nothing changed")
        r = registry.routing_table(conn)
    else:  # argparse keeps us from getting here
        return 2
    if args.json:
        print(json.dumps(_routing_dict(r)))
    else:
        _print_routing(r)
    return 0
