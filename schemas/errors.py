"""The OpenAI error object: every 4xx/5xx of the HTTP API has this shape."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class ErrorDetail(BaseModel):
    # Every field is always sent (null when it does not apply): the published schema
    # (`schemas.openapi`) says so, and the fuzz tests hold the server to it.
    model_config = ConfigDict(json_schema_serialization_defaults_required=True)

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_body(
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    return ErrorResponse(
        error=ErrorDetail(message=message, type=type, param=param, code=code)
    ).model_dump()
