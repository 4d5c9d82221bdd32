"""alignloop's chat API vs vLLM's own OpenAI server, same model, same load, same tokens.

Both servers run side by side on the same model with the same engine flags (the dtype
alignloop's engine resolves ``auto`` to: bfloat16 on a CPU with native bfloat16 products,
float32 on others; eager mode, LoRA enabled, same context length); alignloop logs every
completion to a real Kafka-protocol broker meanwhile and checks an API key and its rate
limits on every request (limits raised above the load, so the limiter runs but never
throttles). Two scenarios, each measured the same way:

* ``base``: both serve the base model;
* ``lora``: both serve one LoRA adapter by name -- alignloop because the adapter is the
  promoted stable policy in its registry (what it serves after the first promotion),
  vLLM because it was started with ``--lora-modules`` and is asked for that name.

Before the load, a token-identity check asks both servers the same prompts at temperature
0 and fails the run if any completion differs. Load: C concurrent streaming clients, each
sending R requests with a fixed seed per request, so both servers generate the same
tokens (the JSON reports the tokens of every round). Because throughput on a shared
2-core machine swings run to run, the servers are measured in alternating rounds in the
order A B, B A, A B ... (``--quick`` sends fewer requests, never fewer rounds) and the
JSON reports medians of the per-round figures.

    python -m benchmarks.serving [--quick] [--clients 16] [--max-tokens 64] [--rounds 3]
        [--scenarios base,lora]

Prints one JSON object on stdout (progress goes to stderr); exits 1 if the servers'
completions differ.
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

from benchmarks.models import model_dir as model_dir_of
from benchmarks.models import model_label
from deploy.local.broker import EmbeddedBroker
from serving.engine import on_gpu, resolved_dtype
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


ADAPTER = "bench-adapter"  # the adapter's served name on both sides
IDENTITY_PROMPTS = PROMPTS  # asked at temperature 0 on both servers before the load
DIFFERENCES = [
    "alignloop also publishes every answer to Kafka and checks a key and its rate limits"
    " (that is the product; it is what is measured)",
    "alignloop runs its own engine loop (serving/engine.py) around the same vLLM AsyncLLM;"
    " vLLM's server runs its OpenAI front end",
    "both servers share the machine's cores for the whole run (they idle while the other"
    " is measured, but their processes stay resident)",
]


def start_vllm_server(
    model_dir: Path, port: int, log_path: Path, adapter: Path | None
) -> subprocess.Popen:
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
        resolved_dtype("auto", on_gpu()),  # what alignloop's engine runs at its default
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
    if adapter is not None:
        argv += ["--lora-modules", f"{ADAPTER}={adapter}"]
    with open(log_path, "ab") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)


def completions_at_temperature_zero(url: str, model: str, max_tokens: int) -> list[str]:
    """The answers to IDENTITY_PROMPTS, greedy, non-streaming (one request at a time)."""
    answers = []
    with httpx.Client(timeout=120, headers=AUTH) as client:
        for k, prompt in enumerate(IDENTITY_PROMPTS):
            r = client.post(
                f"{url}/v1/chat/completions",
                json={
                    "model": model,
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "seed": k,
                },
            )
            r.raise_for_status()
            answers.append(r.json()["choices"][0]["message"]["content"])
    return answers


def promote_adapter(db_url: str, adapter: Path, a_url: str) -> None:
    """Make ``adapter`` alignloop's stable policy and wait until the server routes to it."""
    import psycopg

    from deploy.policies import registry

    with psycopg.connect(db_url, autocommit=True) as conn:
        registry.register_candidate(conn, ADAPTER, str(adapter), actor="benchmark")
        generation = registry.promote(conn, ADAPTER, actor="benchmark", reason="benchmark")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        health = httpx.get(f"{a_url}/healthz", timeout=5).json()
        if health["routing"]["generation"] >= generation.generation:
            return
        time.sleep(0.1)
    raise RuntimeError("alignloop did not apply the promotion within 60 s")


def alternating(rounds: int) -> list[tuple[str, str]]:
    """The measuring order: A B, B A, A B, ... so neither side always goes first."""
    pair = ("alignloop", "vllm")
    return [pair if i % 2 == 0 else pair[::-1] for i in range(rounds)]


def measure(urls: dict[str, str], model: dict[str, str], args: argparse.Namespace) -> dict:
    """One scenario: identity check, warm-up, then the alternating rounds; its JSON."""
    identity = {
        name: completions_at_temperature_zero(urls[name], model[name], args.identity_tokens)
        for name in ("alignloop", "vllm")
    }
    mismatches = [
        {"prompt": p, "alignloop": a, "vllm": v}
        for p, a, v in zip(IDENTITY_PROMPTS, identity["alignloop"], identity["vllm"], strict=True)
        if a != v
    ]
    load = dict(
        clients=args.clients, per_client=args.requests_per_client, max_tokens=args.max_tokens
    )
    for name in ("alignloop", "vllm"):  # warm-up: first requests pay one-off costs
        asyncio.run(run_load(urls[name], model[name], clients=2, per_client=1, max_tokens=8))
    rounds: dict[str, list[dict]] = {"alignloop": [], "vllm": []}
    order = alternating(args.rounds)
    for i, pair in enumerate(order):
        for name in pair:
            r = asyncio.run(run_load(urls[name], model[name], **load))
            rounds[name].append(r)
            log(
                f"  round {i + 1} {name}: {r['tokens_per_s']:.0f} tok/s, "
                f"p50 {r['p50_ms']:.0f} ms, ttft p50 {r['ttft_p50_ms']:.0f} ms"
            )
    result = summarise(rounds, order, mismatches)
    result["identity_answers"] = identity["vllm"]
    return result


def summarise(rounds: dict[str, list[dict]], order: list, mismatches: list) -> dict:
    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in rounds[name])

    pairs = list(zip(rounds["alignloop"], rounds["vllm"], strict=True))
    ratios = [a["tokens_per_s"] / v["tokens_per_s"] for a, v in pairs]
    return {
        "throughput_ratio": statistics.median(ratios),
        "per_round_throughput_ratios": ratios,
        "alignloop_tokens_per_s": med("alignloop", "tokens_per_s"),
        "vllm_tokens_per_s": med("vllm", "tokens_per_s"),
        "p50_overhead_ms": statistics.median(a["p50_ms"] - v["p50_ms"] for a, v in pairs),
        "p99_overhead_ms": statistics.median(a["p99_ms"] - v["p99_ms"] for a, v in pairs),
        "alignloop_p50_ms": med("alignloop", "p50_ms"),
        "vllm_p50_ms": med("vllm", "p50_ms"),
        "alignloop_p99_ms": med("alignloop", "p99_ms"),
        "vllm_p99_ms": med("vllm", "p99_ms"),
        "alignloop_ttft_p50_ms": med("alignloop", "ttft_p50_ms"),
        "vllm_ttft_p50_ms": med("vllm", "ttft_p50_ms"),
        "equal_work": all(a["tokens"] == v["tokens"] for a, v in pairs),
        "tokens_per_round": {name: [r["tokens"] for r in rs] for name, rs in rounds.items()},
        "failed_requests": sum(r["failures"] for rs in rounds.values() for r in rs),
        "identical_completions_at_temperature_0": not mismatches,
        "identity_mismatches": mismatches,
        "order": [list(pair) for pair in order],
        "rounds": rounds,
    }


# Long on purpose: the benchmark's whole life in order (start both servers and the
# registry, each scenario, stop everything), kept in one place so it reads top to bottom.
def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="fewer requests per round (CI-sized)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests-per-client", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--identity-tokens", type=int, default=32, help="tokens per identity answer")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (at least 3)")
    ap.add_argument("--scenarios", default="base,lora", help="comma-separated: base, lora")
    ap.add_argument(
        "--model", default="demo", help="demo, smollm2 or a model directory (benchmarks/models.py)"
    )
    ap.add_argument("--model-dir", type=Path, help="a model directory (the same as --model DIR)")
    args = ap.parse_args()
    if args.rounds < 3:
        ap.error("--rounds: at least 3, so the order alternates")
    if args.quick:
        args.clients, args.requests_per_client = 8, 3
    scenarios = [s for s in args.scenarios.split(",") if s]

    from feedback.db import connect_and_migrate
    from tests.fixtures.adapters import make_adapter
    from tests.fixtures.postgres import create_database, drop_database

    model_dir = model_dir_of(args.model_dir or args.model)
    work = Path(tempfile.mkdtemp(prefix="alignloop-bench-"))
    # A small-weight adapter: it changes some answers without turning them into noise.
    adapter = make_adapter(model_dir, work / "adapter", seed=7, scale=0.05)
    db_url = create_database()
    with connect_and_migrate(db_url):
        pass
    broker = EmbeddedBroker(log_path=work / "broker.log")
    broker.start()
    a_port, v_port = free_port(), free_port()
    # One key sends every request: its per-key limits are raised above the load (the limiter
    # still runs on every request; docs/api.md#limits), so a fast GPU is never throttled.
    env = {
        "ALIGNLOOP_RATE_LIMIT_RPS": "1000000",
        "ALIGNLOOP_RATE_LIMIT_TOKENS_PER_MIN": "10000000000",
        "ALIGNLOOP_DATABASE_URL": db_url,
    }
    ours, _ = start_serving(model_dir, broker.bootstrap, work / "alignloop", a_port, extra_env=env)
    theirs = start_vllm_server(model_dir, v_port, work / "vllm.log", adapter)
    urls = {"alignloop": f"http://127.0.0.1:{a_port}", "vllm": f"http://127.0.0.1:{v_port}"}
    results: dict[str, dict] = {}
    try:
        log("starting both servers (about a minute on CPU)…")
        if not wait_healthy(urls["alignloop"], ours, 400) or not wait_healthy(
            urls["vllm"], theirs, 400, "/health"
        ):
            log(f"a server did not start; logs in {work}")
            return 1
        for scenario in scenarios:
            log(f"scenario {scenario}:")
            if scenario == "lora":
                promote_adapter(db_url, adapter, urls["alignloop"])
                models = {"alignloop": "alignloop", "vllm": ADAPTER}
            else:
                models = {"alignloop": "alignloop", "vllm": "alignloop"}
            results[scenario] = measure(urls, models, args)
    finally:
        for p in (ours, theirs):
            p.terminate()
        for p in (ours, theirs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        broker.stop()
        drop_database(db_url)

    identical = all(r["identical_completions_at_temperature_0"] for r in results.values())
    result = {
        "scenarios": results,
        "identical_completions_at_temperature_0": identical,
        # The identity check means something in the lora scenario only if the adapter
        # changes what the model says: the count of answers it changed.
        "answers_the_adapter_changed": (
            sum(
                b != lo
                for b, lo in zip(
                    results["base"]["identity_answers"],
                    results["lora"]["identity_answers"],
                    strict=True,
                )
            )
            if {"base", "lora"} <= results.keys()
            else None
        ),
        "config": {
            "clients": args.clients,
            "requests_per_client": args.requests_per_client,
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "model": model_label(args.model_dir or args.model),
            "model_dir": str(model_dir),
            "adapter": "rank 8 on q/k/v/o, B ~ N(0, 0.05), seed 7",
            "cpus": os.cpu_count(),
        },
        "differences_not_removed": DIFFERENCES,
    }
    print(json.dumps(result, indent=2))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
