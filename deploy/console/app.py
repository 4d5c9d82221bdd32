"""The operators' HTTP app: the admin API, the console and ``/metrics`` on one port.

:func:`create_app` is what ``alignloop canary`` serves beside its control loop and what
``alignloop admin`` (:func:`main`) serves alone, on ``ALIGNLOOP_ADMIN_HOST`` (loopback by
default). The console's JSON routes sit under ``/admin/console/`` behind the admin API's
bearer tokens (:mod:`deploy.console.routes`). ``alignloop admin`` opens no separate metrics
port: the controller's metrics are the canary controller's to serve.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import uvicorn
from fastapi import FastAPI
from pydantic import SecretStr

from deploy.console import routes
from deploy.ops import admin_api
from deploy.ops.admin_auth import AdminTokens, configured, startup_problem

log = logging.getLogger(__name__)


def metrics_urls(setting: str) -> list[str]:
    """``ALIGNLOOP_CONSOLE_METRICS_URLS`` as a list (comma-separated, blanks dropped)."""
    return [url.strip() for url in setting.split(",") if url.strip()]


def create_app(
    database_url: str,
    token: AdminTokens | SecretStr | str | None,
    console_metrics_urls: Sequence[str] = (),
) -> FastAPI:
    """The admin API (:func:`deploy.ops.admin_api.create_app`) plus the console."""
    app = admin_api.create_app(database_url, token)
    app.state.console_metrics_urls = list(console_metrics_urls)
    app.include_router(routes.api)
    app.include_router(routes.page)
    return app


def main(argv: list[str] | None = None) -> int:
    """``alignloop admin``: the admin API, the console and /metrics, without the controller."""
    from feedback.db import connect, migrate
    from schemas.settings import Settings

    settings = Settings()
    ap = argparse.ArgumentParser(prog="alignloop admin", description=main.__doc__)
    ap.add_argument("--database-url", default=settings.database_url)
    ap.add_argument(
        "--host", default=settings.admin_host, help="interface (default: ALIGNLOOP_ADMIN_HOST)"
    )
    ap.add_argument("--port", type=int, default=settings.admin_port)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    problem = startup_problem(settings)
    if problem:
        print(f"alignloop admin: {problem}", file=sys.stderr)
        return 2
    if not args.database_url:
        print("alignloop admin: set ALIGNLOOP_DATABASE_URL or --database-url", file=sys.stderr)
        return 2
    with connect(args.database_url, autocommit=True) as conn:
        migrate(conn)
    tokens = configured(settings)
    if not tokens.enabled():
        log.warning("no admin token is configured: every /admin route answers 503")
    app = create_app(args.database_url, tokens, metrics_urls(settings.console_metrics_urls))
    log.info("console on http://%s:%d/console/", args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
