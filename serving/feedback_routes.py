"""POST /v1/feedback and POST /v1/preferences.

A rating is accepted (202) once its event is safely handed over: acknowledged by Kafka,
or fsync'd into the local spool while Kafka is away. Response ids are checked by their
signature, so an id this service never issued is refused (404) on any replica without a
database round trip. A real id whose interaction has not been ingested yet is fine: the
ingestor joins them later.

A vote belongs to the one who was served: the id is signed for the API key's principal
and the end user the product named (`serving.response_ids`), so rating an answer served to
another key, or as another user than the one served, is the same 404 as a forged id. The
choice rated must be one the answer has (``choice_index`` below its ``n``), and the answer
no older than ``feedback_max_age_days``. Text preferences (texts the caller wrote, which
training takes as given) need the ``annotate`` scope.

These two routes are a plain ASGI middleware in front of the FastAPI app rather than
FastAPI routes: they are the highest-rate endpoints (thousands of ratings a second per
replica), and FastAPI's request/dependency machinery and the middleware stack around it
cost more CPU than the endpoint's own work. The contract is the same: the same body
limits and error objects (`serving.errors`), the same request models, and every answer is
counted in ``alignloop_http_requests_total``. An unexpected exception still reaches the
app's 500 handler (this middleware sits inside Starlette's ServerErrorMiddleware).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from schemas import topics
from schemas.errors import error_body
from schemas.events import Event, FeedbackSubmitted, LoggedMessage, PreferenceSubmitted
from schemas.feedback_api import (
    Accepted,
    AcceptedKind,
    FeedbackRequest,
    PreferenceRequest,
    idempotent_id,
)
from schemas.settings import Settings
from serving import metrics
from serving.api_keys import Principal
from serving.auth import principal_of
from serving.errors import APIError, check_json_content_type, parse_body, parse_json, too_large
from serving.publisher import PRODUCER, EventPublisher, EventRejected
from serving.response_ids import IssuedResponse, ResponseIdSigner

IDEMPOTENCY_HEADER = "Idempotency-Key"
_IDEMPOTENCY_HEADER_RAW = IDEMPOTENCY_HEADER.lower().encode()  # as ASGI carries header names
FEEDBACK_PATH = "/v1/feedback"
PREFERENCES_PATH = "/v1/preferences"

_JSON_HEADERS = [(b"content-type", b"application/json")]
SPOOL_FULL_RETRY_AFTER_S = 5
"""Retry-After of a 503 (spool full): about the publisher's outage detection time, so a
client's retry lands after the broker has had a chance to come back."""


class FeedbackEndpoints:
    """ASGI middleware answering POST /v1/feedback and /v1/preferences itself (any other
    method on those paths gets 405); everything else goes on to ``app``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        settings: Settings,
        signer: ResponseIdSigner,
        publisher: EventPublisher,
    ) -> None:
        self.app = app
        self.max_bytes = settings.max_request_bytes
        self.max_age_s = settings.feedback_max_age_days * 86400.0
        self.signer = signer
        self.publisher = publisher
        # handler(parsed JSON body, Idempotency-Key header, principal) -> the 202 body
        self.routes: dict[str, Callable[[object, str | None, Principal], Awaitable[bytes]]] = {
            FEEDBACK_PATH: self.submit_feedback,
            PREFERENCES_PATH: self.submit_preference,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self.routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if handler is None:
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        try:
            if scope["method"] != "POST":
                raise APIError(405, "Method Not Allowed")
            check_json_content_type(_header(scope, b"content-type"))
            body = await self.read_body(scope, receive)
            if body is None:
                return  # the client went away before sending its body: nobody to answer
            principal = principal_of(scope)
            status = 202
            content = await handler(parse_json(body), _idempotency_header(scope), principal)
        except APIError as e:
            status = e.status
            content = _json(error_body(e.message, e.type, e.param, e.code))
        headers = [*_JSON_HEADERS, (b"content-length", str(len(content)).encode())]
        if status == 405:
            headers.append((b"allow", b"POST"))
        if status == 503:  # the spool is full: it drains at the broker's pace once it is back
            headers.append((b"retry-after", str(SPOOL_FULL_RETRY_AFTER_S).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})
        metrics.REQUESTS.labels(path, str(status), "-").inc()

    async def read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """At most ``max_bytes`` of body (413 beyond, even without Content-Length); None if
        the client disconnected."""
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                raise too_large(self.max_bytes)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None  # http.disconnect
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > self.max_bytes:
                    raise too_large(self.max_bytes)
                chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def check_issued(
        self, response_id: str, param: str, principal: Principal, user: str | None
    ) -> IssuedResponse:
        """What the id says, if it was issued to this key for this user, recently enough;
        else 404 (not issued, or not to this caller: the same answer, so an id reveals
        nothing to anyone else) or 422 (too old to rate)."""
        issued = self.signer.verify(response_id, principal.name, user)
        if issued is None:
            whom = f"for the user '{user}'" if user is not None else "without a user"
            raise APIError(
                404,
                f"No response with id '{response_id}' was issued by this service to this "
                f"API key {whom}.",
                type="not_found",
                param=param,
                code="response_not_found",
            )
        if time.time() - issued.issued_at > self.max_age_s:
            raise APIError(
                422,
                f"The response '{response_id}' is too old to rate (older than "
                f"{self.max_age_s / 86400.0:g} days).",
                param=param,
                code="response_expired",
            )
        return issued

    async def accept(self, event: Event, kind: AcceptedKind, event_id: uuid.UUID) -> bytes:
        """Hand the event over (Kafka ack or fsync'd spool); the 202 body."""
        try:
            where = await self.publisher.publish_and_wait(topics.FEEDBACK, event)
        except EventRejected as e:  # Kafka will never take it: quarantined, not retried
            if e.reason == "serialization":
                raise APIError(400, f"The {kind} cannot be stored: {e.detail}") from None
            raise APIError(
                413,
                f"The {kind} is larger than the event bus accepts ({e.reason}); shorten it.",
                code="request_too_large",
            ) from None
        except Exception as e:  # spool full, or the publisher is shutting down
            raise APIError(
                503,
                f"Feedback cannot be accepted right now ({e}); retry later "
                "with the same idempotency key.",
                type="server_error",
                code="service_unavailable",
            ) from None
        return Accepted(id=event_id, object=kind, delivered_to=where).model_dump_json().encode()

    async def submit_feedback(
        self, payload: object, header_key: str | None, principal: Principal
    ) -> bytes:
        req = parse_body(FeedbackRequest, payload)
        issued = self.check_issued(req.response_id, "response_id", principal, req.user)
        if req.choice_index >= issued.n:
            raise APIError(
                400,
                f"choice_index must be below the answer's n ({issued.n}); got {req.choice_index}.",
                param="choice_index",
                code="invalid_value",
            )
        key = req.idempotency_key or header_key
        feedback_id = idempotent_id("feedback", _scoped(principal, key))
        event = FeedbackSubmitted(
            event_id=feedback_id,
            producer=PRODUCER,
            feedback_id=feedback_id,
            response_id=req.response_id,
            choice_index=req.choice_index,
            rating=req.rating,
            user=req.user,
            principal=principal.name,
            comment=req.comment,
            idempotency_key=key,
        )
        return await self.accept(event, "feedback", feedback_id)

    async def submit_preference(
        self, payload: object, header_key: str | None, principal: Principal
    ) -> bytes:
        req = parse_body(PreferenceRequest, payload)
        if req.chosen_response_id is not None:
            self.check_issued(req.chosen_response_id, "chosen_response_id", principal, req.user)
            self.check_issued(
                req.rejected_response_id or "", "rejected_response_id", principal, req.user
            )
        elif not principal.may("annotate"):
            raise APIError(
                403,
                f"The key '{principal.name}' lacks the 'annotate' scope: text preferences "
                "(chosen/rejected written by the caller) are trained on as given. Compare two "
                "served answers by their response ids instead.",
                type="permission_error",
                param="chosen",
                code="insufficient_scope",
            )
        key = req.idempotency_key or header_key
        preference_id = idempotent_id("preference", _scoped(principal, key))
        event = PreferenceSubmitted(
            event_id=preference_id,
            producer=PRODUCER,
            preference_id=preference_id,
            user=req.user,
            principal=principal.name,
            idempotency_key=key,
            chosen_response_id=req.chosen_response_id,
            rejected_response_id=req.rejected_response_id,
            messages=None
            if req.messages is None
            else [LoggedMessage(role=m.role, content=m.content) for m in req.messages],
            chosen=req.chosen,
            rejected=req.rejected,
        )
        return await self.accept(event, "preference", preference_id)


def _scoped(principal: Principal, key: str | None) -> str | None:
    """An idempotency key within its principal: two keys choosing the same idempotency key
    make two events, never one overwriting the other."""
    return None if key is None else f"{principal.name}\0{key}"


def _idempotency_header(scope: Scope) -> str | None:
    return _header(scope, _IDEMPOTENCY_HEADER_RAW) or None


def _header(scope: Scope, name: bytes) -> str | None:
    """The first header ``name`` (lower case, as ASGI carries names), or None."""
    for key, value in scope["headers"]:
        if key == name:
            text: str = value.decode("latin-1")
            return text
    return None


def _json(content: dict[str, Any]) -> bytes:
    """As Starlette's JSONResponse renders it."""
    return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode()
