"""Latency of a canary's two arms, with and without the like-for-like stable arm.

Two serving replicas (real vLLM engines) watch one registry in which an adapter canary runs
at 50 % against the bare base; replica A serves the stable arm through the zero copy of the
canary's adapter (``ALIGNLOOP_CANARY_LIKE_FOR_LIKE=true``, the default), replica B serves it
through the base weights (``false``, as before). Rounds alternate A B A B ...; each round
sends the same requests (same users, so the same arms; greedy, the same prompt) with the
same concurrency to one replica while the other idles. Reported per replica and arm:
requests, completion tokens (the work), p50/p95 latency, p95 per output token, and the p95
ratio canary / stable that the canary's latency guardrail compares with 1.5.

    python -m benchmarks.like_for_like [--rounds 4] [--requests 240] [--concurrency 8]

Differences that remain: the two replicas are separate processes started one after the
other (warm-up happens before the first round); the canary adapter is random and small
(scale 0.02), yet its greedy answers differ in length from the base's (reported): compare
the per-token figures too.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np

from deploy.local.broker import EmbeddedBroker, free_port
from deploy.policies import registry
from feedback.db import connect, connect_and_migrate
from tests.fixtures.adapters import make_adapter
from tests.fixtures.postgres import create_database, drop_database
from tests.fixtures.server import AUTH, start_serving, wait_healthy

QUESTION = [{"role": "user", "content": "What is the capital of Veltoria?"}]


def _ask(client: httpx.Client, url: str, user: str) -> tuple[str, float, int]:
    started = time.perf_counter()
    r = client.post(
        f"{url}/v1/chat/completions",
        json={"model": "alignloop", "messages": QUESTION, "max_tokens": 32, "temperature": 0,
              "user": user},
    )  # fmt: skip
    r.raise_for_status()
    body = r.json()
    return body["policy_version"], time.perf_counter() - started, body["usage"]["completion_tokens"]


def _one_pass(url: str, users: list[str], concurrency: int) -> list[tuple[str, float, int]]:
    with (
        httpx.Client(timeout=300, headers=AUTH) as client,
        concurrent.futures.ThreadPoolExecutor(concurrency) as pool,
    ):
        return list(pool.map(lambda u: _ask(client, url, u), users))


def _stats(rows: list[tuple[str, float, int]]) -> dict:
    out = {}
    for arm in sorted({r[0] for r in rows}):
        lat = np.array([r[1] for r in rows if r[0] == arm]) * 1000
        tok = np.array([r[2] for r in rows if r[0] == arm])
        out[arm] = {
            "requests": int(lat.size),
            "completion_tokens": int(tok.sum()),
            "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p95_ms": round(float(np.percentile(lat, 95)), 1),
            "p95_ms_per_token": round(float(np.percentile(lat / np.maximum(tok, 1), 95)), 2),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.like_for_like", description=__doc__)
    ap.add_argument("--rounds", type=int, default=4, help="rounds per replica, alternating")
    ap.add_argument("--requests", type=int, default=240, help="requests per round")
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args(argv)

    from tests.fixtures.model import demo_model_cache_dir
    from trainer.demo.model import BootstrapConfig, bootstrap_demo_model

    model = bootstrap_demo_model(demo_model_cache_dir(), BootstrapConfig(), progress=False)
    work = Path(tempfile.mkdtemp(prefix="alignloop-lfl-"))
    db_url = create_database()
    broker = EmbeddedBroker()
    broker.start()
    procs = []
    try:
        with connect_and_migrate(db_url):
            pass
        adapter = make_adapter(model, work / "v1", seed=1, scale=0.02)
        with connect(db_url, autocommit=True) as conn:
            registry.register_candidate(conn, "v1", str(adapter), actor="bench")
            registry.start_canary(conn, "v1", 0.5, actor="bench", reason="benchmark split")
        urls = {}
        for name, flag in (("like_for_like", "true"), ("bare_base", "false")):
            port = free_port()
            env = {"ALIGNLOOP_DATABASE_URL": db_url, "ALIGNLOOP_CANARY_LIKE_FOR_LIKE": flag}
            proc, _ = start_serving(model, broker.bootstrap, work / name, port, extra_env=env)
            procs.append(proc)
            urls[name] = f"http://127.0.0.1:{port}"
        for url, proc in zip(urls.values(), procs, strict=True):
            if not wait_healthy(url, proc, 400):
                raise RuntimeError(f"{url} did not start; logs in {work}")
        users = [f"user-{i}" for i in range(args.requests)]
        for url in urls.values():  # warm-up: adapters loaded, first-use costs paid
            _one_pass(url, users[:32], args.concurrency)
        rows: dict[str, list] = {name: [] for name in urls}
        order = []
        names = list(urls)
        for i in range(args.rounds * 2):  # A B B A A B B A ...: neither side always first
            name = names[(i + i // 2) % 2]
            order.append(name)
            rows[name] += _one_pass(urls[name], users, args.concurrency)
        result = {
            "benchmark": "like_for_like",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": [sys.executable, "-m", "benchmarks.like_for_like", *(argv or sys.argv[1:])],
            "machine": {"cpu": platform.processor() or platform.machine()},
            "order": order,
            "replicas": {},
            "differences": ["two serving processes, started one after the other"],
        }
        for name, data in rows.items():
            stats = _stats(data)
            stable, canary = stats.get("base"), stats.get("v1")
            ratio = canary["p95_ms"] / stable["p95_ms"] if stable and canary else None
            result["replicas"][name] = {
                "arms": stats,
                "p95_ratio_canary_over_stable": None if ratio is None else round(ratio, 3),
            }
        lengths = {
            arm: round(v["completion_tokens"] / v["requests"], 2)
            for arm, v in result["replicas"][names[0]]["arms"].items()
        }
        result["differences"].append(
            f"tokens per answer by arm (the random canary adapter changes them): {lengths}"
        )
        print(json.dumps(result, indent=2))
        return 0
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(60)
        broker.stop()
        drop_database(db_url)


if __name__ == "__main__":
    sys.exit(main())
