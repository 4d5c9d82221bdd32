"""The closed loop, measured: `alignloop up` driven by simulated users until it learns.

Starts `alignloop up` in a temporary state directory (``tests/fixtures/stack.py``; the
cached demo model unless ``--model-dir``), runs ``alignloop simulate`` against it for
``--minutes`` (default 60) or until ``--until`` (e.g. ``2-promotions``), then stops the
stack (SIGTERM, wait).

    python -m benchmarks.loop [--minutes 60] [--until 2-promotions] [--preference plain] ...

Every simulator flag is accepted (``--users``, ``--rate``, ``--rate-share``, ``--noise``,
``--preference``, ``--prompts``, ``--seed``...; see ``alignloop simulate --help``). The
per-minute table goes to stderr; stdout gets one JSON object: ``summary`` (the
simulator's: time to first candidate / canary / promotion from the first rating,
thumbs-up rate of the base vs the final stable with 95 % intervals, KL of the stable to
the base, promotions, rollbacks, totals, errors), ``machine``, ``date`` and ``command``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from deploy.simulator.cli import add_arguments, config_from_args
from deploy.simulator.driver import SimulationError, run
from tests.fixtures.stack import StackDidNotStart, running_stack


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "gpu": None,
    }
    try:
        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if gpu.returncode == 0 and gpu.stdout.strip():
            info["gpu"] = gpu.stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def default_model_dir() -> Path:
    """The demo model the tests cache (built here once if absent: a few minutes)."""
    from tests.fixtures.model import demo_model_cache_dir
    from trainer.demo.model import BootstrapConfig, bootstrap_demo_model

    return bootstrap_demo_model(demo_model_cache_dir(), BootstrapConfig(), progress=False)


async def _run_until_signal(config):
    """The simulation, ended early (summary printed, stack stopped) by SIGINT or SIGTERM:
    both explicitly, since a shell that starts this in the background ignores SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    return await run(config, out=sys.stderr, stop=stop)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.loop",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    stack = ap.add_argument_group("the stack")
    stack.add_argument("--model-dir", type=Path, help="base model (default: the cached demo model)")
    stack.add_argument("--state-dir", type=Path, help="default: a fresh temporary directory")
    stack.add_argument("--keep-state", action="store_true", help="keep a temporary state dir")
    stack.add_argument("--port", type=int, help="chat API port (default: a free one)")
    add_arguments(ap, with_target=False)
    ap.set_defaults(minutes=60.0)
    args = ap.parse_args(argv)

    command = [sys.executable, "-m", "benchmarks.loop", *(sys.argv[1:] if argv is None else argv)]
    model_dir = args.model_dir or default_model_dir()
    temporary = args.state_dir is None
    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="alignloop-loop-"))
    started = datetime.now(UTC).isoformat(timespec="seconds")
    log(f"loop: starting alignloop up in {state_dir} (model {model_dir})")
    t0 = time.monotonic()
    startup_s = None
    try:
        with running_stack(state_dir, port=args.port, base_model=model_dir) as s:
            startup_s = round(time.monotonic() - t0, 1)
            log(f"loop: up in {startup_s:.0f} s at {s.base_url}; simulating")
            config = config_from_args(
                args,
                base_url=s.base_url,
                admin_url=s.admin_url,
                admin_token=s.admin_token,
                state_dir=str(state_dir),
            )
            summary = asyncio.run(_run_until_signal(config))
    except StackDidNotStart as e:
        log(f"loop: {e}")
        return 1
    except SimulationError as e:
        log(f"loop: {e}")
        return 2
    finally:
        if temporary and not args.keep_state:
            shutil.rmtree(state_dir, ignore_errors=True)
    result = {
        "benchmark": "loop",
        "date": started,
        "machine": machine(),
        "command": command,
        "model_dir": str(model_dir),
        "wall_s": round(time.monotonic() - t0, 1),
        "startup_s": startup_s,
        "summary": summary.to_dict(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out is not None:
        args.json_out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
