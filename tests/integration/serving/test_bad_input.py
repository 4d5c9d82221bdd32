"""Bad input never produces a 500 or a hang: a 4xx in the OpenAI error shape, naming
the problem. The table runs against the real serving process."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.fixtures.server import AUTH

pytestmark = pytest.mark.slow

OK_MESSAGES = [{"role": "user", "content": "hi"}]


def body(**fields) -> bytes:
    return json.dumps({"model": "alignloop", "messages": OK_MESSAGES, **fields}).encode()


CASES = [
    # (case id, raw body, expected status, words the message must contain, param)
    ("invalid json", b'{"model": "alignloop", "messages": [', 400, "not valid JSON", None),
    ("empty body", b"", 400, "empty", None),
    ("not an object", b"[1, 2]", 400, "JSON object", None),
    ("missing messages", json.dumps({"model": "alignloop"}).encode(), 400, "messages", "messages"),
    ("empty messages", body(messages=[]), 400, "messages", "messages"),
    ("messages not a list", body(messages="hi"), 400, "messages", "messages"),
    (
        "unknown role",
        body(messages=[{"role": "wizard", "content": "hi"}]),
        400,
        "role",
        "messages[0].role",
    ),
    (
        "non-string content",
        body(messages=[{"role": "user", "content": 123}]),
        400,
        "content",
        "messages[0].content",
    ),
    (
        "image content part",
        body(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://x"}}],
                }
            ]
        ),
        400,
        "content",
        "messages[0].content",
    ),
    ("missing model", json.dumps({"messages": OK_MESSAGES}).encode(), 400, "model", "model"),
    ("unknown model", body(model="gpt-17"), 404, "gpt-17", "model"),
    ("max_tokens zero", body(max_tokens=0), 400, "max_tokens", "max_tokens"),
    ("max_tokens negative", body(max_tokens=-5), 400, "max_tokens", "max_tokens"),
    (
        "max_tokens beyond context",
        body(max_tokens=100_000),
        400,
        "maximum context length",
        "max_tokens",
    ),
    (
        "max_completion_tokens beyond context",
        body(max_completion_tokens=100_000),
        400,
        "maximum context length",
        "max_completion_tokens",
    ),
    (
        "prompt longer than context",
        body(messages=[{"role": "user", "content": "capital " * 3000}]),
        400,
        "maximum context length",
        "messages",
    ),
    ("n zero", body(n=0), 400, "'n'", "n"),
    ("n too large", body(n=1000), 400, "n must be between", "n"),
    ("temperature out of range", body(temperature=7), 400, "temperature", "temperature"),
    ("top_p zero", body(top_p=0), 400, "top_p", "top_p"),
    ("too many stops", body(stop=["a", "b", "c", "d", "e"]), 400, "stop", "stop"),
    (
        "stream_options without stream",
        body(stream_options={"include_usage": True}),
        400,
        "stream_options",
        None,
    ),
    # The parity fields' bad values: each a 400 before the engine is called.
    ("empty stop", body(stop=""), 400, "must not be empty", "stop"),
    ("empty stop in a list", body(stop=["x", ""]), 400, "must not be empty", "stop"),
    ("seed beyond 64 bits", body(seed=2**64), 400, "seed", "seed"),
    ("seed a float", body(seed=1.5), 400, "seed", "seed"),
    (
        "presence_penalty out of range",
        body(presence_penalty=5),
        400,
        "presence_penalty",
        "presence_penalty",
    ),
    (
        "frequency_penalty out of range",
        body(frequency_penalty=-3),
        400,
        "frequency_penalty",
        "frequency_penalty",
    ),
    (
        "logit_bias key not a token id",
        body(logit_bias={"hello": 1}),
        400,
        "token ids",
        "logit_bias",
    ),
    (
        "logit_bias beyond 100",
        body(logit_bias={"5": 101}),
        400,
        "between -100 and 100",
        "logit_bias",
    ),
    (
        "logit_bias id outside the vocabulary",
        body(logit_bias={"99999999": 1}),
        400,
        "outside the vocabulary",
        "logit_bias",
    ),
    (
        "top_logprobs beyond 20",
        body(logprobs=True, top_logprobs=21),
        400,
        "top_logprobs",
        "top_logprobs",
    ),
    ("top_logprobs without logprobs", body(top_logprobs=2), 400, "requires logprobs", None),
    (
        "response_format unknown type",
        body(response_format={"type": "xml"}),
        400,
        "response_format",
        "response_format",
    ),
    (
        "json_schema without a schema",
        body(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
        400,
        "schema",
        "response_format.json_schema.schema",
    ),
    (
        "tool name with spaces",
        body(tools=[{"type": "function", "function": {"name": "a b"}}]),
        400,
        "name",
        "tools[0].function.name",
    ),
    ("tool_choice unknown", body(tool_choice="always"), 400, "tool_choice", "tool_choice"),
    (
        "tool message without its call id",
        body(messages=[{"role": "tool", "content": "4"}]),
        400,
        "tool_call_id",
        "messages[0]",
    ),
    (
        "tool_calls on a user message",
        body(
            messages=[
                {
                    "role": "user",
                    "content": "x",
                    "tool_calls": [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        }
                    ],
                }
            ]
        ),
        400,
        "only assistant",
        "messages[0]",
    ),
    (
        "min_tokens beyond max_tokens",
        body(min_tokens=50, max_tokens=3),
        400,
        "min_tokens",
        "min_tokens",
    ),
    ("top_k below -1", body(top_k=-2), 400, "top_k", "top_k"),
    ("min_p above 1", body(min_p=2), 400, "min_p", "min_p"),
    (
        "repetition_penalty zero",
        body(repetition_penalty=0),
        400,
        "repetition_penalty",
        "repetition_penalty",
    ),
    ("modalities audio", body(modalities=["audio"]), 400, "modalities", "modalities[0]"),
    ("unsupported field", body(functions=[{"name": "f"}]), 400, "use `tools`", "functions"),
    (
        "5000-digit integer",
        b'{"model": "alignloop", "messages": [], "n": ' + b"9" * 5000 + b"}",
        400,
        "not valid JSON",
        None,
    ),
    (
        "deep nesting",
        b'{"model": "alignloop", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        400,
        "not valid JSON",
        None,
    ),
    # Text nothing downstream could store: refused, not lost later.
    ("NUL in content", body(messages=[{"role": "user", "content": "a\u0000b"}]), 400, "NUL", None),
    (
        "lone surrogate",
        b'{"model": "alignloop", "messages": [{"role": "user", "content": "\\ud800"}]}',
        400,
        "surrogate",
        None,
    ),
    (
        "oversized body",
        body(messages=[{"role": "user", "content": "x" * 2_000_000}]),
        413,
        "exceeds the limit",
        None,
    ),
]


@pytest.mark.parametrize(
    ("raw", "status", "words", "param"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_request_table(serving, raw, status, words, param):
    r = httpx.post(
        f"{serving.base_url}/v1/chat/completions",
        content=raw,
        headers={"content-type": "application/json", **AUTH},
        timeout=30,
    )
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert words.lower() in err["message"].lower(), err
    assert err["param"] == param
    assert err["type"] in ("invalid_request_error", "not_found")


def test_streaming_request_with_bad_input_is_rejected_before_streaming(serving):
    r = httpx.post(
        f"{serving.base_url}/v1/chat/completions",
        content=body(stream=True, max_tokens=100_000),
        headers={"content-type": "application/json", **AUTH},
        timeout=30,
    )
    assert r.status_code == 400
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/nothing-here", 404),
        ("GET", "/v1/chat/completions", 405),
    ],
)
def test_unknown_routes_answer_in_the_error_shape(serving, method, path, status):
    r = httpx.request(method, f"{serving.base_url}{path}", headers=AUTH, timeout=10)
    assert r.status_code == status
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    # Without a key every /v1 path is 401: which routes exist is not told to strangers.
    anonymous = httpx.request(method, f"{serving.base_url}{path}", timeout=10)
    assert anonymous.status_code == 401
    assert set(anonymous.json()["error"]) == {"message", "type", "param", "code"}


def test_server_still_serves_after_the_bad_inputs(serving):
    r = httpx.post(
        f"{serving.base_url}/v1/chat/completions",
        content=body(max_tokens=4),
        headers={"content-type": "application/json", **AUTH},
        timeout=60,
    )
    assert r.status_code == 200
