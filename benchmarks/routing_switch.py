"""How fast a promote or rollback reaches every serving replica, and what it costs.

Two real serving replicas share a fresh registry; a steady load of chat requests runs
against both while the benchmark flips the stable version back and forth (promote the
adapter version, roll back to base) K times. For each flip it measures the time from the
registry command's commit until new requests on *every* replica are served by the new
version; it counts every request of the load that did not get a 200.

Used by `benchmarks/canary.py` (keys `switch_seconds_max`, `failed_requests`), or alone:

    python -m benchmarks.routing_switch [--flips 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from deploy.local.broker import EmbeddedBroker
from deploy.policies import registry
from tests.fixtures.adapters import make_adapter
from tests.fixtures.replicas import Replicas, routed_replicas


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _switch_seconds(
    replicas: Replicas, target: str, command_done: float, client: httpx.Client, settle: int = 3
) -> float:
    """Probe every replica with fresh users; per replica, find the send time of the first
    request of the final run of ``settle`` answers by ``target`` (every later request got
    the new version too). The switch time is the latest of those, from the command."""
    switched_at: dict[str, float] = {}
    streak: dict[str, tuple[int, float]] = {u: (0, 0.0) for u in replicas.urls}
    deadline = command_done + 30
    while len(switched_at) < len(replicas.urls):
        if time.monotonic() > deadline:
            raise RuntimeError(f"switch to {target} not applied after 30 s")
        for url in replicas.urls:
            if url in switched_at:
                continue
            sent = time.monotonic()
            r = replicas.ask(url, f"probe-{time.monotonic_ns()}", client=client)
            ok = r.status_code == 200 and r.json()["policy_version"] == target
            count, first = streak[url]
            streak[url] = (count + 1, first if count else sent) if ok else (0, 0.0)
            if streak[url][0] >= settle:
                switched_at[url] = streak[url][1]
    return max(0.0, max(switched_at.values()) - command_done)


def measure(replicas: Replicas, flips: int, load_clients: int = 4) -> dict:
    stop = threading.Event()
    failures = 0
    served = 0
    lock = threading.Lock()

    def load(n: int) -> None:
        nonlocal failures, served
        with httpx.Client(timeout=60) as client:
            i = 0
            while not stop.is_set():
                r = replicas.ask(
                    replicas.urls[i % len(replicas.urls)], f"load-{n}-{i}", client=client
                )
                with lock:
                    served += 1
                    failures += r.status_code != 200
                i += 1

    threads = [threading.Thread(target=load, args=(n,)) for n in range(load_clients)]
    for t in threads:
        t.start()
    switches = []
    try:
        with replicas.db() as conn, httpx.Client(timeout=60) as probe:
            for k in range(flips):
                if k % 2 == 0:
                    registry.promote(conn, "v1", actor="benchmark", reason="flip")
                    target = "v1"
                else:
                    registry.rollback(conn, actor="benchmark", reason="flop")
                    target = "base"
                switches.append(_switch_seconds(replicas, target, time.monotonic(), probe))
                log(f"flip {k + 1}/{flips} → {target}: {switches[-1] * 1000:.0f} ms")
    finally:
        stop.set()
        for t in threads:
            t.join()
    return {
        "switch_seconds_max": max(switches),
        "switch_seconds_median": statistics.median(switches),
        "failed_requests": failures,
        "requests_during_flips": served,
        "flips": flips,
        "replicas": len(replicas.urls),
    }


def run(flips: int, model_dir: Path | None = None) -> dict:
    if model_dir is None:
        from tests.fixtures.model import demo_model_cache_dir
        from trainer.demo.model import bootstrap_demo_model

        model_dir = bootstrap_demo_model(demo_model_cache_dir())
    work = Path(tempfile.mkdtemp(prefix="alignloop-bench-switch-"))
    adapter = make_adapter(model_dir, work / "v1", seed=1)
    broker = EmbeddedBroker(log_path=work / "broker.log")
    broker.start()
    try:
        log("starting two serving replicas (about a minute on CPU)…")
        with routed_replicas(model_dir, broker.bootstrap, work) as replicas:
            with replicas.db() as conn:
                registry.register_candidate(conn, "v1", str(adapter), actor="benchmark")
            return measure(replicas, flips)
    finally:
        broker.stop()


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--flips", type=int, default=10)
    args = ap.parse_args()
    print(json.dumps(run(args.flips), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
