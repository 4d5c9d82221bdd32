"""Feedback throughput end to end: HTTP API → Kafka → ingestor → Postgres.

Starts a broker, a serving process and an ingestor process (as `alignloop up` would),
creates a fresh database, then sends N ratings through `POST /v1/feedback` from C
concurrent clients and waits until every accepted rating is a row in Postgres.

    python -m benchmarks.feedback [--quick] [--events 30000] [--clients 64]

Prints one JSON object on stdout: `events_per_s` (accepted ratings per second from the
first request until the last one is stored), `http_accept_per_s`, `accepted`, `stored`,
`lost` (accepted but never stored), `duplicates` (rows beyond one per rating),
`lag_p50_s` / `lag_p99_s` (Postgres commit time − the API's event time).
Uses ALIGNLOOP_TEST_PG_ADMIN_URL (default postgres@127.0.0.1:5432) to create the database.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

from deploy.local.broker import EmbeddedBroker, free_port
from feedback.db import connect_and_migrate
from serving.response_ids import ResponseIdSigner
from tests.fixtures.load import post_all
from tests.fixtures.postgres import create_database, drop_database
from tests.fixtures.server import AUTH, RESPONSE_ID_SECRET, start_serving, wait_healthy


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="a smaller load (CI-sized)")
    ap.add_argument("--events", type=int, default=30_000)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--model-dir", type=Path, help="default: the cached demo model")
    args = ap.parse_args()
    if args.quick:
        args.events = 5_000

    if args.model_dir is None:
        from tests.fixtures.model import demo_model_cache_dir
        from trainer.demo.model import bootstrap_demo_model

        args.model_dir = bootstrap_demo_model(demo_model_cache_dir())

    work = Path(tempfile.mkdtemp(prefix="alignloop-bench-feedback-"))
    db_url = create_database()
    with connect_and_migrate(db_url):
        pass
    broker = EmbeddedBroker(log_path=work / "broker.log")
    broker.start()
    port = free_port()
    # One key sends every rating, far faster than a product would: the per-key limit is
    # raised above the load (the limiter still runs on every request; docs/api.md#limits).
    limits = {
        "ALIGNLOOP_FEEDBACK_RATE_LIMIT_RPS": "1000000",
        "ALIGNLOOP_FEEDBACK_RATE_LIMIT_BURST": "1000000",
    }
    serving, _ = start_serving(
        args.model_dir, broker.bootstrap, work / "serving", port, extra_env=limits
    )
    env = {
        **os.environ,
        "ALIGNLOOP_DATABASE_URL": db_url,
        "ALIGNLOOP_KAFKA_BOOTSTRAP": broker.bootstrap,
        "ALIGNLOOP_INGEST_METRICS_PORT": str(free_port()),
    }
    with open(work / "ingestor.log", "ab") as out:
        ingestor = subprocess.Popen(
            [sys.executable, "-m", "deploy.cli", "ingest"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        log("starting serving (vLLM engine) and the ingestor…")
        if not wait_healthy(url, serving, 400):
            log(f"serving did not start; logs in {work}")
            return 1
        signer = ResponseIdSigner(RESPONSE_ID_SECRET.encode())
        # Warm up: connections, topic creation, the ingestor's group join.
        post_all(
            url,
            "/v1/feedback",
            [
                {"response_id": signer.new_id("ops", "warmup", 1), "rating": "up", "user": "warmup"}
                for _ in range(200)
            ],
            8,
            headers=AUTH,
        )
        user = f"bench-{uuid.uuid4().hex[:8]}"
        payloads = [
            {
                "response_id": signer.new_id("ops", user, 1),
                "rating": "up" if i % 2 else "down",
                "user": user,
            }
            for i in range(args.events)
        ]
        log(f"sending {args.events} ratings from {args.clients} clients…")
        started = time.time()
        result = post_all(url, "/v1/feedback", payloads, args.clients, headers=AUTH)
        log(
            f"accepted {result.accepted} in {result.seconds:.1f} s "
            f"({result.accepted / result.seconds:.0f}/s); waiting for Postgres…"
        )
        deadline = time.monotonic() + 180
        with psycopg.connect(db_url, autocommit=True) as conn:
            while time.monotonic() < deadline:
                stored = conn.execute(
                    "SELECT count(DISTINCT feedback_id) FROM feedback_events WHERE user_id = %s",
                    (user,),
                ).fetchone()[0]
                if stored >= result.accepted:
                    break
                time.sleep(0.5)
            time.sleep(2)
            rows = conn.execute(
                "SELECT feedback_id::text, extract(epoch FROM ingested_at), "
                "extract(epoch FROM ingested_at - occurred_at) FROM feedback_events "
                "WHERE user_id = %s",
                (user,),
            ).fetchall()
    finally:
        for p in (serving, ingestor):
            p.terminate()
        for p in (serving, ingestor):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        broker.stop()
        drop_database(db_url)

    stored_ids = {r[0] for r in rows}
    accepted = set(result.accepted_ids)
    last_stored = max((float(r[1]) for r in rows), default=started)
    lags = [float(r[2]) for r in rows]
    out = {
        "events_per_s": len(accepted & stored_ids) / max(last_stored - started, 1e-9),
        "http_accept_per_s": result.accepted / result.seconds,
        "accepted": result.accepted,
        "stored": len(stored_ids),
        "lost": len(accepted - stored_ids),
        "duplicates": len(rows) - len(stored_ids),
        "rejected_or_failed": args.events - result.accepted,
        "lag_p50_s": pct(lags, 0.5),
        "lag_p99_s": pct(lags, 0.99),
        "config": {"events": args.events, "clients": args.clients},
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
