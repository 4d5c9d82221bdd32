"""The admin HTTP API: the operations of ``alignloop policy`` over HTTP, under ``/admin/``.

    GET  /admin/policies[?state=S]          all versions and the routing table
    GET  /admin/policies/{v}[?audit_limit=N] one version and its audit trail

A version's ``live`` object holds its live A/B counts from the ``policy_stats`` table
(:func:`feedback.ab_counters.policy_counts`: answers ``served`` and ``rated``, current
``ups`` and ``downs``, ``up_rate``; zeros before any traffic).
    GET  /admin/routing                      the routing table
    POST /admin/policies/{v}/promote         {"reason", "expect_state"?, "expect_generation"?}
    POST /admin/policies/{v}/canary          {"weight", "reason", "expect_state"?, ...}
    POST /admin/policies/{v}/reject          {"reason", "expect_state"?}
    POST /admin/rollback                     {"reason", "to"?, "expect_canary"?, ...}
    POST /admin/hold | /admin/resume         {"reason"}
    DELETE /admin/users/{user}               {"reason"}: erase the user's interactions,
                                             ratings and preferences, tombstone the user;
                                             200 {"user", "deleted": rows per table}

Served by the canary controller on its HTTP port beside ``/metrics`` and the console (one
place for operators: :mod:`deploy.console.app`), or alone by ``alignloop admin``. Each
request runs on its own autocommit connection, so every command is one registry transaction.

Auth: ``Authorization: Bearer <ALIGNLOOP_ADMIN_TOKEN>``, compared in constant time. No
header (or not Bearer) → 401 with ``WWW-Authenticate: Bearer``; a wrong token → 403. With
no token configured the admin API is *disabled*: every ``/admin`` route answers 503
``admin_disabled`` (503, not 404, so a script cannot mistake it for "no such version").

Operator identity: the audit log records the ``X-Alignloop-Operator`` header (optional,
default ``admin-api``). The token is shared, so the header is the operator's word, as
``--actor`` is for the CLI; the name ``controller`` is refused (it marks the controller's
own actions).

Bodies: ``reason`` is required and non-empty (it goes to the audit log). Only the
``expect_*`` checks the registry can apply atomically are accepted for each command;
unknown fields are a 400. Errors use the OpenAI shape ``{"error": {"message", "type",
"param", "code"}}``: bad body 400 ``invalid_value``, unknown version 404
``policy_not_found``, illegal transition 409 ``illegal_transition``, someone changed the
registry since you looked (``expect_*`` failed, or a concurrent command won) 409
``concurrent_change``, Postgres unreachable 503 ``database_unavailable``.
"""

from __future__ import annotations

import hmac
import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Annotated, Any, Literal

import psycopg
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from deploy.policies import registry
from feedback import erasure
from feedback.ab_counters import policy_counts
from feedback.db import connect
from feedback.user_ids import KeyMismatch, UserIds
from feedback.user_ids import configured as user_ids_from
from schemas.errors import error_body

log = logging.getLogger(__name__)

DEFAULT_OPERATOR = "admin-api"
OPERATOR_HEADER = "X-Alignloop-Operator"
_OPERATOR_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$")

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

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), type=kind)


# --- auth ----------------------------------------------------------------------------------


class AdminAuth:
    """ASGI middleware guarding every ``/admin`` path before anything else runs (so an
    unauthenticated request learns nothing, not even whether its body would parse)."""

    def __init__(self, app: ASGIApp, token: SecretStr | str | None) -> None:
        self.app = app
        secret = token.get_secret_value() if isinstance(token, SecretStr) else token
        self._token = secret.encode() if secret else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path == "/admin" or path.startswith("/admin/"):
            refusal = self._refusal(Headers(scope=scope))
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, headers: Headers) -> JSONResponse | None:
        if self._token is None:
            return _error(
                503,
                "The admin API is disabled: no ALIGNLOOP_ADMIN_TOKEN is configured.",
                type="server_error",
                code="admin_disabled",
            )
        scheme, _, presented = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return _error(
                401,
                "Missing bearer token: send 'Authorization: Bearer <ALIGNLOOP_ADMIN_TOKEN>'.",
                type="authentication_error",
                code="missing_token",
                headers={"WWW-Authenticate": 'Bearer realm="alignloop-admin"'},
            )
        if not hmac.compare_digest(presented.strip().encode(), self._token):
            return _error(
                403, "Invalid admin token.", type="permission_error", code="invalid_token"
            )
        return None


def _operator(
    x_alignloop_operator: Annotated[str | None, Header()] = None,
) -> str:
    """Who is acting, for the audit log (see the module docstring)."""
    name = (x_alignloop_operator or "").strip() or DEFAULT_OPERATOR
    if not _OPERATOR_RE.match(name) or name == registry.CONTROLLER:
        raise RequestValidationError(
            [
                {
                    "type": "value_error",
                    "loc": ("header", OPERATOR_HEADER),
                    "msg": "an operator name of 1-64 letters, digits or ._@+- "
                    f"(not {registry.CONTROLLER!r})",
                }
            ]
        )
    return name


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
    database_url: str, token: SecretStr | str | None, user_ids: UserIds | None = None
) -> FastAPI:
    """``/admin/...`` (guarded by :class:`AdminAuth`) and ``/metrics`` (this process's
    Prometheus registry, unauthenticated as before). ``user_ids``: how the ingestors store
    user ids, for erasure; None: from the settings (:mod:`feedback.user_ids`)."""
    app = FastAPI(title="alignloop admin", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.database_url = database_url
    app.state.user_ids = user_ids if user_ids is not None else _configured_user_ids()
    app.include_router(router)
    app.add_middleware(AdminAuth, token=token)
    _install_error_handlers(app)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def _configured_user_ids() -> UserIds:
    from schemas.settings import Settings

    return user_ids_from(Settings())


def serve_in_thread(app: FastAPI, host: str, port: int) -> tuple[uvicorn.Server, threading.Thread]:
    """Start uvicorn on a daemon thread and wait until it listens (RuntimeError if it could
    not, e.g. the port is taken). Stop it with ``server.should_exit = True; thread.join()``."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="admin-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the HTTP server did not start on {host}:{port}")
        time.sleep(0.02)
    return server, thread
