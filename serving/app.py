"""The FastAPI application: routes, lifespan, metrics middleware.

Routes stay thin; the work is in `serving.chat`. The app owns the lifecycles of the
engine and the event publisher (started before the first request, stopped after the
last).
"""

from __future__ import annotations

import gc
import hashlib
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from schemas.chat import ChatCompletionRequest, ModelCard, ModelList
from schemas.settings import Settings
from serving import metrics
from serving.chat import ChatService
from serving.engine import Engine
from serving.errors import install_error_handlers, parse_body, read_json
from serving.feedback_routes import FeedbackEndpoints
from serving.policies import PolicyRouter
from serving.publisher import EventPublisher
from serving.response_ids import ResponseIdSigner, load_or_create_secret
from serving.routing import RoutingWatcher

log = logging.getLogger(__name__)

POLICY_HEADER = "X-Alignloop-Policy"
USER_HEADER = "X-Alignloop-User"
_POLICY_HEADER_RAW = POLICY_HEADER.lower().encode()  # as ASGI carries header names


class RequestCounter:
    """Counts answered requests by route, status and policy version.

    A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` runs every request in an
    extra task group and costs more CPU than the feedback endpoint itself.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        seen: dict[str, str] = {}

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = str(message["status"])
                for name, value in message.get("headers", ()):
                    if name.lower() == _POLICY_HEADER_RAW:
                        seen["policy"] = value.decode()
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = scope.get("route")
            metrics.REQUESTS.labels(
                getattr(route, "path", "unmatched"),
                seen.get("status", "500"),
                seen.get("policy", "-"),
            ).inc()


def routing_key(request: Request) -> str:
    """Who a request is, for sticky routing, when it names no user: its API key (hashed,
    never kept), else the client address."""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer ") and len(auth) > 7:
        return "key:" + hashlib.sha256(auth[7:].encode()).hexdigest()[:32]
    client = request.client
    return f"addr:{client.host if client else 'unknown'}"


def create_app(settings: Settings, model_dir: Path, publisher: EventPublisher) -> FastAPI:
    """Build the app. ``publisher`` is an `EventPublisher` (started/closed by the app)."""
    engine = Engine(settings, model_dir)
    like_for_like_dir = None
    if settings.canary_like_for_like:
        like_for_like_dir = Path(tempfile.mkdtemp(prefix="alignloop-zero-adapters-"))
    router = PolicyRouter(
        settings.served_model_name,
        settings.routing_salt,
        engine,
        publisher,
        like_for_like_dir=like_for_like_dir,
    )
    watcher = None
    if settings.database_url:
        watcher = RoutingWatcher(settings.database_url, router.apply, settings.routing_refresh_s)
    signer = ResponseIdSigner(_response_id_secret(settings))
    chat = ChatService(settings, engine, router, signer, publisher)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        publisher.start()
        engine.start()
        if watcher is not None:
            watcher.start()
        # The engine, torch and transformers leave millions of long-lived objects that
        # every full collection would walk again (often several times a second under
        # feedback load). Park the startup heap outside the collector, as vLLM's own
        # server does; objects made from here on are collected as usual.
        gc.collect()
        gc.freeze()
        log.info("serving %s on the chat API", model_dir)
        try:
            yield
        finally:
            if watcher is not None:
                watcher.stop()
            engine.shutdown()
            publisher.close(timeout=10)
            if like_for_like_dir is not None:
                shutil.rmtree(like_for_like_dir, ignore_errors=True)

    app = FastAPI(title="alignloop", version="0.1.0", lifespan=lifespan)
    app.add_middleware(RequestCounter)
    # Outermost of ours: the feedback routes answer before routing and RequestCounter
    # (they count themselves); see serving.feedback_routes.
    app.add_middleware(FeedbackEndpoints, settings=settings, signer=signer, publisher=publisher)
    app.state.chat = chat
    install_error_handlers(app)
    _add_routes(app, settings, chat, router, publisher, model_dir)
    return app


def _response_id_secret(settings: Settings) -> bytes:
    """The key response ids are signed with: configured, or made once under the state dir."""
    if settings.response_id_secret is not None:
        return settings.response_id_secret.get_secret_value().encode()
    return load_or_create_secret(settings.state_dir / "secrets" / "response_id.key")


def _add_routes(
    app: FastAPI,
    settings: Settings,
    chat: ChatService,
    router: PolicyRouter,
    publisher: EventPublisher,
    model_dir: Path,
) -> None:
    """The chat, models, health and metrics endpoints (feedback is a middleware)."""
    started_at = int(time.time())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = parse_body(
            ChatCompletionRequest, await read_json(request, settings.max_request_bytes)
        )
        user = req.user or request.headers.get(USER_HEADER)
        prepared = await chat.prepare(req, user, user or routing_key(request))
        headers = {POLICY_HEADER: prepared.policy.version}
        if req.stream:
            return StreamingResponse(
                chat.stream(prepared),
                media_type="text/event-stream",
                headers={**headers, "Cache-Control": "no-cache"},
            )
        completion = await chat.complete(prepared)
        return JSONResponse(completion.model_dump(), headers=headers)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(
            data=[
                ModelCard(id=name, created=started_at, max_model_len=settings.max_model_len)
                for name in router.model_names()
            ]
        )

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        table = router.table
        return {
            "status": "ok",
            "model_dir": str(model_dir),
            "routing": {
                "generation": table.generation,
                "stable": table.stable,
                "canary": table.canary,
                "canary_weight": table.canary_weight,
            },
            "events": publisher.snapshot(),
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
