"""The feedback wire protocol: thumbs on one answer, or a preference between two.

Ids the server returns are stable: a request retried with the same idempotency key (the
``idempotency_key`` field or the ``Idempotency-Key`` header) gets the same id back and is
stored once.
"""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator

from schemas.events import Rating

MAX_COMMENT_CHARS = 4000
MAX_KEY_CHARS = 256
MAX_TEXT_CHARS = 32_000


class FeedbackRequest(BaseModel):
    """POST /v1/feedback: thumbs up or down on one answer."""

    model_config = ConfigDict(extra="forbid")

    response_id: StrictStr = Field(min_length=1, max_length=MAX_KEY_CHARS)
    rating: Rating
    choice_index: int = Field(0, ge=0, le=127, strict=True)
    user: StrictStr | None = Field(None, min_length=1, max_length=MAX_KEY_CHARS)
    comment: StrictStr | None = Field(None, max_length=MAX_COMMENT_CHARS)
    idempotency_key: StrictStr | None = Field(None, min_length=1, max_length=MAX_KEY_CHARS)


class PreferenceMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr = Field(max_length=MAX_TEXT_CHARS)


class PreferenceRequest(BaseModel):
    """POST /v1/preferences: which of two answers is better.

    Either two answers this service gave (``chosen_response_id``, ``rejected_response_id``)
    or, from an annotation tool, the conversation and two candidate texts
    (``messages``, ``chosen``, ``rejected``).
    """

    model_config = ConfigDict(extra="forbid")

    chosen_response_id: StrictStr | None = Field(None, min_length=1, max_length=MAX_KEY_CHARS)
    rejected_response_id: StrictStr | None = Field(None, min_length=1, max_length=MAX_KEY_CHARS)
    messages: list[PreferenceMessage] | None = Field(None, min_length=1, max_length=256)
    chosen: StrictStr | None = Field(None, min_length=1, max_length=MAX_TEXT_CHARS)
    rejected: StrictStr | None = Field(None, min_length=1, max_length=MAX_TEXT_CHARS)
    user: StrictStr | None = Field(None, min_length=1, max_length=MAX_KEY_CHARS)
    idempotency_key: StrictStr | None = Field(None, min_length=1, max_length=MAX_KEY_CHARS)

    @model_validator(mode="after")
    def _one_form(self) -> PreferenceRequest:
        by_id = (self.chosen_response_id, self.rejected_response_id)
        by_text = (self.messages, self.chosen, self.rejected)
        if all(v is not None for v in by_id) and all(v is None for v in by_text):
            if self.chosen_response_id == self.rejected_response_id:
                raise ValueError("chosen_response_id and rejected_response_id must differ")
            return self
        if all(v is not None for v in by_text) and all(v is None for v in by_id):
            if self.chosen == self.rejected:
                raise ValueError("chosen and rejected must differ")
            return self
        raise ValueError(
            "give either chosen_response_id and rejected_response_id, "
            "or messages, chosen and rejected"
        )


AcceptedKind = Literal["feedback", "preference"]


class Accepted(BaseModel):
    """The 202 answer: the id, and where the event is now safely kept."""

    id: uuid.UUID
    object: AcceptedKind
    status: Literal["accepted"] = "accepted"
    delivered_to: Literal["kafka", "spool"]


_IDEMPOTENCY_NS = uuid.UUID("6f1d9a52-4c1b-4d59-9a3e-0c3f3c1c7a10")


def idempotent_id(kind: str, key: str | None) -> uuid.UUID:
    """Same key → same id (and event id), on any replica; no key → a fresh id."""
    if key is None:
        return uuid.uuid4()
    return uuid.uuid5(_IDEMPOTENCY_NS, f"{kind}:{key}")
