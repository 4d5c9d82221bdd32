"""The feedback and preference endpoints against the real serving process."""

from __future__ import annotations

import json

import httpx
import pytest

from schemas import topics
from schemas.events import FeedbackSubmitted, PreferenceSubmitted
from tests.fixtures.events import wait_for_events
from tests.fixtures.server import AUTH, RESPONSE_ID_SECRET

pytestmark = pytest.mark.slow


def chat(serving, user: str | None = None) -> str:
    """A served answer's id (served to the `ops` test key, for ``user``)."""
    body = {
        "model": "alignloop",
        "messages": [{"role": "user", "content": "What is 2 plus 3?"}],
        "max_tokens": 8,
    }
    if user is not None:
        body["user"] = user
    r = httpx.post(f"{serving.base_url}/v1/chat/completions", timeout=60, json=body, headers=AUTH)
    assert r.status_code == 200
    return r.json()["id"]


def post(serving, path: str, payload, headers=None) -> httpx.Response:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return httpx.post(
        f"{serving.base_url}{path}",
        content=raw,
        timeout=30,
        headers={"content-type": "application/json", **AUTH, **(headers or {})},
    )


def feedback_id_of(event) -> str:
    if isinstance(event, FeedbackSubmitted):
        return str(event.feedback_id)
    if isinstance(event, PreferenceSubmitted):
        return str(event.preference_id)
    return ""


def test_thumbs_accepted_and_produced(serving):
    rid = chat(serving, "ann")
    r = post(
        serving,
        "/v1/feedback",
        {"response_id": rid, "rating": "up", "user": "ann", "comment": "good"},
    )
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["object"] == "feedback" and body["delivered_to"] in ("kafka", "spool")
    [event] = wait_for_events(
        serving.broker.bootstrap, topics.FEEDBACK, feedback_id_of, {body["id"]}, timeout=60
    )
    assert event.response_id == rid and event.rating == "up" and event.user == "ann"
    assert event.comment == "good" and event.principal == "ops"


def test_idempotency_key_returns_the_same_id(serving):
    rid = chat(serving)
    first = post(
        serving,
        "/v1/feedback",
        {"response_id": rid, "rating": "down"},
        headers={"Idempotency-Key": "retry-me-1"},
    )
    again = post(
        serving,
        "/v1/feedback",
        {"response_id": rid, "rating": "down"},
        headers={"Idempotency-Key": "retry-me-1"},
    )
    other = post(
        serving,
        "/v1/feedback",
        {"response_id": rid, "rating": "down", "idempotency_key": "retry-me-2"},
    )
    assert first.status_code == again.status_code == other.status_code == 202
    assert first.json()["id"] == again.json()["id"] != other.json()["id"]


def test_forged_response_id_is_404(serving):
    from serving.response_ids import ResponseIdSigner

    forged = ResponseIdSigner(b"not-the-server-secret-at-all").new_id("ops", None, 1)
    r = post(serving, "/v1/feedback", {"response_id": forged, "rating": "up"})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "response_not_found"
    # A real id of this server (signed with its secret) that was never served is accepted:
    # feedback can outrun its interaction event; the ingestor joins them later.
    unseen = ResponseIdSigner(RESPONSE_ID_SECRET.encode()).new_id("ops", None, 1)
    assert post(serving, "/v1/feedback", {"response_id": unseen, "rating": "up"}).status_code == 202


def test_preferences_by_ids_and_by_texts(serving):
    a, b = chat(serving, "ann"), chat(serving, "ann")
    by_ids = post(
        serving,
        "/v1/preferences",
        {"chosen_response_id": a, "rejected_response_id": b, "user": "ann"},
    )
    by_texts = post(
        serving,
        "/v1/preferences",
        {
            "messages": [{"role": "user", "content": "Capital of Fenwick?"}],
            "chosen": "Harlow.",
            "rejected": "Great question! The capital is surely Harlow!",
        },
    )
    assert by_ids.status_code == by_texts.status_code == 202
    events = wait_for_events(
        serving.broker.bootstrap,
        topics.FEEDBACK,
        feedback_id_of,
        {by_ids.json()["id"], by_texts.json()["id"]},
        timeout=60,
    )
    by_kind = {e.chosen_response_id is not None: e for e in events}
    assert by_kind[True].chosen_response_id == a and by_kind[True].rejected_response_id == b
    assert by_kind[False].chosen == "Harlow." and by_kind[False].messages[0].role == "user"


BAD = [
    ("unknown rating", "/v1/feedback", {"rating": "meh"}, 400, "rating"),
    ("empty response id", "/v1/feedback", {"response_id": ""}, 400, "response_id"),
    ("missing response id", "/v1/feedback", {"response_id": None}, 400, "response_id"),
    ("response id not a string", "/v1/feedback", {"response_id": 42}, 400, "response_id"),
    ("oversized comment", "/v1/feedback", {"comment": "x" * 5000}, 400, "comment"),
    ("comment wrong type", "/v1/feedback", {"comment": ["a"]}, 400, "comment"),
    ("choice index negative", "/v1/feedback", {"choice_index": -1}, 400, "choice_index"),
    ("unknown field", "/v1/feedback", {"stars": 5}, 400, "stars"),
    ("same response twice", "/v1/preferences", {"same": True}, 400, "differ"),
    ("half of each form", "/v1/preferences", {"mixed": True}, 400, "either"),
]


@pytest.mark.parametrize(
    ("path", "change", "status", "words"), [c[1:] for c in BAD], ids=[c[0] for c in BAD]
)
def test_bad_feedback_input(serving, path, change, status, words):
    rid = chat(serving) if path == "/v1/feedback" or change.get("same") else None
    if path == "/v1/feedback":
        payload = {"response_id": rid, "rating": "up", **change}
        payload = {k: v for k, v in payload.items() if v is not None}
    elif change.get("same"):
        payload = {"chosen_response_id": rid, "rejected_response_id": rid}
    else:
        payload = {"chosen_response_id": "x", "chosen": "a", "rejected": "b"}
    r = post(serving, path, payload)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert words in err["message"], err


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[]", b'"up"'])
def test_malformed_json_feedback(serving, raw):
    r = post(serving, "/v1/feedback", raw)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_json"


def test_feedback_routes_keep_the_http_contract(serving):
    """The feedback routes answer ahead of FastAPI: the same error shapes, body limit and
    request counting as every other route."""
    r = httpx.get(f"{serving.base_url}/v1/feedback", timeout=10, headers=AUTH)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}

    oversized = json.dumps({"response_id": "x", "rating": "up", "comment": "x" * 2_000_000})
    r = post(serving, "/v1/feedback", oversized.encode())
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: counted as it arrives
        for _ in range(40):
            yield b"x" * 65_536

    r = httpx.post(
        f"{serving.base_url}/v1/preferences", content=chunked(), timeout=30, headers=AUTH
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    rid = chat(serving)
    assert post(serving, "/v1/feedback", {"response_id": rid, "rating": "up"}).status_code == 202
    text = httpx.get(f"{serving.base_url}/metrics", timeout=10).text
    for status in ("202", "405", "413"):
        assert (
            f'alignloop_http_requests_total{{policy_version="-",route="/v1/feedback"'
            f',status="{status}"}}' in text
        ), status


@pytest.mark.parametrize("text", ["a\u0000b", "\ud800"])
def test_unstorable_text_is_refused_before_it_is_accepted(serving, text):
    """A comment no downstream store could keep is a 400, never a 202 that is lost later."""
    rid = "chatcmpl-" + "0" * 40
    raw = json.dumps({"response_id": rid, "rating": "up", "comment": text}).encode()
    r = httpx.post(
        f"{serving.base_url}/v1/feedback",
        content=raw,
        headers={"content-type": "application/json", **AUTH},
        timeout=30,
    )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_text"


def test_a_non_ascii_id_of_the_right_length_is_404(serving):
    r = post(serving, "/v1/feedback", {"response_id": "chatcmpl-" + "é" * 40, "rating": "up"})
    assert r.status_code == 404


def test_a_preference_too_large_for_the_event_bus_is_413_and_later_ones_pass(serving):
    """Under the body limit (1 MB) but over the event limit (900 kB): refused, not retried
    as an outage, and the next rating goes through."""
    huge = {
        "messages": [{"role": "user", "content": "x" * 30_000}] * 30,
        "chosen": "a",
        "rejected": "b",
    }
    r = post(serving, "/v1/preferences", huge)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "request_too_large"
    ok = post(serving, "/v1/feedback", {"response_id": chat(serving), "rating": "up"})
    assert ok.status_code == 202 and ok.json()["delivered_to"] == "kafka", ok.text
