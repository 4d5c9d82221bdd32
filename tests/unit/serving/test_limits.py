"""serving.limits: token buckets, what each request takes, and the 429 it gets otherwise."""

from __future__ import annotations

import asyncio
import json

import pytest

from schemas.settings import Settings
from serving.api_keys import Principal
from serving.limits import Limits, RateLimit, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limits(**overrides: object) -> tuple[Limits, Clock]:
    base = {
        "rate_limit_rps": 2.0,
        "rate_limit_burst": 3,
        "rate_limit_tokens_per_min": 600,
        "feedback_rate_limit_rps": 10.0,
        "feedback_rate_limit_burst": 5,
        "max_queued_generations": 4,
    }
    clock = Clock()
    return Limits(Settings(**{**base, **overrides}), clock), clock  # type: ignore[arg-type]


def test_bucket_refills_at_its_rate_up_to_its_capacity() -> None:
    b = TokenBucket(rate=2.0, capacity=3.0, now=0.0)
    b.level = 0.0
    assert b.wait_s(1.0, 0.0) == pytest.approx(0.5)
    assert b.wait_s(1.0, 0.25) == pytest.approx(0.25)
    assert b.refill(100.0) == 3.0  # never above capacity


def test_requests_past_the_burst_are_refused_until_the_bucket_refills() -> None:
    lim, clock = limits()
    assert [lim.admit("a", feedback=False, generation=False) for _ in range(3)] == [None] * 3
    refusal = lim.admit("a", feedback=False, generation=False)
    assert refusal is not None
    assert (refusal.reason, refusal.type, refusal.code) == (
        "requests",
        "requests",
        "rate_limit_exceeded",
    )
    assert refusal.retry_after_s == pytest.approx(0.5)
    assert refusal.retry_after() == "1"  # whole seconds, at least 1
    assert lim.admit("b", feedback=False, generation=False) is None  # others unaffected
    clock.now += 0.5
    assert lim.admit("a", feedback=False, generation=False) is None
    assert lim.admit("a", feedback=False, generation=False) is not None


def test_feedback_has_a_budget_of_its_own() -> None:
    lim, _ = limits()
    for _ in range(3):
        assert lim.admit("a", feedback=False, generation=False) is None
    assert lim.admit("a", feedback=False, generation=False) is not None  # chat spent
    assert [lim.admit("a", feedback=True, generation=False) for _ in range(5)] == [None] * 5
    refusal = lim.admit("a", feedback=True, generation=False)
    assert refusal is not None and refusal.reason == "feedback"
    assert refusal.retry_after_s == pytest.approx(0.1)


def test_an_overdrawn_token_budget_refuses_generations_not_other_routes() -> None:
    lim, clock = limits(rate_limit_burst=100)
    assert lim.admit("a", feedback=False, generation=True) is None
    lim.release()
    lim.charge("a", 900)  # 600 a minute = 10/s; the bucket is now at -300
    refusal = lim.admit("a", feedback=False, generation=True)
    assert refusal is not None
    assert (refusal.reason, refusal.type, refusal.code) == (
        "tokens",
        "tokens",
        "rate_limit_exceeded",
    )
    assert refusal.retry_after_s == pytest.approx(30.1)
    assert lim.admit("a", feedback=False, generation=False) is None  # /v1/models still fine
    assert lim.admit("b", feedback=False, generation=True) is None  # another key is not charged
    clock.now += 30.2
    assert lim.admit("a", feedback=False, generation=True) is None


def test_a_refusal_takes_nothing() -> None:
    lim, _ = limits(rate_limit_burst=2)
    lim.charge("a", 10_000)
    assert lim.admit("a", feedback=False, generation=True) is not None  # tokens
    assert lim.held == 0
    # Both request tokens are still there.
    assert lim.admit("a", feedback=False, generation=False) is None
    assert lim.admit("a", feedback=False, generation=False) is None
    assert lim.admit("a", feedback=False, generation=False) is not None


def test_queued_generations_are_bounded_for_everyone() -> None:
    lim, _ = limits(rate_limit_burst=100)
    for name in "abcd":
        assert lim.admit(name, feedback=False, generation=True) is None
    refusal = lim.admit("e", feedback=False, generation=True)
    assert refusal is not None
    assert (refusal.reason, refusal.code, refusal.retry_after()) == (
        "queue_full",
        "queue_full",
        "1",
    )
    assert lim.admit("e", feedback=True, generation=False) is None  # ratings are not queued
    lim.release()
    assert lim.admit("e", feedback=False, generation=True) is None


def test_zero_turns_each_limit_off() -> None:
    lim, _ = limits(
        rate_limit_rps=0,
        rate_limit_tokens_per_min=0,
        feedback_rate_limit_rps=0,
        max_queued_generations=0,
    )
    lim.charge("a", 10**9)
    for _ in range(1000):
        assert lim.admit("a", feedback=False, generation=True) is None
        assert lim.admit("a", feedback=True, generation=False) is None


def _call(middleware: RateLimit, path: str, principal: str = "a") -> tuple[int, dict, dict]:
    """One request through the middleware: (status, headers, JSON body or {})."""
    sent: list[dict] = []

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    middleware.app = app
    scope = {
        "type": "http",
        "path": path,
        "headers": [],
        "state": {"principal": Principal(principal, frozenset({"chat"}))},
    }
    asyncio.run(middleware(scope, receive, send))
    start, body = sent
    headers = {k.decode(): v.decode() for k, v in start.get("headers", [])}
    return start["status"], headers, json.loads(body["body"]) if body["body"] else {}


def test_the_middleware_answers_429_in_the_openai_shape_with_retry_after() -> None:
    lim, _ = limits(rate_limit_burst=1)
    mw = RateLimit(lambda *a: None, limits=lim)  # type: ignore[arg-type]
    assert _call(mw, "/v1/chat/completions")[0] == 200
    assert lim.held == 0  # given back once the response ended
    status, headers, body = _call(mw, "/v1/chat/completions")
    assert status == 429
    assert headers["retry-after"] == "1"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert "'a'" in body["error"]["message"]
    assert _call(mw, "/v1/chat/completions", principal="b")[0] == 200
    assert _call(mw, "/v1/feedback")[0] == 200  # its own budget
    assert _call(mw, "/healthz")[0] == 200  # outside /v1: never limited
