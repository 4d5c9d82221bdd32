"""The OpenAI-compatible chat completions wire protocol.

Requests are validated strictly enough that a malformed one fails here, with a message
naming the field, and never reaches the engine. A field this server does not honour is
refused (400 ``unsupported_parameter``), never dropped; `schemas.parity` lists every field
of OpenAI's API and what happens to it. Responses carry one extension field,
``policy_version``: which policy produced the answer (also sent as the
``X-Alignloop-Policy`` header), given only to an API key with the ``pin`` scope (null
otherwise, so a caller cannot learn its canary arm). Clients that do not know it ignore it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    Tag,
    field_validator,
    model_validator,
)

from schemas.sampling import MAX_TOP_LOGPROBS, SamplingFields

Role = Literal["system", "developer", "user", "assistant", "tool"]
FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class TextPart(BaseModel):
    """A content part; only text parts are accepted (the models here are text-only)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr = Field(pattern=FUNCTION_NAME)
    arguments: StrictStr = Field(description="The arguments as a JSON object, in a string.")


class ToolCall(BaseModel):
    """A call the assistant made (in a response, or echoed back in the history)."""

    model_config = ConfigDict(extra="forbid")
    id: StrictStr = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """One turn. ``tool_calls`` only on assistant turns; ``tool_call_id`` only on (and
    required by) tool turns, which answer one of the assistant's calls."""

    model_config = ConfigDict(extra="forbid")

    role: Role
    content: StrictStr | Annotated[list[TextPart], Field(min_length=1)] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: StrictStr | None = None
    refusal: StrictStr | None = None

    @model_validator(mode="after")
    def _shape_matches_role(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages may carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        if self.role != "tool" and self.tool_call_id is not None:
            raise ValueError("only tool messages may carry tool_call_id")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (it may be null only beside tool_calls)")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr = Field(pattern=FUNCTION_NAME)
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="A JSON Schema of the arguments object."
    )
    strict: StrictBool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: StrictStr = Field(pattern=FUNCTION_NAME)
    description: StrictStr | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: StrictBool | None = None

    @field_validator("schema_")
    @classmethod
    def _is_a_json_schema(cls, v: dict[str, Any]) -> dict[str, Any]:
        check_json_schema(v)
        return v


class ResponseFormatText(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]


class ResponseFormatJsonObject(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["json_object"]


class ResponseFormatJsonSchema(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


_FORMAT_TAGS = {"text": "Text", "json_object": "JsonObject", "json_schema": "JsonSchema"}


def _format_tag(value: Any) -> str | None:
    """The union member for a ``response_format`` (tags are class-like names, which error
    locations skip: the field path reads ``response_format.json_schema.schema``)."""
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return _FORMAT_TAGS.get(kind) if isinstance(kind, str) else None


ResponseFormat = Annotated[
    Annotated[ResponseFormatText, Tag("Text")]
    | Annotated[ResponseFormatJsonObject, Tag("JsonObject")]
    | Annotated[ResponseFormatJsonSchema, Tag("JsonSchema")],
    Discriminator(
        _format_tag,
        custom_error_type="invalid_response_format",
        custom_error_message="type must be 'text', 'json_object' or 'json_schema'",
    ),
]


def check_json_schema(schema: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the problem if ``schema`` is not a valid JSON Schema."""
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise ValueError(f"not a valid JSON Schema: {e.message}") from None


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: StrictBool = True
    modalities: list[Literal["text"]] | None = Field(
        None, description="Only text: the models served here write text."
    )
    prediction: dict[str, Any] | None = Field(
        None, description="Accepted and ignored: a latency hint that never changes answers."
    )

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise ValueError("tool_choice other than 'none' requires tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tools:
            names = {t.function.name for t in self.tools}
            if self.tool_choice.function.name not in names:
                raise ValueError(
                    f"tool_choice names '{self.tool_choice.function.name}', "
                    f"which is not among the tools ({', '.join(sorted(names))})"
                )
        if self.tools and self.response_format and self.response_format.type != "text":
            raise ValueError("response_format cannot be combined with tools")
        function_names = [t.function.name for t in self.tools or []]
        if len(function_names) != len(set(function_names)):
            raise ValueError("tool function names must be unique")
        for tool in self.tools or []:
            if tool.function.parameters is not None:
                try:
                    check_json_schema(tool.function.parameters)
                except ValueError as e:
                    raise ValueError(f"tool '{tool.function.name}' parameters: {e}") from None
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def effective_tool_choice(self) -> Literal["none", "auto", "required"] | NamedToolChoice:
        """OpenAI's default: ``auto`` when tools are given, else ``none``."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None
    refusal: str | None = None


FinishReason = Literal["stop", "length", "tool_calls"]


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    policy_version: str | None = None
    system_fingerprint: str | None = None
    service_tier: str | None = None


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    policy_version: str | None = None


class ModelCard(BaseModel):
    """One `/v1/models` entry. ``state``: the routed name says ``routed``; a version says
    its registry state (``stable``, ``canary``, ``candidate``…); ``base`` is the model."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "alignloop"
    max_model_len: int | None = None
    state: str | None = None
    root: str | None = None
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
