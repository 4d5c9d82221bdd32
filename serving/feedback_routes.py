"""POST /v1/feedback and POST /v1/preferences.

A rating is accepted (202) once its event is safely handed over: acknowledged by Kafka,
or fsync'd into the local spool while Kafka is away. Response ids are checked by their
signature, so an id this service never issued is refused (404) on any replica without a
database round trip. A real id whose interaction has not been ingested yet is fine: the
ingestor joins them later.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from schemas import topics
from schemas.events import FeedbackSubmitted, LoggedMessage, PreferenceSubmitted
from schemas.feedback_api import Accepted, FeedbackRequest, PreferenceRequest, idempotent_id
from schemas.settings import Settings
from serving.errors import APIError, parse_body, read_json
from serving.publisher import PRODUCER
from serving.response_ids import ResponseIdSigner

IDEMPOTENCY_HEADER = "Idempotency-Key"


def feedback_router(settings: Settings, signer: ResponseIdSigner, publisher) -> APIRouter:
    router = APIRouter()

    def check_issued(response_id: str, param: str) -> None:
        if not signer.is_valid(response_id):
            raise APIError(
                404,
                f"No response with id '{response_id}' was issued by this service.",
                type="not_found",
                param=param,
                code="response_not_found",
            )

    async def accept(event, kind: str, event_id) -> JSONResponse:
        """Hand the event over (Kafka ack or fsync'd spool), then answer 202."""
        try:
            where = await publisher.publish_and_wait(topics.FEEDBACK, event)
        except Exception as e:  # spool full, or the publisher is shutting down
            raise APIError(
                503,
                f"Feedback cannot be accepted right now ({e}); retry later "
                "with the same idempotency key.",
                type="server_error",
                code="service_unavailable",
            ) from None
        body = Accepted(id=event_id, object=kind, delivered_to=where)
        return JSONResponse(body.model_dump(mode="json"), status_code=202)

    def idempotency_key(request: Request, body_key: str | None) -> str | None:
        return body_key or request.headers.get(IDEMPOTENCY_HEADER) or None

    @router.post("/v1/feedback", status_code=202)
    async def submit_feedback(request: Request) -> JSONResponse:
        req = parse_body(FeedbackRequest, await read_json(request, settings.max_request_bytes))
        check_issued(req.response_id, "response_id")
        key = idempotency_key(request, req.idempotency_key)
        feedback_id = idempotent_id("feedback", key)
        event = FeedbackSubmitted(
            event_id=feedback_id,
            producer=PRODUCER,
            feedback_id=feedback_id,
            response_id=req.response_id,
            choice_index=req.choice_index,
            rating=req.rating,
            user=req.user,
            comment=req.comment,
            idempotency_key=key,
        )
        return await accept(event, "feedback", feedback_id)

    @router.post("/v1/preferences", status_code=202)
    async def submit_preference(request: Request) -> JSONResponse:
        req = parse_body(PreferenceRequest, await read_json(request, settings.max_request_bytes))
        if req.chosen_response_id is not None:
            check_issued(req.chosen_response_id, "chosen_response_id")
            check_issued(req.rejected_response_id or "", "rejected_response_id")
        key = idempotency_key(request, req.idempotency_key)
        preference_id = idempotent_id("preference", key)
        event = PreferenceSubmitted(
            event_id=preference_id,
            producer=PRODUCER,
            preference_id=preference_id,
            user=req.user,
            idempotency_key=key,
            chosen_response_id=req.chosen_response_id,
            rejected_response_id=req.rejected_response_id,
            messages=None
            if req.messages is None
            else [LoggedMessage(role=m.role, content=m.content) for m in req.messages],
            chosen=req.chosen,
            rejected=req.rejected,
        )
        return await accept(event, "preference", preference_id)

    return router
