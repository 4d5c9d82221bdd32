"""``alignloop train reward`` (:func:`train_reward`, dispatched by
:func:`trainer.rounds.cli.train_main`) and ``alignloop reward list | show VERSION``.

``train reward``'s flags are generated from :class:`RewardConfig`, one per field
(``--steps``, ``--no-warm-start``, ``--rules '[...]'``), with the field's help text; the
database, state directory and base model default to the settings (``ALIGNLOOP_*``).

Exit codes of ``train reward``: 0 a new current version, 4 the candidate was rejected by
the gate (recorded, the current one stays), 3 not enough data (nothing made), 5 stopped by
``--stop-after-steps`` (run again to resume), 1 a corrupted checkpoint or other failure,
2 bad usage. A JSON summary of the round goes to stdout; progress and messages to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from schemas.config_flags import add_config_flags
from trainer.common import artifacts
from trainer.reward.config import RewardConfig

EXIT_REGISTERED, EXIT_FAILED, EXIT_USAGE, EXIT_NO_DATA, EXIT_REJECTED, EXIT_STOPPED = (
    0,
    1,
    2,
    3,
    4,
    5,
)


def _settings():
    from schemas.settings import Settings

    return Settings()


def config_from_args(argv: list[str]) -> RewardConfig:
    parser = argparse.ArgumentParser(
        prog="alignloop train reward",
        description="Train, evaluate and version the reward model from the live feedback.",
    )
    add_config_flags(parser, RewardConfig)
    args = vars(parser.parse_args(argv))
    settings = _settings()
    args["database_url"] = args["database_url"] or settings.database_url
    args["state_dir"] = Path(args["state_dir"] or settings.state_dir)
    if not args["seq_cls_model"]:
        args["base_model"] = Path(
            args["base_model"] or settings.base_model or settings.demo_model_dir()
        ).resolve()
    return RewardConfig(**args)


def train_reward(argv: list[str]) -> int:
    """One reward model round from the command line; returns the exit code."""
    from trainer.common.onednn_cache import bound_computation_caches
    from trainer.reward.checkpoints import CheckpointCorrupted
    from trainer.reward.data import InsufficientData
    from trainer.reward.rules import build_rules
    from trainer.reward.trainer import train_reward_model

    config = config_from_args(argv)
    if not config.database_url:
        print(
            "alignloop train reward: set ALIGNLOOP_DATABASE_URL or --database-url", file=sys.stderr
        )
        return EXIT_USAGE
    if config.base_model and not (config.base_model / "config.json").is_file():
        print(
            f"alignloop train reward: no model at {config.base_model} "
            "(build the demo model with `alignloop bootstrap-model`, or set --base-model)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        build_rules(config.rules)  # fail on a misspelt rule now, not in PPO later
    except ValueError as exc:
        print(f"alignloop train reward: {exc}", file=sys.stderr)
        return EXIT_USAGE
    bound_computation_caches()  # before the first product
    try:
        result = train_reward_model(config)
    except InsufficientData as exc:
        print(f"alignloop train reward: {exc}", file=sys.stderr)
        return EXIT_NO_DATA
    except CheckpointCorrupted as exc:
        print(f"alignloop train reward: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(result.to_json(), indent=2))
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{result.outcome}: {result.reason}", file=sys.stderr)
    return {"registered": EXIT_REGISTERED, "rejected": EXIT_REJECTED}.get(
        result.outcome, EXIT_STOPPED
    )


# --- alignloop reward list | show ----------------------------------------------------------


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def reward_main(argv: list[str] | None = None) -> int:
    """``alignloop reward list`` (a table) | ``alignloop reward show VERSION`` (JSON)."""
    from feedback.db import connect, migrate
    from trainer.reward import registry

    parser = argparse.ArgumentParser(prog="alignloop reward", description=reward_main.__doc__)
    parser.add_argument("--database-url", default=_settings().database_url)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every version, newest first")
    show = sub.add_parser("show", help="one version's record, checked against its files")
    show.add_argument("version")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.database_url:
        print("alignloop reward: set ALIGNLOOP_DATABASE_URL or --database-url", file=sys.stderr)
        return EXIT_USAGE
    with connect(args.database_url, autocommit=True) as conn:
        migrate(conn)
        if args.command == "list":
            _print_table(registry.list_versions(conn))
            return 0
        record = registry.get_version(conn, args.version)
    if record is None:
        print(f"alignloop reward: no version {args.version!r}", file=sys.stderr)
        return 1
    shown = record.to_json()
    try:
        registry.verified_path(record)
        shown["files"] = "ok"
    except artifacts.CorruptedDirectory as exc:
        shown["files"] = f"CORRUPTED: {exc}"
    print(json.dumps(shown, indent=2, default=str))
    return 0


def _print_table(versions: list) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("version", "status", "created", "parent", "pair acc", "auc", "reason")
    for v in versions:
        table.add_row(
            v.version,
            v.status,
            v.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            v.parent_version or "-",
            _fmt(v.metrics.get("pairwise_accuracy")),
            _fmt(v.metrics.get("auc")),
            v.reason,
        )
    Console(width=160).print(table)
