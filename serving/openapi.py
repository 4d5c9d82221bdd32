"""``/openapi.json`` of a serving replica: FastAPI's document of the routes it knows, with
the chat API described by `schemas.openapi` (request bodies, the feedback routes the
middleware serves, the bearer key, the error answers)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from schemas.openapi import add_chat_api, error_responses

DESCRIPTION = (
    "An OpenAI-compatible chat API whose answers can be rated (/v1/feedback, "
    "/v1/preferences) to train the model served. Every error is an OpenAI error object "
    '{"error": {"message", "type", "param", "code"}}. See docs/api.md.'
)


def install_openapi(app: FastAPI, model_name: str) -> None:
    """Make ``app.openapi()`` (served at ``/openapi.json``) the full document, built once;
    its examples name ``model_name`` (the served model)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(
                title=app.title,
                version=app.version,
                description=DESCRIPTION,
                routes=app.routes,
            )
            add_chat_api(doc, model_name)
            # Any operation may meet an unexpected fault: a 500 in the error shape
            # (`serving.errors`), never a page or a stack trace.
            for item in doc["paths"].values():
                for operation in item.values():
                    operation.setdefault("responses", {}).update(
                        {**error_responses((500,)), **operation.get("responses", {})}
                    )
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
