"""Entry points: ``alignloop ingest`` (:func:`main`) and ``alignloop data export``
(:func:`export_main`).

Defaults come from the environment (``ALIGNLOOP_DATABASE_URL``, ``ALIGNLOOP_KAFKA_BOOTSTRAP``
through :class:`schemas.settings.Settings`, plus the ``ALIGNLOOP_INGEST_*`` names listed on
:class:`feedback.ingest.consumer.IngestConfig`); flags override them.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from schemas import topics


def _settings():
    from schemas.settings import Settings

    return Settings()


def main(argv: list[str] | None = None) -> int:
    """``alignloop ingest``: run the feedback ingestor until SIGTERM / Ctrl-C."""
    from feedback.ingest.consumer import IngestConfig, Ingestor

    settings = _settings()
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
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)  # its INFO is per-connection chatter
    if not args.database_url or not args.bootstrap:
        print(
            "alignloop ingest: set ALIGNLOOP_DATABASE_URL and ALIGNLOOP_KAFKA_BOOTSTRAP "
            "(or --database-url / --bootstrap); `alignloop up` sets both",
            file=sys.stderr,
        )
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
        )
    )

    def _graceful(signum: int, frame: object) -> None:
        ingestor.stop()  # the current batch finishes (or is dropped uncommitted), then exit

    signal.signal(signal.SIGTERM, _graceful)
    signal.signal(signal.SIGINT, _graceful)
    ingestor.run()
    return 0


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


def data_main(argv: list[str] | None = None) -> int:
    """``alignloop data SUBCOMMAND``: today only ``export``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "export":
        print(
            "usage: alignloop data export {pairs,pointwise,prompts} --out FILE.jsonl",
            file=sys.stderr,
        )
        return 2
    return export_main(args[1:])


if __name__ == "__main__":
    sys.exit(main())
