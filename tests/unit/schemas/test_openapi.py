"""The chat API's OpenAPI description (`schemas.openapi`): every public operation with the
schema of the model that validates it, the bearer key, the error object; a valid document."""

from __future__ import annotations

import jsonschema
import schemathesis

from schemas.chat import ChatCompletionRequest
from schemas.errors import ErrorResponse
from schemas.openapi import API_KEY_SCHEME, OPERATIONS, add_chat_api


def document() -> dict:
    return add_chat_api({"openapi": "3.1.0", "info": {"title": "t", "version": "1"}}, "served")


def resolve(doc: dict, ref: dict) -> dict:
    return doc["components"]["schemas"][ref["$ref"].rsplit("/", 1)[1]]


def test_every_operation_has_its_request_schema_key_and_errors():
    doc = document()
    for op in OPERATIONS:
        entry = doc["paths"][op.path][op.method]
        assert entry["security"] == [{API_KEY_SCHEME: []}]
        assert entry["x-alignloop-scope"] == op.scope
        for status in op.errors:
            schema = entry["responses"][str(status)]["content"]["application/json"]["schema"]
            assert resolve(doc, schema)["title"] == "ErrorResponse"
        if op.request is not None:
            body = entry["requestBody"]["content"]["application/json"]
            assert resolve(doc, body["schema"])["title"] == op.request.__name__
            # The example is a request the model accepts, naming the served model.
            example = body["examples"]["example"]["value"]
            op.request.model_validate(example)
            assert example.get("model", "served") == "served"
    assert doc["components"]["securitySchemes"][API_KEY_SCHEME]["scheme"] == "bearer"
    assert doc["paths"]["/v1/chat/completions"]["post"]["responses"]["429"]["headers"][
        "Retry-After"
    ]["required"]


def test_the_error_object_requires_all_four_fields():
    doc = document()
    detail = doc["components"]["schemas"]["ErrorDetail"]
    assert set(detail["required"]) == {"message", "type", "param", "code"}
    root = {"$ref": "#/components/schemas/ErrorResponse", "components": doc["components"]}
    body = ErrorResponse.model_validate({"error": {"message": "m", "type": "t"}}).model_dump()
    jsonschema.validate(body, root)  # as sent: param and code are null, not missing
    del body["error"]["code"]
    assert not jsonschema.Draft202012Validator(root).is_valid(body)


def test_the_document_is_valid_openapi_and_matches_the_validating_model():
    doc = document()
    schema = schemathesis.openapi.from_dict(doc)
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {(o.method, o.path) for o in operations} == {(op.method, op.path) for op in OPERATIONS}
    # The request schema is the model's own: a field the model refuses is not in it.
    properties = resolve(doc, {"$ref": "#/x/ChatCompletionRequest"})["properties"]
    assert set(properties) == {
        f.alias or name for name, f in ChatCompletionRequest.model_fields.items()
    }
