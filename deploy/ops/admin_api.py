"""The admin HTTP API: the operations of ``alignloop policy`` over HTTP, under ``/admin/``.

    GET  /admin/policies[?state=S]          all versions and the routing table
    GET  /admin/policies/{v}[?audit_limit=N] one version and its audit trail

A version's ``live`` object holds its live A/B counts from the ``policy_stats`` table
(:func:`feedback.ab_counters.policy_counts`: answers ``served`` and ``rated``, current
``ups`` and ``downs``, ``up_rate``; zeros before any traffic).
    GET  /admin/routing                      the routing table
    GET  /admin/whoami                       {"operator"}: the name of the token presented
    POST /admin/policies/{v}/promote         {"reason", "expect_state"?, "expect_generation"?}
    POST /admin/policies/{v}/canary          {"weight", "reason", "expect_state"?, ...}
    POST /admin/policies/{v}/reject          {"reason", "expect_state"?}
    POST /admin/rollback                     {"reason", "to"?, "expect_canary"?, ...}
    POST /admin/hold | /admin/resume         {"reason"}
    DELETE /admin/users/{user}               {"reason"}: erase the user's interactions,
                                             ratings and preferences, tombstone the user;
                                             200 {"user", "deleted": rows per table}

Served by the canary controller on its operators' port (``ALIGNLOOP_ADMIN_HOST``, loopback
by default) beside the console and ``/metrics`` (one place for operators:
:mod:`deploy.console.app`), or alone by ``alignloop admin``. Prometheus scrapes the
controller's separate metrics port instead (:func:`serve_in_thread`). Each request runs on
its own autocommit connection, so every command is one registry transaction.

Auth (:mod:`deploy.ops.admin_auth`): ``Authorization: Bearer <token>``, a named token from
the token file or ``ALIGNLOOP_ADMIN_TOKEN`` (named ``admin``), compared in constant time.
No header (or not Bearer) → 401 with ``WWW-Authenticate: Bearer``; a wrong token → 403.
After ``ALIGNLOOP_ADMIN_AUTH_MAX_FAILURES`` such refusals from one client address within
``ALIGNLOOP_ADMIN_AUTH_WINDOW_S``, that address gets 429 ``too_many_auth_failures`` with
``Retry-After``, whatever it sends. With no token configured the admin API is *disabled*:
every ``/admin`` route answers 503 ``admin_disabled`` (503, not 404, so a script cannot
mistake it for "no such version").

Operator identity: the audit log records the name of the token presented. The
``X-Alignloop-Operator`` header no longer decides anything: omit it, or send the token's
own name; any other name is refused (403 ``operator_mismatch``), so a script that still
sends one learns it is not recorded under that name.

Bodies: ``reason`` is required and non-empty (it goes to the audit log). Only the
``expect_*`` checks the registry can apply atomically are accepted for each command;
unknown fields are a 400. Errors use the OpenAI shape ``{"error": {"message", "type",
"param", "code"}}``: bad body 400 ``invalid_value``, unknown version 404
``policy_not_found``, illegal transition 409 ``illegal_transition``, someone changed the
registry since you looked (``expect_*`` failed, or a concurrent command won) 409
``concurrent_change``, Postgres unreachable 503 ``database_unavailable``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Annotated, Any, Literal

import psycopg
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest, start_http_server
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from deploy.ops import admin_auth
from deploy.ops.admin_auth import AdminTokens, AuthFailures
from deploy.policies import registry
from feedback import erasure
from feedback.ab_counters import policy_counts
from feedback.db import connect
from feedback.user_ids import KeyMismatch, UserIds
from feedback.user_ids import configured as user_ids_from
from schemas.errors import ErrorResponse, error_body
from schemas.openapi import component_schemas, error_responses

log = logging.getLogger(__name__)

OPERATOR_HEADER = "X-Alignloop-Operator"
CONFIGURED = "configured"
"""``serve_in_thread(metrics=CONFIGURED)``: the metrics port of the settings."""

State = Literal["candidate", "canary", "stable", "rejected", "rolled_back", "retired"]


# --- errors --------------------------------------------------------------------------------


def _error(
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def _registry_error(exc: registry.RegistryError) -> JSONResponse:
    if isinstance(exc, registry.UnknownVersion):
        return _error(404, str(exc), type="not_found", param="version", code="policy_not_found")
    if isinstance(exc, registry.IllegalTransition):
        return _error(409, str(exc), code="illegal_transition")
    if isinstance(exc, registry.ConcurrentChange):
        return _error(409, str(exc), code="concurrent_change")
    if isinstance(exc, registry.VersionExists):
        return _error(409, str(exc), param="version", code="version_exists")
    return _error(409, str(exc), code="registry_refused")


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "header")]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value")
    if param:
        message = f"Invalid value for '{param}': {message}"
    elif first.get("type") == "missing":
        message = "A JSON body is required (at least a non-empty 'reason')."
    return _error(400, message, param=param, code="invalid_value")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(registry.RegistryError)
    async def _registry(_: Request, exc: registry.RegistryError) -> JSONResponse:
        return _registry_error(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc)

    @app.exception_handler(psycopg.OperationalError)
    async def _database(_: Request, exc: psycopg.OperationalError) -> JSONResponse:
        log.warning("admin request failed, Postgres unavailable: %s", exc)
        return _error(
            503, "The registry database is unavailable; retry later.",
            type="server_error", code="database_unavailable",
        )  # fmt: skip

    @app.exception_handler(psycopg.DataError)
    async def _unstorable(_: Request, exc: psycopg.DataError) -> JSONResponse:
        # A value Postgres cannot take (a NUL in a reason, version or user; a number out of
        # its range) is the caller's bad value, refused before anything was written.
        return _error(400, f"Invalid value: {exc}", code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        code = "invalid_value" if exc.status_code == 400 else None  # a body that does not parse
        # Its headers too: a 405's Allow (RFC 9110 requires it) comes this way.
        headers = dict(exc.headers) if exc.headers else None
        return _error(exc.status_code, str(exc.detail), type=kind, code=code, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("admin request failed", exc_info=exc)
        return _error(500, "Internal server error.", type="server_error", code="internal_error")


# --- auth ----------------------------------------------------------------------------------


class AdminAuth:
    """ASGI middleware guarding every ``/admin`` path before anything else runs (so an
    unauthenticated request learns nothing, not even whether its body would parse). On
    success the token's name is ``request.state.operator``."""

    def __init__(self, app: ASGIApp, tokens: AdminTokens, failures: AuthFailures) -> None:
        self.app = app
        self.tokens = tokens
        self.failures = failures

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path == "/admin" or path.startswith("/admin/"):
            outcome = self._authenticate(scope)
            if isinstance(outcome, JSONResponse):
                await outcome(scope, receive, send)
                return
            scope.setdefault("state", {})["operator"] = outcome
        await self.app(scope, receive, send)

    def _authenticate(self, scope: Scope) -> str | JSONResponse:
        """The operator's name, or the refusal to send."""
        if not self.tokens.enabled():
            return _error(
                503,
                "The admin API is disabled: no admin token is configured "
                "(ALIGNLOOP_ADMIN_TOKEN or ALIGNLOOP_ADMIN_TOKENS_FILE).",
                type="server_error",
                code="admin_disabled",
            )
        client = (scope.get("client") or ("unknown", 0))[0]
        wait = self.failures.retry_after(client)
        if wait is not None:
            return _error(
                429,
                f"Too many failed admin authentications from {client}; retry in {wait} s.",
                type="rate_limit_error",
                code="too_many_auth_failures",
                headers={"Retry-After": str(wait)},
            )
        headers = Headers(scope=scope)
        scheme, _, presented = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return self._failed(client, 401, "missing_token")
        name = self.tokens.authenticate(presented.strip())
        if name is None:
            return self._failed(client, 403, "invalid_token")
        claimed = headers.get(OPERATOR_HEADER.lower(), "").strip()
        if claimed and claimed != name:
            return _error(
                403,
                f"This token is {name!r}; it cannot act as {claimed!r}. The audit log names "
                f"the token's holder: drop the {OPERATOR_HEADER} header or use their token.",
                type="permission_error",
                param=OPERATOR_HEADER,
                code="operator_mismatch",
            )
        return name

    def _failed(self, client: str, status: int, code: str) -> JSONResponse:
        self.failures.failed(client)
        locked = self.failures.retry_after(client)
        if locked is not None:  # this failure was the last one allowed
            log.warning(
                "admin API: %s refused (429) for %d s after %d failed authentications",
                client, locked, self.failures.max_failures,
            )  # fmt: skip
        if status == 401:
            return _error(
                401,
                "Missing bearer token: send 'Authorization: Bearer <admin token>'.",
                type="authentication_error",
                code=code,
                headers={"WWW-Authenticate": 'Bearer realm="alignloop-admin"'},
            )
        return _error(403, "Invalid admin token.", type="permission_error", code=code)


def _operator(request: Request) -> str:
    """Who is acting, for the audit log: the name of the token (see the module docstring)."""
    return str(request.state.operator)


def _conn(request: Request) -> Iterator[psycopg.Connection]:
    with connect(request.app.state.database_url, autocommit=True) as conn:
        yield conn


Conn = Annotated[psycopg.Connection, Depends(_conn)]
Operator = Annotated[str, Depends(_operator)]


# --- bodies --------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=2000, description="Goes to the audit log.")


class PromoteBody(_Body):
    expect_state: State | None = None
    expect_generation: int | None = None


class CanaryBody(_Body):
    weight: float = Field(gt=0.0, lt=1.0, description="Traffic share of the canary.")
    expect_state: State | None = None
    expect_generation: int | None = None


class RejectBody(_Body):
    expect_state: State | None = None


class RollbackBody(_Body):
    to: str | None = Field(None, description="The version to make stable again.")
    expect_canary: str | None = Field(None, description="Act only if this is the canary.")
    expect_generation: int | None = None


class ReasonBody(_Body):
    pass


# --- routes --------------------------------------------------------------------------------


def _routing(conn: psycopg.Connection, routing: registry.Routing | None = None) -> dict:
    return asdict(routing or registry.routing_table(conn))


router = APIRouter(prefix="/admin")


@router.get("/policies")
def list_policies(conn: Conn, state: State | None = None) -> dict[str, Any]:
    versions = registry.list_versions(conn, state)
    live = policy_counts(conn, [v.version for v in versions])
    rows = [{**asdict(v), "live": live[v.version].to_dict()} for v in versions]
    return {"versions": rows, "routing": _routing(conn)}


@router.get("/policies/{version}")
def show_policy(
    conn: Conn, version: str, audit_limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> dict[str, Any]:
    info = asdict(registry.get(conn, version))
    info["live"] = policy_counts(conn, [version])[version].to_dict()
    info["audit"] = [asdict(a) for a in registry.audit_log(conn, version, audit_limit)]
    return info


@router.get("/routing")
def routing(conn: Conn) -> dict[str, Any]:
    return _routing(conn)


@router.get("/whoami")
def whoami(actor: Operator) -> dict[str, str]:
    """The operator the presented token names (what the audit log will record)."""
    return {"operator": actor}


@router.post("/policies/{version}/promote")
def promote(conn: Conn, actor: Operator, version: str, body: PromoteBody) -> dict[str, Any]:
    r = registry.promote(
        conn, version, actor=actor, reason=body.reason, expect_state=body.expect_state,
        expect_generation=body.expect_generation,
    )  # fmt: skip
    return {"policy": asdict(registry.get(conn, version)), "routing": _routing(conn, r)}


@router.post("/policies/{version}/canary")
def canary(conn: Conn, actor: Operator, version: str, body: CanaryBody) -> dict[str, Any]:
    """Start ``version`` as the canary, or change the weight if it is the canary already
    (as ``alignloop policy canary``). The choice is made on a snapshot, so the command
    carries that snapshot's generation unless the caller gave one."""
    current = registry.routing_table(conn)
    generation = current.generation if body.expect_generation is None else body.expect_generation
    common = {"actor": actor, "reason": body.reason, "expect_generation": generation}
    if current.canary_version == version:
        if body.expect_state not in (None, "canary"):
            raise registry.ConcurrentChange(
                f"{version!r} is canary, not {body.expect_state} as expected"
            )
        r = registry.set_canary_weight(conn, version, body.weight, **common)
    else:
        r = registry.start_canary(
            conn, version, body.weight, expect_state=body.expect_state, **common
        )
    return {"policy": asdict(registry.get(conn, version)), "routing": _routing(conn, r)}


@router.post("/policies/{version}/reject")
def reject(conn: Conn, actor: Operator, version: str, body: RejectBody) -> dict[str, Any]:
    r = registry.reject(
        conn, version, actor=actor, reason=body.reason, expect_state=body.expect_state
    )
    return {"policy": asdict(registry.get(conn, version)), "routing": _routing(conn, r)}


@router.post("/rollback")
def rollback(conn: Conn, actor: Operator, body: RollbackBody) -> dict[str, Any]:
    r = registry.rollback(
        conn, actor=actor, reason=body.reason, to=body.to, expect_canary=body.expect_canary,
        expect_generation=body.expect_generation,
    )  # fmt: skip
    return {"routing": _routing(conn, r)}


@router.post("/hold")
def hold(conn: Conn, actor: Operator, body: ReasonBody) -> dict[str, Any]:
    changed = registry.hold(conn, actor=actor, reason=body.reason)
    return {"changed": changed, "routing": _routing(conn)}


@router.post("/resume")
def resume(conn: Conn, actor: Operator, body: ReasonBody) -> dict[str, Any]:
    changed = registry.resume(conn, actor=actor, reason=body.reason)
    return {"changed": changed, "routing": _routing(conn)}


@router.delete("/users/{user:path}")
def erase_user(request: Request, conn: Conn, actor: Operator, user: str, body: ReasonBody) -> Any:
    """Erase one user's data and tombstone the user (:func:`feedback.erasure.erase_user`)."""
    if not body.reason.strip():
        return _error(400, "The reason must not be blank.", param="reason", code="invalid_value")
    try:
        deleted = erasure.erase_user(
            conn, user, actor=actor, reason=body.reason, user_ids=request.app.state.user_ids
        )
    except KeyMismatch as exc:
        log.error("erasure refused: %s", exc)
        return _error(500, str(exc), type="server_error", code="user_id_key_mismatch")
    return {"user": user, "deleted": deleted}


# --- the app -------------------------------------------------------------------------------


def create_app(
    database_url: str,
    token: AdminTokens | SecretStr | str | None,
    user_ids: UserIds | None = None,
    failures: AuthFailures | None = None,
) -> FastAPI:
    """``/admin/...`` (guarded by :class:`AdminAuth`) and ``/metrics`` (this process's
    Prometheus registry, unauthenticated as before). ``token``: the valid tokens, or the
    single ``ALIGNLOOP_ADMIN_TOKEN`` (ValueError if shorter than 32 bytes), which is joined
    by the settings' token file. ``user_ids``: how the ingestors store user ids, for
    erasure; ``failures``: the failed-authentication limit; None: from the settings."""
    from schemas.settings import Settings

    settings = Settings()
    tokens = token if isinstance(token, AdminTokens) else admin_auth.configured(settings, token)
    app = FastAPI(
        title="alignloop admin",
        version="0.1.0",
        docs_url=None,
        redoc_url=None,
        openapi_url=OPENAPI_PATH,  # under /admin: only a token holder reads it
    )
    _install_openapi(app)
    app.state.database_url = database_url
    app.state.user_ids = user_ids if user_ids is not None else user_ids_from(settings)
    app.include_router(router)
    failures = failures if failures is not None else admin_auth.configured_failures(settings)
    app.add_middleware(AdminAuth, tokens=tokens, failures=failures)
    _install_error_handlers(app)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


OPENAPI_PATH = "/admin/openapi.json"
ADMIN_SCHEME = "AdminToken"


def _error_statuses(method: str, path: str, operation: dict[str, Any]) -> tuple[int, ...]:
    """What an admin operation can refuse with (see the module docstring)."""
    statuses = {401, 403, 429, 500, 503}  # auth, its lockout, faults, disabled or no database
    if operation.get("parameters") or operation.get("requestBody"):
        statuses.add(400)
    if method != "get" or "{version}" in path:
        statuses |= {404, 409}  # no such version; an illegal or concurrent change
    return tuple(sorted(statuses))


def _install_openapi(app: FastAPI) -> None:
    """``OPENAPI_PATH``: FastAPI's document with what it cannot see: the bearer admin token,
    and the errors as they are answered (OpenAI error objects; a bad body is 400
    ``invalid_value``, not FastAPI's 422)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(
                title=app.title,
                version=app.version,
                description="The operations of `alignloop policy` over HTTP. See "
                "deploy/ops/admin_api.py and docs/policies-and-canary.md.",
                routes=app.routes,
            )
            components = doc.setdefault("components", {})
            schemas = components.setdefault("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            schemas.update(component_schemas([(ErrorResponse, "serialization")])[1])
            components["securitySchemes"] = {
                ADMIN_SCHEME: {"type": "http", "scheme": "bearer", "description": "An admin token."}
            }
            for path, item in doc["paths"].items():
                for method, operation in item.items():
                    responses = operation.setdefault("responses", {})
                    responses.pop("422", None)
                    responses.update(error_responses(_error_statuses(method, path, operation)))
                    operation["security"] = [{ADMIN_SCHEME: []}]
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def start_metrics_port(host: str, port: int) -> Any:
    """This process's Prometheus registry alone on ``host:port`` (prometheus_client's
    listener, on a daemon thread); RuntimeError if the port cannot be opened. Returns the
    server: ``shutdown()`` then ``server_close()`` stops it."""
    try:
        server, _ = start_http_server(port, addr=host)
    except OSError as exc:
        raise RuntimeError(f"the metrics port {host}:{port} could not be opened: {exc}") from exc
    log.info("/metrics alone on http://%s:%d/metrics", host, port)
    return server


def _configured_metrics_port() -> tuple[str, int] | None:
    from schemas.settings import Settings

    settings = Settings()
    if not settings.controller_metrics_port:
        return None
    return settings.controller_metrics_host, settings.controller_metrics_port


def serve_in_thread(
    app: FastAPI,
    host: str,
    port: int,
    *,
    metrics: tuple[str, int] | Literal["configured"] | None = CONFIGURED,
) -> tuple[uvicorn.Server, threading.Thread]:
    """Start uvicorn on a daemon thread and wait until it listens (RuntimeError if it could
    not, e.g. the port is taken). Stop it with ``server.should_exit = True; thread.join()``.

    Beside it, the metrics port: ``/metrics`` alone (:func:`start_metrics_port`) on
    ``metrics`` = (host, port), by default the settings' ``ALIGNLOOP_CONTROLLER_METRICS_HOST``
    : ``ALIGNLOOP_CONTROLLER_METRICS_PORT`` (port 0 or None: none). This is how the canary
    controller lets Prometheus scrape it while its operators' port stays on loopback; the
    metrics port closes when the server stops."""
    address = _configured_metrics_port() if metrics == CONFIGURED else metrics
    scrape = start_metrics_port(*address) if address and address[1] else None
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)

    def run() -> None:
        try:
            server.run()
        finally:
            if scrape is not None:
                scrape.shutdown()
                scrape.server_close()

    thread = threading.Thread(target=run, name="admin-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the HTTP server did not start on {host}:{port}")
        time.sleep(0.02)
    return server, thread
