"""`alignloop serve`: run the chat API (one replica) under uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

from schemas.settings import Settings

if TYPE_CHECKING:
    from serving.publisher import EventPublisher


def _publisher(settings: Settings, bootstrap: str, host: str, port: int) -> EventPublisher:
    from schemas.kafka_config import confluent_config
    from serving.publisher import EventPublisher

    # One spool per replica: two processes must never replay the same spool.
    spool_dir = settings.resolved_spool_dir() / f"serving-{host}-{port}"
    return EventPublisher(
        bootstrap,
        spool_dir,
        settings.spool_max_bytes,
        client_id=f"{settings.kafka_client_id}-serving-{port}",
        max_event_bytes=settings.max_event_bytes,
        reserved_share=settings.spool_feedback_reserve,  # kept for topics.FEEDBACK
        producer_config=confluent_config(settings),  # TLS / SASL, if configured
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="alignloop serve", description=__doc__)
    ap.add_argument("--host", help="bind address (default: ALIGNLOOP_HOST or 127.0.0.1)")
    ap.add_argument("--port", type=int, help="port (default: ALIGNLOOP_PORT or 8000)")
    ap.add_argument("--log-level", default="info")
    ap.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="development only: no API keys (refused unless the bind address is loopback)",
    )
    args = ap.parse_args(argv)

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = Settings()
    if args.insecure_no_auth:
        settings = settings.model_copy(update={"insecure_no_auth": True})
    host = args.host or settings.host
    port = args.port or settings.port
    model_dir = settings.base_model or settings.demo_model_dir()
    if not (model_dir / "config.json").exists():
        print(
            f"alignloop serve: no model at {model_dir}. Run `alignloop bootstrap-model` "
            "or set ALIGNLOOP_BASE_MODEL to a Hugging Face model directory.",
            file=sys.stderr,
        )
        return 2
    if not settings.kafka_bootstrap:
        print(
            "alignloop serve: set ALIGNLOOP_KAFKA_BOOTSTRAP (or run `alignloop up`, which "
            "starts an embedded broker).",
            file=sys.stderr,
        )
        return 2

    problem = _auth_problem(settings, host) or _kafka_problem(settings)
    if problem:
        print(f"alignloop serve: {problem}", file=sys.stderr)
        return 2

    import uvicorn

    from serving.app import create_app
    from serving.connections import http_protocol

    app = create_app(
        settings, model_dir, _publisher(settings, settings.kafka_bootstrap, host, port)
    )
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=args.log_level,
        timeout_graceful_shutdown=10,
        access_log=False,
        http=http_protocol(settings.receive_deadline_s),  # slow senders get 408 and are closed
    )
    return 0


def _kafka_problem(settings: Settings) -> str | None:
    """A contradictory Kafka security configuration (:func:`schemas.kafka_config.check`)."""
    from schemas.kafka_config import check

    try:
        check(settings)
    except ValueError as e:
        return str(e)
    return None


def _auth_problem(settings: Settings, host: str) -> str | None:
    """Why this replica must not start as configured (None: it may): no key to let anyone
    in, or no-auth mode on an address other machines can reach."""
    from serving.api_keys import read_entries

    if settings.insecure_no_auth:
        if not _is_loopback(host):
            return (
                f"ALIGNLOOP_INSECURE_NO_AUTH lets anyone who reaches {host} act with every "
                "scope; it is allowed on a loopback address only (127.0.0.1, ::1, localhost)."
            )
        return None
    path = settings.resolved_api_keys_file()
    try:
        entries = read_entries(path)
    except ValueError as e:
        return str(e)
    if not entries:
        return (
            f"no API key in {path}. Make one with `alignloop keys create NAME` (or run "
            "`alignloop up`, which makes one), or set ALIGNLOOP_INSECURE_NO_AUTH=true for "
            "development on a loopback address."
        )
    return None


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
