"""Ratings under a chat flood: how fast feedback stays while chat is 10x over capacity.

Starts a broker, a fresh database, a serving process whose replica holds at most
``--queue-bound`` generations at once (``ALIGNLOOP_MAX_QUEUED_GENERATIONS``; the per-key
rate limits keep their defaults) and an ingestor process, then runs
:func:`tests.fixtures.saturation.flood` twice:

1. *calm*: one chat client (below capacity) sending ``--calm-requests`` chat requests
   while 4 threads send ratings;
2. *flood*: ``--factor`` x the queue bound chat clients from 4 keys, each sending
   ``--requests`` short chat requests back to back, while the same 4 threads rate.

and waits until every accepted rating is a row in Postgres.

    python -m benchmarks.saturation [--quick] [--queue-bound 4] [--factor 10] [--requests 50]

Prints one JSON object on stdout: per phase, the ratings' latency (``feedback_p50_ms``,
``feedback_p99_ms``, ``feedback_max_ms``; client side, accepted ratings only), their
statuses, the chat statuses and 429 codes, 429s not in the OpenAI shape, chat requests
with no HTTP answer, and the serving process's RSS (before, peak, after, MiB); then
``ratings_accepted``, ``ratings_stored``, ``ratings_lost`` and ``ratings_duplicated``.
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
from pathlib import Path
from typing import Any

import psycopg

from deploy.local.broker import EmbeddedBroker, free_port
from feedback.db import connect_and_migrate
from serving.api_keys import add_key
from serving.response_ids import ResponseIdSigner
from tests.fixtures.postgres import create_database, drop_database
from tests.fixtures.saturation import FloodResult, flood, percentile, rss_kb
from tests.fixtures.server import RESPONSE_ID_SECRET, start_serving, wait_healthy, write_test_keys

KEYS = {
    **{f"flood-{i}": f"al-bench-saturation-flood-{i}-key-{'0' * 20}" for i in range(4)},
    "rater": f"al-bench-saturation-rater-key-{'0' * 20}",
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(1000 * value, 2)


def summary(result: FloodResult, rss_before: int, rss_after: int) -> dict[str, Any]:
    latencies = result.rating_latencies_s
    return {
        "seconds": round(result.seconds, 1),
        "feedback_p50_ms": _ms(percentile(latencies, 0.5)),
        "feedback_p99_ms": _ms(percentile(latencies, 0.99)),
        "feedback_max_ms": _ms(max(latencies, default=None)),
        "feedback_statuses": dict(result.rating_statuses),
        "chat_statuses": dict(result.chat_statuses),
        "chat_429_codes": dict(result.chat_429_codes),
        "bad_429s": len(result.bad_429s),
        "chat_no_answer": len(result.chat_errors),
        "rss_mib": {
            "before": round(rss_before / 1024),
            "peak": round(max(result.rss_kb, default=rss_before) / 1024),
            "after": round(rss_after / 1024),
        },
    }


# Long on purpose: start, two phases, count, stop, in the order they happen (as
# benchmarks/feedback.py).
def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="fewer chat requests (CI-sized)")
    ap.add_argument("--queue-bound", type=int, default=4)
    ap.add_argument("--factor", type=int, default=10, help="chat clients per queue place")
    ap.add_argument("--requests", type=int, default=50, help="chat requests per flood client")
    ap.add_argument("--calm-requests", type=int, default=100, help="chat requests when calm")
    ap.add_argument("--model-dir", type=Path, help="default: the cached demo model")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.calm_requests = 8, 30

    if args.model_dir is None:
        from tests.fixtures.model import demo_model_cache_dir
        from trainer.demo.model import bootstrap_demo_model

        args.model_dir = bootstrap_demo_model(demo_model_cache_dir())

    work = Path(tempfile.mkdtemp(prefix="alignloop-bench-saturation-"))
    db_url = create_database()
    with connect_and_migrate(db_url):
        pass
    broker = EmbeddedBroker(log_path=work / "broker.log")
    broker.start()
    keys_file = write_test_keys(work / "serving")
    for name, key in KEYS.items():
        add_key(keys_file, name, key, ["feedback"] if name == "rater" else ["chat"])
    port = free_port()
    serving, _ = start_serving(
        args.model_dir,
        broker.bootstrap,
        work / "serving",
        port,
        extra_env={"ALIGNLOOP_MAX_QUEUED_GENERATIONS": str(args.queue_bound)},
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
    signer = ResponseIdSigner(RESPONSE_ID_SECRET.encode())
    flood_keys = [KEYS[f"flood-{i}"] for i in range(4)]
    common = {"pid": serving.pid, "rating_key": KEYS["rater"], "rating_principal": "rater"}
    out: dict[str, Any] = {}
    try:
        log("starting serving (vLLM engine) and the ingestor…")
        if not wait_healthy(url, serving, 400):
            log(f"serving did not start; logs in {work}")
            return 1
        # Warm up: connections, topic creation, the engine's first batches.
        flood(url, chat_keys=flood_keys[:1], threads_per_key=2, requests_per_thread=5,
              signer=signer, **common)  # fmt: skip
        accepted: list[str] = []
        for phase, chat_keys, threads, requests in (
            ("calm", flood_keys[:1], 1, args.calm_requests),
            ("flood", flood_keys, args.factor * args.queue_bound // 4, args.requests),
        ):
            log(f"{phase}: {len(chat_keys) * threads} chat clients…")
            before = rss_kb(serving.pid)
            result = flood(url, chat_keys=chat_keys, threads_per_key=threads,
                           requests_per_thread=requests, signer=signer, **common)  # fmt: skip
            out[phase] = summary(result, before, rss_kb(serving.pid))
            accepted += result.accepted_rating_ids
        log(f"waiting for {len(accepted)} ratings in Postgres…")
        sql = "SELECT count(*), count(DISTINCT feedback_id) FROM feedback_events"
        sql += " WHERE feedback_id = ANY(%s)"
        deadline = time.monotonic() + 180
        with psycopg.connect(db_url, autocommit=True) as conn:
            while time.monotonic() < deadline:
                rows, distinct = conn.execute(sql, (accepted,)).fetchone()  # type: ignore[misc]
                if distinct >= len(accepted):
                    break
                time.sleep(0.5)
            time.sleep(2)  # a duplicate would show up now
            rows, distinct = conn.execute(sql, (accepted,)).fetchone()  # type: ignore[misc]
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
    out.update(
        ratings_accepted=len(accepted),
        ratings_stored=distinct,
        ratings_lost=len(accepted) - distinct,
        ratings_duplicated=rows - distinct,
        config={
            "queue_bound": args.queue_bound,
            "flood_clients": args.factor * args.queue_bound,
            "requests_per_flood_client": args.requests,
            "max_tokens": 2,
        },
    )
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
