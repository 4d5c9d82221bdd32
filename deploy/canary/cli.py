"""``alignloop canary``: the canary controller as a process.

The command line is :class:`deploy.canary.stats.CanaryConfig`'s fields (generated, one flag
per field, applied over the production defaults or ``--demo``'s; an explicit 0 counts) plus
the process's own flags (database, poll interval, HTTP port, the routed model name, which
defaults to the served model name of the settings).

The operators' port (``--port``, ``ALIGNLOOP_ADMIN_PORT``, default 9103, on
``ALIGNLOOP_ADMIN_HOST``, loopback by default) serves the admin API ``/admin/...``
(:mod:`deploy.ops.admin_api`; disabled without an admin token) and the operator console
``/console/`` (:mod:`deploy.console`), from a uvicorn thread beside the control loop;
``/metrics`` is served there too and, for Prometheus, alone on the metrics port
(``ALIGNLOOP_CONTROLLER_METRICS_HOST``:``ALIGNLOOP_CONTROLLER_METRICS_PORT``, all
interfaces, 9105).

One controller per database: the process holds the ``canary-controller`` lease
(:mod:`deploy.policies.leases`) for its whole life, ``--once`` included. A second one
prints who holds it and exits 7; a controller whose lease heartbeat fails ends its loop and
exits 8.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from dataclasses import replace
from typing import Any

from deploy.canary.controller import CanaryController
from deploy.canary.stats import CanaryConfig
from deploy.policies import leases
from schemas.config_flags import add_config_flags, overrides_from_namespace

log = logging.getLogger(__name__)


def config_from_args(args: argparse.Namespace) -> CanaryConfig:
    """The demo or production config with the command line's overrides (an explicit 0 is
    an override too)."""
    config = CanaryConfig.demo() if args.demo else CanaryConfig()
    overrides = overrides_from_namespace(CanaryConfig, vars(args))
    return replace(config, **overrides) if overrides else config


def build_parser(settings: Any) -> argparse.ArgumentParser:
    """The ``alignloop canary`` command line (``settings``: a :class:`Settings`)."""
    ap = argparse.ArgumentParser(prog="alignloop canary", description=main.__doc__)
    ap.add_argument("--database-url", default=settings.database_url)
    ap.add_argument("--poll-seconds", type=float, default=30.0)
    ap.add_argument(
        "--port",
        dest="port",
        type=int,
        default=settings.admin_port,
        help="the operators' port (/admin, /console/); 0 disables it and the metrics port",
    )
    ap.add_argument("--host", default=settings.admin_host, help="interface of that port")
    ap.add_argument(
        "--model-name",
        default=settings.served_model_name,
        help="the routed model name whose traffic is compared (default: the served model name)",
    )
    ap.add_argument("--once", action="store_true", help="one tick, print it, exit")
    ap.add_argument(
        "--demo",
        action="store_true",
        help="start from CanaryConfig.demo()'s thresholds instead of production's",
    )
    test = ap.add_argument_group(
        "the test (CanaryConfig; each flag overrides the production or --demo value)"
    )
    add_config_flags(test, CanaryConfig, overrides_only=True)
    return ap


def main(argv: list[str] | None = None) -> int:
    """``alignloop canary``: run the canary controller until SIGTERM / Ctrl-C."""
    from schemas.settings import Settings

    settings = Settings()
    ap = build_parser(settings)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if not args.database_url:
        print("alignloop canary: set ALIGNLOOP_DATABASE_URL or --database-url", file=sys.stderr)
        return 2
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"alignloop canary: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        lease = leases.acquire_waiting(
            args.database_url,
            leases.CONTROLLER,
            stop,
            heartbeat_s=settings.lease_heartbeat_s,
            on_lost=stop.set,
        )
    except leases.LeaseHeld as exc:
        print(f"alignloop canary: not started: {exc}", file=sys.stderr)
        return leases.EXIT_LEASE_HELD
    if lease is None:  # stopped while waiting for Postgres
        return 0
    with lease:
        code = _run(args, settings, config, stop)
    if lease.lost.is_set():
        print(
            f"alignloop canary: stopped: lost the {leases.CONTROLLER!r} lease (its heartbeat "
            "failed); another controller may hold it now",
            file=sys.stderr,
        )
        return leases.EXIT_LEASE_LOST
    return code


def _run(
    args: argparse.Namespace, settings: Any, config: CanaryConfig, stop: threading.Event
) -> int:
    """The controller under its lease: one tick (``--once``), or the loop with the HTTP
    port beside it until ``stop`` is set."""
    controller = CanaryController(config, model_name=args.model_name)
    if args.once:
        from feedback.db import connect, migrate

        with connect(args.database_url, autocommit=True) as conn:
            migrate(conn)
            decision = controller.tick(conn)
        print(decision if decision else "no active canary")
        return 0
    http = None
    if args.port:
        from deploy.console.app import create_app, metrics_urls
        from deploy.ops.admin_api import serve_in_thread

        urls = metrics_urls(settings.console_metrics_urls)
        app = create_app(args.database_url, settings.admin_token, urls)
        http = serve_in_thread(app, args.host, args.port)
        log.info("/metrics, /admin and the console on http://%s:%d", args.host, args.port)
    started = time.monotonic()
    try:
        controller.run(args.database_url, stop, args.poll_seconds)
    finally:
        if http is not None:
            server, thread = http
            server.should_exit = True
            thread.join(10)
    log.info("canary controller stopped after %.0fs", time.monotonic() - started)
    return 0
