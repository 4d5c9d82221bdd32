"""Entry points: ``alignloop ingest`` (:func:`main`) and ``alignloop data`` (:func:`data_main`:
``export``, ``delete`` a user, ``purge`` old rows).

Defaults come from the environment (``ALIGNLOOP_DATABASE_URL``, ``ALIGNLOOP_KAFKA_BOOTSTRAP``
through :class:`schemas.settings.Settings`, plus the ``ALIGNLOOP_INGEST_*`` names listed on
:class:`feedback.ingest.consumer.IngestConfig`); flags override them.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import signal
import sys
from pathlib import Path

from schemas import topics


def _settings():
    from schemas.settings import Settings

    return Settings()


def _ingest_parser(settings) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="alignloop ingest", description=main.__doc__)
    ap.add_argument("--database-url", default=settings.database_url)
    ap.add_argument("--bootstrap", default=settings.kafka_bootstrap)
    ap.add_argument("--group-id", default=settings.ingest_group_id)
    ap.add_argument("--interactions-topic", default=topics.INTERACTIONS)
    ap.add_argument("--feedback-topic", default=topics.FEEDBACK)
    ap.add_argument(
        "--policy-topic", default=topics.POLICY, help="adapter health events; '' = not consumed"
    )
    ap.add_argument("--dead-letter-topic", default=topics.DEAD_LETTER)
    ap.add_argument(
        "--metrics-port",
        type=int,
        default=settings.ingest_metrics_port,
        help="Prometheus /metrics port; 0 disables it",
    )
    ap.add_argument("--max-batch", type=int, default=settings.ingest_max_batch)
    ap.add_argument("--client-id", default="alignloop-ingestor")
    ap.add_argument(
        "--retention-days",
        type=float,
        default=settings.retention_days,
        help="purge rows older than this, at start and hourly (default: keep everything)",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    """``alignloop ingest``: run the feedback ingestor until SIGTERM / Ctrl-C."""
    from feedback import user_ids
    from feedback.ingest.consumer import IngestConfig, Ingestor
    from feedback.kafka_topics import TopicError
    from feedback.user_ids import KeyMismatch

    settings = _settings()
    args = _ingest_parser(settings).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)  # its INFO is per-connection chatter
    if not args.database_url or not args.bootstrap:
        print(
            "alignloop ingest: set ALIGNLOOP_DATABASE_URL and ALIGNLOOP_KAFKA_BOOTSTRAP "
            "(or --database-url / --bootstrap); `alignloop up` sets both",
            file=sys.stderr,
        )
        return 2
    try:
        kafka = _kafka_setup(settings, args)
    except ValueError as exc:
        print(f"alignloop ingest: {exc}", file=sys.stderr)
        return 2
    ingestor = Ingestor(
        IngestConfig(
            database_url=args.database_url,
            bootstrap=args.bootstrap,
            group_id=args.group_id,
            interactions_topic=args.interactions_topic,
            feedback_topic=args.feedback_topic,
            policy_topic=args.policy_topic or None,
            dead_letter_topic=args.dead_letter_topic,
            metrics_port=args.metrics_port or None,
            max_batch=args.max_batch,
            client_id=args.client_id,
            retention_days=args.retention_days,
            user_id_key=user_ids.configured(settings).key,
            **kafka,
        )
    )

    def _graceful(signum: int, frame: object) -> None:
        ingestor.stop()  # the current batch finishes (or is dropped uncommitted), then exit

    signal.signal(signal.SIGTERM, _graceful)
    signal.signal(signal.SIGINT, _graceful)
    try:
        ingestor.run()
    except (KeyMismatch, TopicError) as exc:
        print(f"alignloop ingest: {exc}", file=sys.stderr)
        return 2
    return 0


def _kafka_setup(settings, args: argparse.Namespace) -> dict:
    """The ingestor's Kafka security and topic plan from the settings (ValueError: a
    contradictory configuration)."""
    from feedback.kafka_topics import TopicPlan
    from schemas.kafka_config import kafka_python_config

    names = [args.interactions_topic, args.feedback_topic, args.dead_letter_topic]
    if args.policy_topic:
        names.append(args.policy_topic)
    return {
        "client_config": kafka_python_config(settings),
        "topic_plan": TopicPlan.from_settings(settings, names),
    }


def export_main(argv: list[str] | None = None) -> int:
    """``alignloop data export {pairs,pointwise,prompts} --out FILE.jsonl``."""
    from feedback import datasets
    from feedback.db import connect

    db_default = _settings().database_url
    ap = argparse.ArgumentParser(prog="alignloop data export", description=export_main.__doc__)
    ap.add_argument("kind", choices=["pairs", "pointwise", "prompts"])
    ap.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    ap.add_argument("--database-url", default=db_default)
    ap.add_argument("--n", type=int, default=1000, help="prompts: how many to sample")
    ap.add_argument("--heldout-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not args.database_url:
        print(
            "alignloop data export: set ALIGNLOOP_DATABASE_URL or --database-url", file=sys.stderr
        )
        return 2
    with connect(args.database_url, autocommit=True) as conn, datasets.snapshot(conn) as wm:
        if args.kind == "pairs":
            rows = (p.to_json() for p in datasets.preference_pairs(conn, wm))
        elif args.kind == "pointwise":
            rows = (p.to_json() for p in datasets.pointwise_labels(conn, wm))
        else:
            rows = (
                p.to_json()
                for p in datasets.rollout_prompts(
                    conn, wm, args.n, args.heldout_fraction, args.seed
                )
            )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        count = 0
        with open(args.out, "w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
    print(f"wrote {count} {args.kind} rows to {args.out} (watermark {wm})", file=sys.stderr)
    return 0


def _actor(explicit: str | None) -> str:
    if explicit:
        return explicit
    try:
        return os.environ.get("USER") or getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "unknown-operator"


def delete_main(argv: list[str] | None = None) -> int:
    """``alignloop data delete --user U --reason R``: erase one user's interactions,
    ratings and preferences (other users' ratings of the user's answers too), fix the A/B
    counters and keep a tombstone so the ingestor drops the user's late or redelivered
    events. Prints the rows deleted per table as JSON."""
    from feedback.db import connect, migrate
    from feedback.erasure import erase_user
    from feedback.user_ids import KeyMismatch, configured

    ap = argparse.ArgumentParser(prog="alignloop data delete", description=delete_main.__doc__)
    ap.add_argument("--user", required=True, help="the user id as the API received it")
    ap.add_argument("--reason", required=True, help="kept with the tombstone")
    ap.add_argument("--actor", help="who is acting, kept with the tombstone (default: $USER)")
    settings = _settings()
    ap.add_argument("--database-url", default=settings.database_url)
    args = ap.parse_args(argv)
    if not args.database_url:
        print("alignloop data delete: set ALIGNLOOP_DATABASE_URL or --database-url",
              file=sys.stderr)  # fmt: skip
        return 2
    if not args.user or not args.reason.strip():
        print("alignloop data delete: --user and a non-empty --reason are required",
              file=sys.stderr)  # fmt: skip
        return 2
    user_ids = configured(settings)
    with connect(args.database_url, autocommit=True) as conn:
        migrate(conn)
        try:
            counts = erase_user(
                conn, args.user, actor=_actor(args.actor), reason=args.reason, user_ids=user_ids
            )
        except KeyMismatch as exc:
            print(f"alignloop data delete: {exc}", file=sys.stderr)
            return 2
    print(json.dumps({"user": args.user, "deleted": counts}))
    return 0


def purge_main(argv: list[str] | None = None) -> int:
    """``alignloop data purge --older-than-days N``: delete interactions, ratings and
    preferences that occurred more than N days ago (what ``ALIGNLOOP_RETENTION_DAYS`` makes
    every ingestor do hourly). Prints the rows deleted per table as JSON."""
    from feedback.db import connect, migrate
    from feedback.erasure import purge_older_than

    ap = argparse.ArgumentParser(prog="alignloop data purge", description=purge_main.__doc__)
    ap.add_argument("--older-than-days", type=float, required=True)
    ap.add_argument("--database-url", default=_settings().database_url)
    args = ap.parse_args(argv)
    if not args.database_url:
        print("alignloop data purge: set ALIGNLOOP_DATABASE_URL or --database-url",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.older_than_days <= 0:
        print("alignloop data purge: --older-than-days must be positive", file=sys.stderr)
        return 2
    with connect(args.database_url, autocommit=True) as conn:
        migrate(conn)
        counts = purge_older_than(conn, args.older_than_days)
    print(json.dumps({"older_than_days": args.older_than_days, "deleted": counts}))
    return 0


_DATA_COMMANDS = {"export": export_main, "delete": delete_main, "purge": purge_main}


def data_main(argv: list[str] | None = None) -> int:
    """``alignloop data {export,delete,purge} ...``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in _DATA_COMMANDS:
        print(
            "usage: alignloop data export {pairs,pointwise,prompts} --out FILE.jsonl\n"
            "       alignloop data delete --user U --reason R [--actor A]\n"
            "       alignloop data purge --older-than-days N",
            file=sys.stderr,
        )
        return 2
    return _DATA_COMMANDS[args[0]](args[1:])


if __name__ == "__main__":
    sys.exit(main())
