"""Who is calling, before anything else runs: the API key check in front of ``/v1``.

An ASGI middleware, outermost, so the feedback routes (a middleware of their own) and the
FastAPI routes see the same answer. A ``/v1`` request needs ``Authorization: Bearer <key>``
naming a key of the key ring (`serving.api_keys`) with the route's scope:

======================================  ===========
``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``   ``chat``
``/v1/feedback``, ``/v1/preferences``   ``feedback``
======================================  ===========

Finer checks (``annotate`` for text preferences, ``pin`` for naming a version) are made
where the body is read. A missing or unknown key is 401, a key without the scope 403, both
in the OpenAI error shape and with nothing logged or published. The principal goes on in
``scope["state"]["principal"]`` (``request.state.principal`` in FastAPI).

Health, readiness and ``/metrics`` stay open: orchestrators and Prometheus call them, and
they say nothing a caller could use to steer the service.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Receive, Scope, Send

from schemas.errors import error_body
from serving import metrics
from serving.api_keys import ANONYMOUS, KeyRing, Principal
from serving.api_keys import Scope as KeyScope

ROUTE_SCOPES: dict[str, KeyScope] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "chat",
    "/v1/models": "chat",
    "/v1/feedback": "feedback",
    "/v1/preferences": "feedback",
}


def principal_of(scope: Scope) -> Principal:
    """The caller `Authenticate` let through (anonymous where no check ran)."""
    found: Principal = scope.get("state", {}).get("principal", ANONYMOUS)
    return found


class Authenticate:
    """401/403 for a ``/v1`` request without a key allowed the route; else pass it on
    with its principal. ``keys=None``: development without keys, everyone anonymous."""

    def __init__(self, app: ASGIApp, *, keys: KeyRing | None) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        principal: Principal | None = ANONYMOUS
        if self.keys is not None:
            key = _bearer(scope)
            principal = self.keys.authenticate(key) if key else None
            if principal is None:
                await _refuse(
                    send,
                    path,
                    401,
                    "Incorrect or missing API key: send 'Authorization: Bearer <key>' with a "
                    "key made by `alignloop keys create`.",
                    "invalid_request_error",
                    "invalid_api_key",
                )
                return
            needed = ROUTE_SCOPES.get(path.rstrip("/"))
            if needed is not None and not principal.may(needed):
                await _refuse(
                    send,
                    path,
                    403,
                    f"The key '{principal.name}' lacks the '{needed}' scope this route needs.",
                    "permission_error",
                    "insufficient_scope",
                )
                return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


def _bearer(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            text: str = value.decode("latin-1")
            if text[:7].lower() == "bearer ":
                return text[7:].strip()
            return ""
    return ""


async def _refuse(send: Send, path: str, status: int, message: str, kind: str, code: str) -> None:
    body = json.dumps(error_body(message, kind, None, code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="alignloop"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    route = path if path.rstrip("/") in ROUTE_SCOPES else "unmatched"
    metrics.REQUESTS.labels(route, str(status), "-").inc()
