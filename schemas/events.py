"""Kafka events: one versioned envelope, one payload model per event type.

Every event carries ``event_id`` (consumers deduplicate on it), ``event_type`` (the
discriminator) and ``schema_version`` (bumped on any incompatible payload change;
consumers reject versions they do not know into the dead-letter topic). Events are
JSON-encoded UTF-8; the Kafka key is the response id the event is about.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from schemas.chat import FinishReason, Role


def _now() -> datetime:
    return datetime.now(UTC)


class Event(BaseModel):
    """Fields every event has."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    schema_version: Literal[1] = 1
    occurred_at: datetime = Field(default_factory=_now)
    producer: str = Field(description="Which process made it, e.g. serving@host:pid.")

    def key(self) -> bytes:
        """The Kafka partition key."""
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


class LoggedToolCall(BaseModel):
    """A function call an assistant turn made (``arguments``: JSON text, as written)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str
    name: str
    arguments: str


class LoggedMessage(BaseModel):
    """One turn of a conversation. Version 2 added tool turns: ``tool_calls`` on assistant
    turns that called tools, ``tool_call_id`` on tool results."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    role: Role
    content: str
    tool_calls: list[LoggedToolCall] | None = None
    tool_call_id: str | None = None


def prompt_hash(messages: Sequence[LoggedMessage], prompt: str | None = None) -> str:
    """Identity of a prompt: sha256 of the canonical JSON of the conversation sent (of the
    raw ``prompt`` for a legacy completion). Plain turns hash as they did in version 1."""
    if prompt is not None and not messages:
        canonical = json.dumps(["prompt", prompt], ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()
    turns: list[list[Any]] = []
    for m in messages:
        turn: list[Any] = [m.role, m.content]
        if m.tool_calls:
            turn.append([[c.name, c.arguments] for c in m.tool_calls])
        if m.tool_call_id is not None:
            turn.append(m.tool_call_id)
        turns.append(turn)
    canonical = json.dumps(turns, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class LoggedChoice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    index: int
    text: str
    finish_reason: FinishReason | None
    completion_tokens: int
    tool_calls: list[LoggedToolCall] = Field(
        default_factory=list, description="Version 2: the calls this answer made."
    )


class SamplingRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    temperature: float
    top_p: float
    max_tokens: int
    n: int
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    # Version 2: the other parameters a request set (absent: the engine's default).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    logprobs: int | None = Field(None, description="How many top log-probs were asked for.")
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class InteractionLogged(Event):
    """A chat completion (or a legacy text completion) was served, streamed or not.

    Version 2 added ``endpoint`` and ``prompt`` (a legacy completion's raw prompt; its
    ``messages`` are empty), tool turns and calls, and the other sampling parameters.
    Consumers read both versions: every version-2 field has a version-1 default.
    """

    # Widened per event type: only this one has a version 2 (the others refuse it).
    schema_version: Literal[1, 2] = 2  # type: ignore[assignment]
    event_type: Literal["interaction.logged"] = "interaction.logged"
    endpoint: Literal["chat", "completions"] = "chat"
    prompt: str | None = None
    response_id: str
    user: str | None
    principal: str | None = Field(
        None, description="The API key's name the answer was served to (None: before keys)."
    )
    policy_version: str
    model: str = Field(description="The `model` the client asked for.")
    messages: list[LoggedMessage]
    choices: list[LoggedChoice]
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    ttft_ms: float | None
    stream: bool
    sampling: SamplingRecord

    def key(self) -> bytes:
        return self.response_id.encode()


Rating = Literal["up", "down"]


class FeedbackSubmitted(Event):
    """A user rated one answer thumbs up or down.

    ``feedback_id`` identifies the rating; when the client supplied an idempotency key it
    is derived from it (so a retried request yields the same id and event id, and the
    ingestor stores it once). A later rating by the same user of the same response
    replaces this one as *current*; both stay in the history.
    """

    event_type: Literal["feedback.submitted"] = "feedback.submitted"
    feedback_id: uuid.UUID
    response_id: str
    choice_index: int = Field(0, ge=0, description="Which of the response's n choices.")
    rating: Rating
    user: str | None = None
    principal: str | None = Field(None, description="The API key's name that rated.")
    comment: str | None = None
    idempotency_key: str | None = None

    def key(self) -> bytes:
        return self.response_id.encode()


class PreferenceSubmitted(Event):
    """An explicit comparison: which of two answers is better.

    Either both answers are responses this service issued (``chosen_response_id`` /
    ``rejected_response_id``), or an annotation tool supplies the texts (``messages``,
    ``chosen``, ``rejected``).
    """

    event_type: Literal["preference.submitted"] = "preference.submitted"
    preference_id: uuid.UUID
    user: str | None = None
    principal: str | None = Field(None, description="The API key's name that compared.")
    idempotency_key: str | None = None
    chosen_response_id: str | None = None
    rejected_response_id: str | None = None
    messages: list[LoggedMessage] | None = None
    chosen: str | None = None
    rejected: str | None = None

    def key(self) -> bytes:
        return (self.chosen_response_id or str(self.preference_id)).encode()


class AdapterLoadFailed(Event):
    """A serving replica could not load a policy version's adapter into its engine.

    The replica keeps serving that version's traffic from the stable policy; the canary
    controller treats any such failure as a guardrail breach and rolls the version back.
    Produced to `schemas.topics.POLICY`, keyed by the version.
    """

    event_type: Literal["policy.adapter_load_failed"] = "policy.adapter_load_failed"
    version: str
    adapter_uri: str | None
    error: str

    def key(self) -> bytes:
        return self.version.encode()


class RequestFailed(Event):
    """A routed chat completion failed on the server side (an engine fault: a 5xx, or a
    stream cut by an engine error) while served by ``version``. Client mistakes are 400s
    before the engine runs and never produce one; neither do pinned requests (their caller
    chose the version) nor a client that went away. The canary controller compares the
    canary's failure rate with the stable version's (a guardrail), counting only failures
    of enough distinct principals. Produced to `schemas.topics.POLICY`."""

    event_type: Literal["serving.request_failed"] = "serving.request_failed"
    version: str
    status: int = Field(ge=500, le=599)
    error: str
    model: str | None = Field(None, description="The `model` the client asked for.")
    arm: str | None = Field(None, description="How it was routed: stable, canary, fallback.")
    principal: str | None = Field(None, description="The API key's name that asked.")

    def key(self) -> bytes:
        return self.version.encode()


class PolicyCandidate(Event):
    """A training round registered a new candidate policy version (an adapter over the base
    model). Informational: the registry row (``policy_versions``) is the record, and the
    canary controller acts on the registry, not on this event. Produced by the trainer to
    `schemas.topics.POLICY`, keyed by the version. Non-finite metric values are encoded as
    JSON null."""

    event_type: Literal["policy.candidate"] = "policy.candidate"
    version: str
    adapter_uri: str
    checksum: str
    parent_version: str | None
    reward_model_version: str | None
    training_round: int
    metrics: dict[str, Any]

    def key(self) -> bytes:
        return self.version.encode()


AnyEvent = Annotated[
    InteractionLogged
    | FeedbackSubmitted
    | PreferenceSubmitted
    | AdapterLoadFailed
    | RequestFailed
    | PolicyCandidate,
    Field(discriminator="event_type"),
]
_ADAPTER: TypeAdapter[AnyEvent] = TypeAdapter(AnyEvent)


def parse_event(raw: bytes | str) -> AnyEvent:
    """Decode and validate one event; raises ``pydantic.ValidationError`` if malformed."""
    return _ADAPTER.validate_json(raw)
