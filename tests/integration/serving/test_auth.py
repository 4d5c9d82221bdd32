"""The trust boundary of the chat API, against the shared serving process: API keys and
their scopes, votes bound to the caller who was served, the canary arm hidden from keys
without ``pin``, principals on every event. (Keys: tests/fixtures/server.py, TEST_KEYS.)"""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from openai import OpenAI

from schemas import topics
from schemas.events import FeedbackSubmitted, InteractionLogged
from serving.api_keys import add_key, revoke_key
from serving.response_ids import ResponseIdSigner
from tests.fixtures.events import wait_for_events
from tests.fixtures.server import RESPONSE_ID_SECRET, auth

pytestmark = pytest.mark.slow

ASK = [{"role": "user", "content": "What is 2 plus 3?"}]


def chat(serving, key: str, user: str | None = None, **extra) -> httpx.Response:
    body = {"model": "alignloop", "messages": ASK, "max_tokens": 4, **extra}
    if user is not None:
        body["user"] = user
    return httpx.post(
        f"{serving.base_url}/v1/chat/completions", json=body, headers=auth(key), timeout=60
    )


def rate(serving, key: str, response_id: str, user: str | None = None, **extra):
    body = {"response_id": response_id, "rating": "up", **extra}
    if user is not None:
        body["user"] = user
    return httpx.post(f"{serving.base_url}/v1/feedback", json=body, headers=auth(key), timeout=30)


def test_no_key_or_a_wrong_key_is_401_in_the_openai_shape(serving):
    for headers in ({}, {"Authorization": "Bearer al-not-a-key-of-this-service-000000000"}):
        for path in ("/v1/chat/completions", "/v1/feedback", "/v1/models"):
            r = httpx.post(f"{serving.base_url}{path}", json={}, headers=headers, timeout=30)
            if path == "/v1/models":
                r = httpx.get(f"{serving.base_url}{path}", headers=headers, timeout=30)
            assert r.status_code == 401, (path, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    # The official client sees its own AuthenticationError.
    client = OpenAI(base_url=f"{serving.base_url}/v1", api_key="al-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="alignloop", messages=ASK, max_tokens=2)
    # Health and metrics stay open for orchestrators and Prometheus.
    assert httpx.get(f"{serving.base_url}/healthz", timeout=10).status_code == 200


def test_a_key_without_the_scope_is_403(serving):
    answer = chat(serving, "chat-only")
    assert answer.status_code == 200, answer.text
    r = rate(serving, "chat-only", answer.json()["id"])
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope"
    assert "feedback" in r.json()["error"]["message"]


def test_a_vote_belongs_to_the_key_and_user_that_were_served(serving):
    rid = chat(serving, "product", user="alice").json()["id"]
    # Another product's key, or the same key for another (or no) end user: unknown id.
    for key, user in (("other", "alice"), ("product", "mallory"), ("product", None)):
        r = rate(serving, key, rid, user)
        assert r.status_code == 404, (key, user, r.text)
        assert r.json()["error"]["code"] == "response_not_found"
    accepted = rate(serving, "product", rid, "alice")
    assert accepted.status_code == 202, accepted.text
    [event] = wait_for_events(
        serving.broker.bootstrap,
        topics.FEEDBACK,
        lambda e: str(e.feedback_id) if isinstance(e, FeedbackSubmitted) else "",
        {accepted.json()["id"]},
        timeout=60,
    )
    assert event.principal == "product" and event.user == "alice"
    [served] = wait_for_events(
        serving.broker.bootstrap,
        topics.INTERACTIONS,
        lambda e: e.response_id if isinstance(e, InteractionLogged) else "",
        {rid},
        timeout=60,
    )
    assert served.principal == "product"


def test_only_a_choice_the_answer_has_can_be_rated(serving):
    rid = chat(serving, "product", n=2).json()["id"]
    assert rate(serving, "product", rid, choice_index=1).status_code == 202
    for index in (2, 127):
        r = rate(serving, "product", rid, choice_index=index)
        assert r.status_code == 400 and r.json()["error"]["param"] == "choice_index", r.text


def test_an_answer_too_old_is_no_longer_rated(serving):
    old = time.time() - 31 * 86400  # the default limit is 30 days
    rid = ResponseIdSigner(RESPONSE_ID_SECRET.encode()).new_id("product", None, 1, now=old)
    r = rate(serving, "product", rid)
    assert r.status_code == 422 and r.json()["error"]["code"] == "response_expired"


def test_text_preferences_need_the_annotate_scope(serving):
    texts = {
        "messages": [{"role": "user", "content": "Capital of Fenwick?"}],
        "chosen": "Harlow.",
        "rejected": "Great question! Surely Harlow!",
    }
    url = f"{serving.base_url}/v1/preferences"
    refused = httpx.post(url, json=texts, headers=auth("product"), timeout=30)
    assert refused.status_code == 403 and refused.json()["error"]["param"] == "chosen"
    assert httpx.post(url, json=texts, headers=auth("ops"), timeout=30).status_code == 202
    # Comparing two answers it was served needs no more than feedback.
    a, b = (chat(serving, "product", user="u").json()["id"] for _ in range(2))
    pair = {"chosen_response_id": a, "rejected_response_id": b, "user": "u"}
    assert httpx.post(url, json=pair, headers=auth("product"), timeout=30).status_code == 202
    stolen = httpx.post(url, json=pair, headers=auth("other"), timeout=30)
    assert stolen.status_code == 404


def test_the_arm_is_hidden_without_pin(serving):
    hidden = chat(serving, "product", user="bob")
    assert hidden.status_code == 200
    assert hidden.json()["policy_version"] is None
    assert "x-alignloop-policy" not in hidden.headers
    shown = chat(serving, "ops", user="bob")
    assert shown.json()["policy_version"] == shown.headers["x-alignloop-policy"] == "base"
    # Naming a version is pinning; /v1/models lists versions only to pin keys.
    pinned = chat(serving, "product", model="base")
    assert pinned.status_code == 403 and pinned.json()["error"]["param"] == "model"
    assert chat(serving, "ops", model="base").status_code == 200
    models = httpx.get(f"{serving.base_url}/v1/models", headers=auth("product"), timeout=30)
    assert [m["id"] for m in models.json()["data"]] == ["alignloop"]
    everything = httpx.get(f"{serving.base_url}/v1/models", headers=auth("ops"), timeout=30)
    assert "base" in [m["id"] for m in everything.json()["data"]]


def test_idempotency_keys_are_per_principal(serving):
    ids = {}
    for key in ("product", "other"):
        rid = chat(serving, key).json()["id"]
        r = httpx.post(
            f"{serving.base_url}/v1/feedback",
            json={"response_id": rid, "rating": "down"},
            headers={**auth(key), "Idempotency-Key": "same-key-7"},
            timeout=30,
        )
        assert r.status_code == 202, r.text
        ids[key] = r.json()["id"]
    assert ids["product"] != ids["other"]


def test_a_new_key_works_and_a_revoked_one_stops_without_a_restart(serving):
    path = serving.state_dir / "secrets" / "api_keys.jsonl"
    key = "al-test-rotating-key-0000000000000000000004"
    add_key(path, "rotating", key, ["chat"])
    headers = {"Authorization": f"Bearer {key}"}

    def status() -> int:
        return httpx.get(f"{serving.base_url}/v1/models", headers=headers, timeout=30).status_code

    deadline = time.monotonic() + 10
    while status() != 200:
        assert time.monotonic() < deadline, "a new key was not picked up"
        time.sleep(0.2)
    revoke_key(path, "rotating")
    while status() != 401:
        assert time.monotonic() < deadline + 10, "a revoked key still works"
        time.sleep(0.2)
    assert chat(serving, "ops").status_code == 200
