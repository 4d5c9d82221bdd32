"""alignloop's chat API vs vLLM's own OpenAI server, same model, same load, one run.

Both servers run side by side on the same model with the same engine flags (bfloat16 on
CPU, eager mode, LoRA enabled, same context length); alignloop logs every completion to
a real Kafka-protocol broker meanwhile. Load: C concurrent streaming clients, each
sending R requests with a fixed seed per request, so both servers generate the same
tokens. Because throughput on a shared 2-core machine swings run to run, the servers
are measured in alternating rounds (A B A B ...) and the JSON reports medians.

    python -m benchmarks.serving [--quick] [--clients 16] [--max-tokens 64] [--rounds 3]

Prints one JSON object on stdout (progress goes to stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from deploy.local.broker import EmbeddedBroker
from tests.fixtures.server import AUTH, free_port, start_serving, wait_healthy

PROMPTS = [
    "What is the capital of Fenwick?",
    "Tell me what colour a lemon is.",
    "What is 7 plus 5?",
    "What will the weather be next Tuesday?",
    "Who is the mayor of Dunmore?",
    "What is my neighbour's name?",
    "Name the capital of Orlesh.",
    "What job does Mira Tallow have?",
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


async def one_request(
    client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int, seed: int
) -> tuple[float, float, int]:
    """Stream one completion; return (latency s, time to first token s, tokens)."""
    payload = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "seed": seed,
        "temperature": 1.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft = None
    tokens = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=payload) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and any(c["delta"].get("content") for c in chunk["choices"]):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - start
    return latency, ttft if ttft is not None else latency, tokens


async def run_load(url: str, model: str, clients: int, per_client: int, max_tokens: int) -> dict:
    latencies, ttfts, failures = [], [], 0
    total_tokens = 0

    async def client_loop(cid: int, client: httpx.AsyncClient) -> None:
        nonlocal total_tokens, failures
        for k in range(per_client):
            seed = cid * 1000 + k
            try:
                lat, ttft, toks = await one_request(
                    client, url, model, PROMPTS[seed % len(PROMPTS)], max_tokens, seed
                )
            except httpx.HTTPError:
                failures += 1
                continue
            latencies.append(lat)
            ttfts.append(ttft)
            total_tokens += toks

    limits = httpx.Limits(max_connections=clients * 2)
    # The API key goes to both servers (vLLM's, started without --api-key, ignores it).
    async with httpx.AsyncClient(timeout=120, limits=limits, headers=AUTH) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(c, client) for c in range(clients)))
        wall = time.perf_counter() - start
    return {
        "tokens_per_s": total_tokens / wall,
        "p50_ms": pct(latencies, 0.5) * 1000,
        "p99_ms": pct(latencies, 0.99) * 1000,
        "ttft_p50_ms": pct(ttfts, 0.5) * 1000,
        "tokens": total_tokens,
        "requests": len(latencies),
        "failures": failures,
        "wall_s": wall,
    }


def start_vllm_server(model_dir: Path, port: int, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    argv = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        "alignloop",
        "--dtype",
        "bfloat16",
        "--max-model-len",
        "512",
        "--enforce-eager",
        "--enable-lora",
        "--max-lora-rank",
        "8",
        "--max-loras",
        "4",
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--disable-log-stats",
    ]
    with open(log_path, "ab") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)


def default_model_dir() -> Path:
    from tests.fixtures.model import demo_model_cache_dir
    from trainer.demo.model import bootstrap_demo_model

    return bootstrap_demo_model(demo_model_cache_dir())


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="a smaller load (CI-sized)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests-per-client", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="alternating A/B rounds")
    ap.add_argument("--model-dir", type=Path, help="default: the cached demo model")
    args = ap.parse_args()
    if args.quick:
        args.clients, args.requests_per_client, args.rounds = 8, 3, 1

    model_dir = args.model_dir or default_model_dir()
    work = Path(tempfile.mkdtemp(prefix="alignloop-bench-"))
    broker = EmbeddedBroker(log_path=work / "broker.log")
    broker.start()
    a_port, v_port = free_port(), free_port()
    # One key sends every request: its per-key limits are raised above the load (the limiter
    # still runs on every request; docs/api.md#limits), so a fast GPU is never throttled.
    limits = {
        "ALIGNLOOP_RATE_LIMIT_RPS": "1000000",
        "ALIGNLOOP_RATE_LIMIT_TOKENS_PER_MIN": "10000000000",
    }
    ours, _ = start_serving(
        model_dir, broker.bootstrap, work / "alignloop", a_port, extra_env=limits
    )
    theirs = start_vllm_server(model_dir, v_port, work / "vllm.log")
    a_url, v_url = f"http://127.0.0.1:{a_port}", f"http://127.0.0.1:{v_port}"
    try:
        log("starting both servers (about a minute on CPU)…")
        if not wait_healthy(a_url, ours, 400) or not wait_healthy(v_url, theirs, 400, "/health"):
            log(f"a server did not start; logs in {work}")
            return 1
        load = dict(
            clients=args.clients, per_client=args.requests_per_client, max_tokens=args.max_tokens
        )
        for url in (a_url, v_url):  # warm-up: first requests pay one-off costs
            asyncio.run(run_load(url, "alignloop", clients=2, per_client=1, max_tokens=8))
        rounds: dict[str, list[dict]] = {"alignloop": [], "vllm": []}
        for i in range(args.rounds):
            for name, url in (("alignloop", a_url), ("vllm", v_url)):
                r = asyncio.run(run_load(url, "alignloop", **load))
                rounds[name].append(r)
                log(
                    f"round {i + 1} {name}: {r['tokens_per_s']:.0f} tok/s, "
                    f"p50 {r['p50_ms']:.0f} ms, ttft p50 {r['ttft_p50_ms']:.0f} ms"
                )
    finally:
        for p in (ours, theirs):
            p.terminate()
        for p in (ours, theirs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        broker.stop()

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in rounds[name])

    ratios = [
        a["tokens_per_s"] / v["tokens_per_s"]
        for a, v in zip(rounds["alignloop"], rounds["vllm"], strict=True)
    ]
    overheads = [
        a["p50_ms"] - v["p50_ms"] for a, v in zip(rounds["alignloop"], rounds["vllm"], strict=True)
    ]
    result = {
        "alignloop_tokens_per_s": med("alignloop", "tokens_per_s"),
        "vllm_tokens_per_s": med("vllm", "tokens_per_s"),
        "throughput_ratio": statistics.median(ratios),
        "alignloop_p50_ms": med("alignloop", "p50_ms"),
        "vllm_p50_ms": med("vllm", "p50_ms"),
        "p50_overhead_ms": statistics.median(overheads),
        "alignloop_p99_ms": med("alignloop", "p99_ms"),
        "vllm_p99_ms": med("vllm", "p99_ms"),
        "alignloop_ttft_p50_ms": med("alignloop", "ttft_p50_ms"),
        "vllm_ttft_p50_ms": med("vllm", "ttft_p50_ms"),
        "failed_requests": sum(r["failures"] for rs in rounds.values() for r in rs),
        "config": {
            "clients": args.clients,
            "requests_per_client": args.requests_per_client,
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "model_dir": str(model_dir),
        },
        "rounds": rounds,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
