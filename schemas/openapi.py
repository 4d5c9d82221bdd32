"""The chat API as an OpenAPI document: every public operation with the request and answer
schemas of the pydantic models that validate and shape it, the API key it needs and the
errors it answers.

Serving replicas publish it at ``/openapi.json`` (`serving.openapi`); clients generate
SDKs from it and the fuzz tests (tests/integration/serving/test_openapi_fuzz.py) drive the
real server from it. The schemas come from the same models `serving` validates with, so
the document cannot drift from what the server checks. Checks a JSON Schema cannot say
(``top_logprobs`` needs ``logprobs``, a stop sequence must not be empty, a prompt must fit
the context window…) are still 400s in the OpenAI error shape.

The feedback routes are an ASGI middleware, not FastAPI routes (see
`serving.feedback_routes`), so FastAPI cannot see them; the chat routes read their body raw
(to bound its size before parsing). Both are described here instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from schemas.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ModelList
from schemas.completions import Completion, CompletionRequest
from schemas.errors import ErrorResponse
from schemas.feedback_api import Accepted, FeedbackRequest, PreferenceRequest

REF = "#/components/schemas/{model}"
API_KEY_SCHEME = "ApiKey"
"""The name of the bearer-key security scheme in ``components.securitySchemes``."""

ERROR_MEANINGS: dict[int, str] = {
    400: "The request is invalid: not JSON, a field out of range, an unsupported parameter, "
    "a prompt longer than the context window…; ``param`` names the field.",
    401: "No API key, or not a key of this service (``invalid_api_key``).",
    403: "The key lacks the scope this route (or this request) needs (``insufficient_scope``).",
    404: "No such model, response id or route.",
    405: "The method is not allowed on this path (``Allow`` lists the ones that are).",
    408: "The request was not received whole within the receive deadline.",
    409: "The request conflicts with the current state.",
    413: "The body exceeds ``max_request_bytes`` (or an event, the bus' message size).",
    415: "The body is declared as something other than JSON (``unsupported_media_type``).",
    422: "The answer rated is too old to rate (``response_expired``).",
    429: "A rate limit or the queue bound refused the request; retry after ``Retry-After`` "
    "seconds.",
    500: "An unexpected server fault (``server_error``).",
    503: "Temporarily unavailable (the policy asked for, or the event spool is full); retry.",
}

_HEADERS: dict[int, dict[str, Any]] = {
    401: {
        "WWW-Authenticate": {
            "description": "The authentication scheme to use (Bearer).",
            "required": True,
            "schema": {"type": "string"},
        }
    },
    429: {
        "Retry-After": {
            "description": "Whole seconds until a retry can succeed.",
            "required": True,
            "schema": {"type": "string", "pattern": "^[0-9]+$"},
        }
    },
    405: {
        "Allow": {
            "description": "The methods this path allows.",
            "required": True,
            "schema": {"type": "string"},
        }
    },
}


def error_responses(
    statuses: tuple[int, ...], schema_name: str = "ErrorResponse"
) -> dict[str, Any]:
    """OpenAPI ``responses`` entries for ``statuses``, each an OpenAI error object (the
    component ``schema_name``) with the headers that status always carries."""
    out: dict[str, Any] = {}
    for status in statuses:
        entry: dict[str, Any] = {
            "description": ERROR_MEANINGS[status],
            "content": {"application/json": {"schema": {"$ref": REF.format(model=schema_name)}}},
        }
        if status in _HEADERS:
            entry["headers"] = _HEADERS[status]
        out[str(status)] = entry
    return out


Mode = Literal["validation", "serialization"]


def component_schemas(
    models: list[tuple[type[BaseModel], Mode]],
) -> tuple[dict[tuple[type[BaseModel], Mode], dict[str, Any]], dict[str, Any]]:
    """The ``$ref`` of each of ``models`` (requests as validated, answers as sent), and the
    JSON Schemas of them and every model they use, named as ``REF`` refers to them (a model
    whose two modes differ gets two names, ``-Input`` and ``-Output``)."""
    refs, top = models_json_schema(models, ref_template=REF)
    return {key: refs[key] for key in models}, dict(top.get("$defs", {}))


@dataclass(frozen=True)
class Operation:
    """One public operation of the chat API, as the document shows it."""

    method: str
    path: str
    summary: str
    scope: str
    request: type[BaseModel] | None
    answer: tuple[int, type[BaseModel]]
    errors: tuple[int, ...]
    streams: type[BaseModel] | None = None
    """The chunk model of a ``stream: true`` answer (server-sent events), if any."""
    example: dict[str, Any] = field(default_factory=dict)
    """A request body to show (``model``, if present, becomes the served model's name)."""


_ASK = [{"role": "user", "content": "What is the capital of France?"}]
_GENERATION_ERRORS = (400, 401, 403, 404, 408, 413, 415, 429, 500, 503)
_FEEDBACK_ERRORS = (400, 401, 403, 404, 408, 413, 415, 422, 429, 500, 503)

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "post", "/v1/chat/completions", "Create a chat completion", "chat",
        ChatCompletionRequest, (200, ChatCompletion), _GENERATION_ERRORS, ChatCompletionChunk,
        {"model": "", "messages": _ASK, "max_tokens": 16},
    ),
    Operation(
        "post", "/v1/completions", "Create a text completion (legacy)", "chat",
        CompletionRequest, (200, Completion), _GENERATION_ERRORS, Completion,
        {"model": "", "prompt": "The capital of France is", "max_tokens": 8},
    ),
    Operation(
        "get", "/v1/models", "List the models this key may name", "chat",
        None, (200, ModelList), (401, 403, 429, 500),
    ),
    Operation(
        "post", "/v1/feedback", "Rate one served answer (thumbs up or down)", "feedback",
        FeedbackRequest, (202, Accepted), _FEEDBACK_ERRORS, None,
        {"response_id": "chatcmpl-5f0c9a1d2e3b4c01665f2a1b3c4d5e6f7a8b9c0d", "rating": "up"},
    ),
    Operation(
        "post", "/v1/preferences", "Say which of two answers is better", "feedback",
        PreferenceRequest, (202, Accepted), _FEEDBACK_ERRORS, None,
        {"messages": _ASK, "chosen": "Paris.", "rejected": "Lyon, I think."},
    ),
)  # fmt: skip


def _stream_content(chunk: type[BaseModel]) -> dict[str, Any]:
    """Server-sent events: each ``data`` a chunk as JSON (an OpenAI error object if the
    answer fails midway), the last one ``[DONE]``."""
    return {
        "schema": {
            "type": "object",
            "required": ["data"],
            "properties": {"data": {"type": "string"}},
            "description": f"One event: ``data`` is a {chunk.__name__} as JSON (an "
            "ErrorResponse if the answer fails midway), or ``[DONE]`` after the last.",
        }
    }


def _operation(
    op: Operation,
    generated: dict[str, Any],
    refs: dict[tuple[type[BaseModel], Mode], Any],
    model_name: str,
) -> dict[str, Any]:
    """``op`` as an OpenAPI operation object (keeping FastAPI's ``operationId``)."""
    status, model = op.answer
    content: dict[str, Any] = {"application/json": {"schema": refs[model, "serialization"]}}
    if op.streams is not None:
        content["text/event-stream"] = _stream_content(op.streams)
    out: dict[str, Any] = {
        "summary": op.summary,
        "operationId": generated.get("operationId", op.path.strip("/").replace("/", "_")),
        "security": [{API_KEY_SCHEME: []}],
        "x-alignloop-scope": op.scope,
        "responses": {
            str(status): {"description": "Success.", "content": content},
            **error_responses(op.errors),
        },
    }  # fmt: skip
    if op.request is not None and op.request.__doc__:
        out["description"] = op.request.__doc__.strip()
    if op.request is not None:
        body: dict[str, Any] = {"schema": refs[op.request, "validation"]}
        if op.example:
            example = {**op.example, **({"model": model_name} if "model" in op.example else {})}
            body["examples"] = {"example": {"value": example}}
        out["requestBody"] = {"required": True, "content": {"application/json": body}}
    return out


def add_chat_api(doc: dict[str, Any], model_name: str) -> dict[str, Any]:
    """Describe every operation of `OPERATIONS` in ``doc`` (FastAPI's generated document,
    changed in place and returned): request and answer schemas, an example request (for
    ``model_name``, the served model), the bearer API key, the errors. The other paths
    (health, metrics) stay as FastAPI made them."""
    models: list[tuple[type[BaseModel], Mode]] = [(ErrorResponse, "serialization")]
    for op in OPERATIONS:
        if op.request is not None:
            models.append((op.request, "validation"))
        models.append((op.answer[1], "serialization"))
    refs, schemas = component_schemas(models)
    components = doc.setdefault("components", {})
    components.setdefault("schemas", {}).update(schemas)
    components.setdefault("securitySchemes", {})[API_KEY_SCHEME] = {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key made by `alignloop keys create`; each operation names the "
        "key scope it needs in x-alignloop-scope.",
    }
    paths = doc.setdefault("paths", {})
    for op in OPERATIONS:
        item = paths.setdefault(op.path, {})
        item[op.method] = _operation(op, item.get(op.method, {}), refs, model_name)
    return doc
