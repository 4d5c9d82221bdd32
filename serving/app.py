"""The FastAPI application: routes, lifespan, metrics middleware.

Routes stay thin; the work is in `serving.chat`. The app owns the lifecycles of the
engine and the event publisher (started before the first request, stopped after the
last).
"""

from __future__ import annotations

import gc
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from schemas.chat import ChatCompletionRequest, ModelList
from schemas.completions import CompletionRequest
from schemas.settings import Settings
from serving import metrics, tools
from serving.api_keys import KeyRing
from serving.auth import Authenticate, principal_of
from serving.chat import ChatService
from serving.completions import CompletionService
from serving.connections import ClientGone, unless_client_leaves
from serving.engine import Engine
from serving.errors import install_error_handlers, parse_body, read_json
from serving.feedback_routes import FeedbackEndpoints
from serving.generation import Caller, Generation, Prepared
from serving.limits import Limits, RateLimit
from serving.openapi import install_openapi
from serving.policies import PolicyRouter
from serving.publisher import EventPublisher
from serving.response_ids import ResponseIdSigner, load_or_create_secret, parse_secrets
from serving.routing import RoutingWatcher, routing_key

if TYPE_CHECKING:
    from vllm import RequestOutput

log = logging.getLogger(__name__)

POLICY_HEADER = "X-Alignloop-Policy"
USER_HEADER = "X-Alignloop-User"
_POLICY_HEADER_RAW = POLICY_HEADER.lower().encode()  # as ASGI carries header names


class RequestCounter:
    """Counts answered requests by route, status and policy version, and takes the
    policy header off answers to callers without the ``pin`` scope (it is counted first).

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
        reveal = principal_of(scope).may("pin")

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = str(message["status"])
                headers = []
                for name, value in message.get("headers", ()):
                    if name.lower() == _POLICY_HEADER_RAW:
                        seen["policy"] = value.decode()
                        if not reveal:
                            continue
                    headers.append((name, value))
                message = {**message, "headers": headers}
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


def caller(request: Request, user: str | None) -> Caller:
    """Who asked: the key's principal, the end user (the request's ``user``, else the
    user header) and the sticky routing identity: principal and end user, or, when the
    product names no user, principal and client address."""
    principal = principal_of(request.scope)
    user = user or request.headers.get(USER_HEADER)
    host = request.client.host if request.client else None
    return Caller(principal, user, routing_key(principal.name, user, host))


def create_app(settings: Settings, model_dir: Path, publisher: EventPublisher) -> FastAPI:
    """Build the app. ``publisher`` is an `EventPublisher` (started/closed by the app)."""
    engine = Engine(settings, model_dir)
    like_for_like_dir = None
    if settings.canary_like_for_like:
        like_for_like_dir = Path(tempfile.mkdtemp(prefix="alignloop-zero-adapters-"))
    router = PolicyRouter(
        settings.served_model_name,
        _routing_salt(settings),
        engine,
        publisher,
        like_for_like_dir=like_for_like_dir,
    )
    watcher = None
    if settings.database_url:
        watcher = RoutingWatcher(settings.database_url, router.apply, settings.routing_refresh_s)
    signer = ResponseIdSigner(*_response_id_secrets(settings))
    keys = None if settings.insecure_no_auth else KeyRing(settings.resolved_api_keys_file())
    tools.parser_class(settings.tool_call_parser)  # a misspelt parser fails at start
    limits = Limits(settings)
    generation = Generation(settings, engine, router, signer, publisher, limits)
    chat = ChatService(generation)
    completions = CompletionService(generation)

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
    # Per-principal rate limits and the queued-generation bound (429s), once the key is known.
    app.add_middleware(RateLimit, limits=limits)
    # Outermost: nothing under /v1 runs, is counted by policy or is published without a key.
    app.add_middleware(Authenticate, keys=keys)
    app.state.chat = chat
    install_error_handlers(app)
    _add_routes(app, settings, chat, completions, router, publisher, model_dir)
    add_health_routes(app, settings, router, watcher, publisher, model_dir, engine)
    install_openapi(app, settings.served_model_name)
    return app


def _response_id_secrets(settings: Settings) -> list[bytes]:
    """The keys response ids are signed with (the first signs, all verify): configured,
    or one made once under the state dir."""
    if settings.response_id_secret is not None:
        return parse_secrets(settings.response_id_secret.get_secret_value())
    return [load_or_create_secret(settings.state_dir / "secrets" / "response_id.key")]


def _routing_salt(settings: Settings) -> str:
    """The secret salt of sticky routing: configured, or made once under the state dir."""
    if settings.routing_salt is not None:
        return settings.routing_salt.get_secret_value()
    return load_or_create_secret(settings.state_dir / "secrets" / "routing_salt.key").decode()


class _Prepared(Protocol):
    base: Prepared


ReqT = TypeVar("ReqT", ChatCompletionRequest, CompletionRequest, contravariant=True)
PrepT = TypeVar("PrepT", bound=_Prepared)


class _Service(Protocol[ReqT, PrepT]):
    """What `ChatService` and `CompletionService` both do, step by step."""

    gen: Generation

    async def prepare(self, req: ReqT, caller: Caller) -> PrepT: ...
    async def open(self, p: PrepT) -> tuple[RequestOutput | None, AsyncIterator[RequestOutput]]: ...
    def stream(
        self, p: PrepT, first: RequestOutput | None, rest: AsyncIterator[RequestOutput]
    ) -> AsyncIterator[str]: ...
    async def complete(
        self, p: PrepT, first: RequestOutput | None, rest: AsyncIterator[RequestOutput]
    ) -> BaseModel: ...


async def _answer(service: _Service[ReqT, PrepT], req: ReqT, request: Request) -> Response:
    """Prepare (4xx), start the engine (a refusal is still a 400), then answer whole
    or stream; the policy version goes out as a header either way. A client that leaves
    while its answer is made has it aborted (499 in the metrics; nobody reads it)."""
    prepared = await service.prepare(req, caller(request, req.user))
    headers = {POLICY_HEADER: prepared.base.policy.version}
    try:
        first, rest = await unless_client_leaves(request.receive, service.open(prepared))
        if req.stream:
            return StreamingResponse(
                service.stream(prepared, first, rest),
                media_type="text/event-stream",
                headers={**headers, "Cache-Control": "no-cache"},
            )
        whole = await unless_client_leaves(request.receive, service.complete(prepared, first, rest))
    except ClientGone:
        service.gen.abandon(prepared.base, {}, stream=req.stream)
        return Response(status_code=499)
    return JSONResponse(whole.model_dump(), headers=headers)


def _add_routes(
    app: FastAPI,
    settings: Settings,
    chat: ChatService,
    completions: CompletionService,
    router: PolicyRouter,
    publisher: EventPublisher,
    model_dir: Path,
) -> None:
    """The chat, models, health and metrics endpoints (feedback is a middleware)."""
    started_at = int(time.time())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_json(request, settings.max_request_bytes)
        return await _answer(chat, parse_body(ChatCompletionRequest, body, "chat"), request)

    @app.post("/v1/completions")
    async def text_completions(request: Request) -> Response:
        body = await read_json(request, settings.max_request_bytes)
        req = parse_body(CompletionRequest, body, "completions")
        return await _answer(completions, req, request)

    @app.get("/v1/models")
    async def models(request: Request) -> ModelList:
        cards = router.model_cards(started_at, chat.engine.max_model_len)
        if not principal_of(request.scope).may("pin"):  # versions are only for pinning
            cards = [c for c in cards if c.id == settings.served_model_name]
        return ModelList(data=cards)

    @app.get("/metrics", response_class=PlainTextResponse)  # documented as text
    async def prometheus() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def routing_health(
    router: PolicyRouter, watcher: RoutingWatcher | None, stale_after_s: float
) -> dict[str, Any]:
    """The routing part of /healthz and /readyz: the table in force, the version actually
    serving the stable arm, and the table's age (None: never read, or no database)."""
    table = router.table
    age = watcher.age_s() if watcher is not None else None
    return {
        "generation": table.generation,
        "stable": table.stable,
        "serving_stable": router.serving_stable(),
        "canary": table.canary,
        "canary_weight": table.canary_weight,
        "age_s": None if age is None else round(age, 3),
        "stale_after_s": stale_after_s,
        "stale": age is not None and age > stale_after_s,
    }


def add_health_routes(
    app: FastAPI,
    settings: Settings,
    router: PolicyRouter,
    watcher: RoutingWatcher | None,
    publisher: EventPublisher,
    model_dir: Path,
    engine: Engine,
) -> None:
    """``/healthz`` (liveness and start-up: 200 once the app runs, with the state; 503
    once the engine process has died) and ``/readyz`` (503 while the routing table is
    stale, or the engine is dead). A replica cut off from Postgres keeps serving its last
    table; whether to take it out of rotation is the orchestrator's call, so liveness never
    fails on it (a restart would come back with the base only). A dead engine fails every
    generation until the process restarts, so liveness does fail on that."""

    @app.get(
        "/healthz",
        responses={503: {"description": "The engine process died; restart (same body)."}},
    )
    async def healthz() -> JSONResponse:
        dead = engine.dead
        body = {
            "status": "engine_dead" if dead else "ok",
            "model_dir": str(model_dir),
            "routing": routing_health(router, watcher, settings.routing_stale_after_s),
            "events": publisher.snapshot(),
        }
        return JSONResponse(body, status_code=503 if dead else 200)

    @app.get(
        "/readyz",
        responses={
            503: {"description": "Not ready: the routing table is stale or the engine is dead."}
        },
    )
    async def readyz() -> JSONResponse:
        routing = routing_health(router, watcher, settings.routing_stale_after_s)
        status = (
            "engine_dead" if engine.dead else "stale_routing_table" if routing["stale"] else "ready"
        )
        body = {"status": status, "routing": routing}
        return JSONResponse(body, status_code=200 if status == "ready" else 503)
