"""HTTP errors in the OpenAI error shape, and the handlers that guarantee it.

Every failure the API can report is an `APIError` (status + OpenAI error fields). The
handlers installed by `install_error_handlers` turn it, FastAPI's own validation
errors, unknown routes and any unexpected exception into
``{"error": {"message", "type", "param", "code"}}``, so a client never sees an HTML page
or a bare stack trace.
"""

from __future__ import annotations

import json
import logging
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from schemas.errors import error_body
from schemas.parity import Endpoint, refusal_message

log = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=BaseModel)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def response(self) -> JSONResponse:
        return JSONResponse(
            error_body(self.message, self.type, self.param, self.code), status_code=self.status
        )


_UNION_TAGS = {"str", "int", "float", "bool", "none", "dict"}


def _loc_to_param(loc: tuple[int | str, ...]) -> str:
    """('messages', 0, 'role') -> 'messages[0].role'. Drops the body/query prefix and the
    tags pydantic adds for union members (('content', 'list[TextPart]') -> 'content',
    ('tool_choice', 'NamedToolChoice', 'function') -> 'tool_choice.function')."""
    out = ""
    for part in loc:
        if part in ("body", "query") and not out:
            continue
        # Union members appear in locations by type or class name, never snake_case
        # like a field: skip them.
        if isinstance(part, str) and (part in _UNION_TAGS or "[" in part or part[:1].isupper()):
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def validation_error(
    exc: ValidationError | RequestValidationError, endpoint: Endpoint | None = None
) -> APIError:
    """The first problem, named by the field it is about. A field the request model does
    not declare is ``unsupported_parameter``, with the parity table's reason."""
    errors = exc.errors()
    # A refused top-level field is the clearest thing to report, whatever else is wrong.
    first = next(
        (e for e in errors if e.get("type") == "extra_forbidden" and len(e["loc"]) == 1),
        errors[0],
    )
    param = _loc_to_param(tuple(first.get("loc", ())))
    if first.get("type") == "extra_forbidden":
        message = (
            refusal_message(endpoint, param)
            if endpoint is not None and "." not in param and "[" not in param
            else f"Unsupported parameter: '{param}' is not supported by this server."
        )
        return APIError(400, message, param=param, code="unsupported_parameter")
    msg = first.get("msg", "invalid value")
    message = f"Invalid value for '{param}': {msg}" if param else msg
    return APIError(400, message, param=param or None, code="invalid_value")


def check_json_content_type(content_type: str | None) -> None:
    """415 for a body declared as anything but JSON (``application/json`` or a ``+json``
    type). No Content-Type at all is taken as JSON, as FastAPI does."""
    if not content_type:
        return
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    ):
        return
    raise APIError(
        415,
        f"Unsupported Content-Type '{content_type[:100]}': send the body as JSON, with "
        "'Content-Type: application/json'.",
        code="unsupported_media_type",
    )


async def read_json(request: Request, max_bytes: int) -> object:
    """Read at most ``max_bytes`` of body (413 beyond, even without Content-Length) and
    parse it as JSON (415 if it is declared as something else, 400 if it is not JSON). A
    client gone before its body was whole (or closed by the receive deadline,
    `serving.connections`) is a 499 nobody reads, not a 500."""
    check_json_content_type(request.headers.get("content-type"))
    declared = request.headers.get("content-length")
    body: bytes | bytearray
    try:
        if declared is not None and declared.isdigit():
            if int(declared) > max_bytes:
                raise too_large(max_bytes)
            body = await request.body()  # bounded by the declared length
        else:  # chunked: count as it arrives
            body = bytearray()
            async for chunk in request.stream():
                body.extend(chunk)
                if len(body) > max_bytes:
                    raise too_large(max_bytes)
    except ClientDisconnect:
        raise APIError(499, "The client closed the connection.", code="client_closed") from None
    return parse_json(body)


def parse_json(body: bytes | bytearray) -> object:
    """A request body as JSON (400 if it is empty or not JSON)."""
    if not body:
        raise APIError(
            400, "The request body is empty; expected a JSON object.", code="invalid_json"
        )
    try:
        payload = json.loads(body)
    # ValueError: an integer past Python's digit limit; RecursionError: absurd nesting.
    except (ValueError, RecursionError) as e:
        raise APIError(
            400, f"The request body is not valid JSON: {e}", code="invalid_json"
        ) from None
    _refuse_unstorable_text(payload)
    return payload


def _refuse_unstorable_text(payload: object) -> None:
    """A 400 for text nothing downstream can keep: NUL (Postgres text refuses it, so the
    event would end in the dead-letter topic) and lone surrogates (not encodable as
    UTF-8, so the event could not be produced at all). Valid JSON can carry both as
    ``\\u`` escapes; refused here, nothing is lost later."""
    stack = [payload]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str) and not item.isascii():
            try:
                item.encode()
            except UnicodeEncodeError:
                raise APIError(
                    400,
                    "The request contains a lone UTF-16 surrogate (an unpaired \\ud800-"
                    "\\udfff escape); send valid Unicode text.",
                    code="invalid_text",
                ) from None
        if isinstance(item, str) and "\x00" in item:
            raise APIError(
                400, "The request contains a NUL character (\\u0000).", code="invalid_text"
            )


def parse_body(model: type[ModelT], payload: object, endpoint: Endpoint | None = None) -> ModelT:
    """Validate a JSON body against ``model``; ``endpoint`` names the parity table whose
    reasons a refused field's message quotes."""
    if not isinstance(payload, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(payload)
    except ValidationError as e:
        raise validation_error(e, endpoint) from None


def too_large(max_bytes: int) -> APIError:
    return APIError(
        413, f"The request body exceeds the limit of {max_bytes} bytes.", code="request_too_large"
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        response = APIError(exc.status_code, str(exc.detail), type=kind).response()
        # Its headers too: a 405's Allow (RFC 9110 requires it) comes this way.
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return APIError(500, "Internal server error.", type="server_error").response()
