"""The served OpenAPI document, fuzzed against the real serving process (vLLM engine, broker).

schemathesis reads ``/openapi.json`` and sends, for every operation it describes, the
examples, the coverage cases (each boundary and each way a field can be wrong) and
generated bodies, valid and invalid; a seeded corpus of known-bad inputs is sent besides,
every run. Whatever arrives, the server must answer below 500 (the 503s of a sick replica,
spool full or policy unavailable, must not occur in a healthy run either), every 4xx is
the OpenAI error object ``{"error": {"message", "type", "param", "code"}}``, and each
answer has a status, content type, headers and body the document declares for it. Without
a key every ``/v1`` operation is a 401.

Deterministic (derandomised, fixed seed), so a CI failure names a body that reproduces.
Generation is kept cheap: generated cases ask for at most `MAX_TOKENS` tokens (the seeded
corpus is sent as written).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis import Case, GenerationMode

from tests.fixtures.openapi_fuzz import (
    DOCUMENTED,
    assert_error_shape,
    fuzz_config,
    header,
    run_every_operation,
)
from tests.fixtures.server import auth

pytestmark = pytest.mark.slow

FUZZ_AUTH = auth("fuzz")
MAX_TOKENS = 8


REQUESTS_PER_S = 45
"""Below the fuzz key's chat rate limit (`rate_limit_rps`, 50/s): no case is lost to a 429."""


@pytest.fixture(scope="module")
def keyed_api(serving) -> schemathesis.BaseSchema:
    config = fuzz_config(max_examples=12, phases=["examples", "coverage", "fuzzing"])
    config.projects.default.update(rate_limit=f"{REQUESTS_PER_S}/s")
    return schemathesis.openapi.from_url(f"{serving.base_url}/openapi.json", config=config)


@pytest.fixture(scope="module")
def anonymous_api(serving) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(
        f"{serving.base_url}/openapi.json",
        config=fuzz_config(max_examples=10, phases=["fuzzing"]),
    )


def cap_generation(case: Case) -> None:
    """Make a generated generation request cheap and worth sending (the engine is real): at
    most `MAX_TOKENS` completion tokens (a valid ``max_tokens`` above it is lowered, an
    absent one set), and a valid body names the served model (a random name would only
    ever be a 404). A refused value stays as drawn, so an invalid case stays invalid."""
    if case.operation.path not in ("/v1/chat/completions", "/v1/completions"):
        return
    if not isinstance(case.body, dict):
        return
    for name in ("max_tokens", "max_completion_tokens"):
        value = case.body.get(name)
        if type(value) is int and value > MAX_TOKENS:
            case.body[name] = MAX_TOKENS
    if case.body.get("max_tokens") is None and case.body.get("max_completion_tokens") is None:
        case.body["max_tokens"] = MAX_TOKENS
    if case.meta is not None and case.meta.generation.mode == GenerationMode.POSITIVE:
        case.body["model"] = "alignloop"


def test_every_operation_answers_as_documented(keyed_api) -> None:
    statuses: dict[str, Counter[int]] = defaultdict(Counter)

    def call(case: Case) -> None:
        cap_generation(case)
        response = case.call_and_validate(headers=FUZZ_AUTH)
        statuses[case.operation.label][response.status_code] += 1
        if response.status_code >= 400 and case.operation.path.startswith("/v1/"):
            assert_error_shape(response, case.as_curl_command(headers=FUZZ_AUTH))

    assert run_every_operation(keyed_api, call) == 8
    print({label: dict(counts) for label, counts in statuses.items()})
    assert not any(counts[429] for counts in statuses.values()), statuses
    # The run reached the engine and the event bus, and was refused too, on each route.
    for label, answered in (
        ("POST /v1/chat/completions", 200),
        ("POST /v1/completions", 200),
        ("POST /v1/preferences", 202),
    ):
        assert statuses[label][answered] > 0 and statuses[label][400] > 0, statuses[label]


def test_without_a_key_every_v1_operation_is_401(anonymous_api) -> None:
    def call(case: Case) -> None:
        # Whatever the body (and a random bearer value schemathesis may draw for the
        # declared scheme, dropped here): refused before anything is read.
        case.headers = {k: v for k, v in case.headers.items() if k.lower() != "authorization"}
        response = case.call()
        where = case.as_curl_command()
        assert response.status_code == 401, where
        assert header(response, "WWW-Authenticate").startswith("Bearer"), where
        assert_error_shape(response, where)
        assert json.loads(response.content)["error"]["code"] == "invalid_api_key", where

    v1 = anonymous_api.include(path_regex="^/v1/")
    assert run_every_operation(v1, call) == 5


# --- the seeded corpus: known-bad inputs sent every run, as written ---------------------------

CHAT, TEXT = "/v1/chat/completions", "/v1/completions"
FEEDBACK, PREFERENCES = "/v1/feedback", "/v1/preferences"
HI = [{"role": "user", "content": "hi"}]
SERVED = "{served}"  # replaced by the id of an answer served to the fuzz key (n=1)
MB = 1_000_001  # one byte past max_request_bytes' default


def chat(**fields: Any) -> bytes:
    return json.dumps({"model": "alignloop", "messages": HI, "max_tokens": 2, **fields}).encode()


def raw(prefix: str, middle: bytes, suffix: str = "}") -> bytes:
    return prefix.encode() + middle + suffix.encode()


# (case id, path, body, content type, status, error code)
CORPUS: list[tuple[str, str, bytes, str, int, str]] = [
    ("empty stop", CHAT, chat(stop=""), "application/json", 400, "invalid_value"),
    ("seed past int64", CHAT, chat(seed=2**63), "application/json", 400, "invalid_value"),
    ("seed below int64", CHAT, chat(seed=-(2**63) - 1), "application/json", 400, "invalid_value"),
    ("temperature -1", CHAT, chat(temperature=-1), "application/json", 400, "invalid_value"),
    ("top_p 0", CHAT, chat(top_p=0), "application/json", 400, "invalid_value"),
    # Numbers are strict, as documented: not a bool or a numeric string (once taken as 1.0).
    ("temperature true", CHAT, chat(temperature=True), "application/json", 400, "invalid_value"),
    ("presence_penalty false", CHAT, chat(presence_penalty=False), "application/json", 400,
     "invalid_value"),
    ("logit_bias as a string", CHAT, chat(logit_bias={"5": "1"}), "application/json", 400,
     "invalid_value"),
    ("n 0", CHAT, chat(n=0), "application/json", 400, "invalid_value"),
    ("n 129", CHAT, chat(n=129), "application/json", 400, "invalid_value"),
    ("max_tokens 10**30", CHAT, chat(max_tokens=10**30), "application/json", 400,
     "context_length_exceeded"),
    ("1 MB stop string", CHAT, chat(stop="s" * MB), "application/json", 413, "request_too_large"),
    ("10,000-deep nesting", CHAT, raw('{"model": "alignloop", "messages": ',
     b"[" * 10_000 + b"]" * 10_000), "application/json", 400, "invalid_json"),
    ("5,000-digit integer", CHAT, raw('{"model": "alignloop", "messages": [], "seed": ',
     b"9" * 5000), "application/json", 400, "invalid_json"),
    ("NUL in content", CHAT, chat(messages=[{"role": "user", "content": "a\0b"}]),
     "application/json", 400, "invalid_text"),
    ("NUL in a key", CHAT, chat(metadata={"a\0": "b"}), "application/json", 400, "invalid_text"),
    ("lone surrogate", CHAT, raw('{"model": "alignloop", "messages": [{"role": "user", '
     '"content": "', b"\\ud800", '"}]}'), "application/json", 400, "invalid_text"),
    ("empty body", CHAT, b"", "application/json", 400, "invalid_json"),
    ("form body", CHAT, b"model=alignloop&messages=hi", "application/x-www-form-urlencoded",
     415, "unsupported_media_type"),
    ("JSON declared as text", CHAT, chat(), "text/plain", 415, "unsupported_media_type"),
    ("multipart without a boundary", CHAT, chat(), "multipart/form-data", 415,
     "unsupported_media_type"),
    ("not an object", CHAT, b"[1, 2]", "application/json", 400, "invalid_json"),
    ("prompt list of two", TEXT, json.dumps({"model": "alignloop", "prompt": ["a", "b"]}).encode(),
     "application/json", 400, "invalid_value"),
    ("completions max_tokens 2**64", TEXT, json.dumps({"model": "alignloop", "prompt": "a",
     "max_tokens": 2**64}).encode(), "application/json", 400, "context_length_exceeded"),
    ("completions 10,000-deep nesting", TEXT, raw('{"model": "alignloop", "prompt": ',
     b"[" * 10_000 + b"]" * 10_000), "application/json", 400, "invalid_json"),
    ("non-ASCII id of the right length", FEEDBACK, json.dumps({"response_id": "chatcmpl-"
     + "é" * 40, "rating": "up"}).encode(), "application/json", 404, "response_not_found"),
    ("choice_index 127 on an n=1 answer", FEEDBACK, json.dumps({"response_id": SERVED,
     "rating": "up", "choice_index": 127}).encode(), "application/json", 400, "invalid_value"),
    ("unknown response id", FEEDBACK, json.dumps({"response_id": "chatcmpl-" + "0" * 40,
     "rating": "down"}).encode(), "application/json", 404, "response_not_found"),
    ("feedback empty body", FEEDBACK, b"", "application/json", 400, "invalid_json"),
    ("feedback 5,000-digit choice_index", FEEDBACK, raw('{"response_id": "x", "rating": "up", '
     '"choice_index": ', b"1" * 5000), "application/json", 400, "invalid_json"),
    ("feedback XML", FEEDBACK, b"<feedback/>", "application/xml", 415, "unsupported_media_type"),
    ("preference JSON declared as text", PREFERENCES, json.dumps({"messages": HI, "chosen": "a",
     "rejected": "b"}).encode(), "text/plain", 415, "unsupported_media_type"),
    ("1 MB text preference", PREFERENCES, json.dumps({"messages": HI, "chosen": "c" * MB,
     "rejected": "r"}).encode(), "application/json", 413, "request_too_large"),
    ("NUL in a preference", PREFERENCES, json.dumps({"messages": HI, "chosen": "a\0",
     "rejected": "b"}).encode(), "application/json", 400, "invalid_text"),
    ("preference 10,000-deep nesting", PREFERENCES, raw('{"messages": ',
     b"[" * 10_000 + b"]" * 10_000), "application/json", 400, "invalid_json"),
]  # fmt: skip


@pytest.fixture(scope="module")
def served_id(serving) -> str:
    """The id of an answer served to the fuzz key (n=1, no user)."""
    r = httpx.post(f"{serving.base_url}{CHAT}", content=chat(), headers=FUZZ_AUTH, timeout=120)
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


@pytest.mark.parametrize(
    ("path", "body", "content_type", "status", "code"),
    [c[1:] for c in CORPUS],
    ids=[c[0] for c in CORPUS],
)
def test_seeded_corpus(serving, keyed_api, served_id, path, body, content_type, status, code):
    body = body.replace(SERVED.encode(), served_id.encode())
    r = httpx.post(
        f"{serving.base_url}{path}",
        content=body,
        headers={"content-type": content_type, **FUZZ_AUTH},
        timeout=120,
    )
    assert r.status_code == status, r.text[:500]
    assert_error_shape(r, r.text[:500])
    assert r.json()["error"]["code"] == code, r.text[:500]
    # And as the document says: the status, content type, headers and schema declared.
    keyed_api[path]["POST"].Case().validate_response(r, checks=DOCUMENTED)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [("GET", CHAT, "POST"), ("PUT", FEEDBACK, "POST"), ("DELETE", "/v1/models", "GET")],
)
def test_a_method_not_allowed_is_405_with_allow(serving, method, path, allowed) -> None:
    # RFC 9110: a 405 lists the allowed methods (FastAPI's routes once lost the header).
    r = httpx.request(method, f"{serving.base_url}{path}", headers=FUZZ_AUTH, timeout=30)
    assert r.status_code == 405, r.text
    assert allowed in {m.strip() for m in r.headers["allow"].split(",")}
    assert_error_shape(r, r.text)
