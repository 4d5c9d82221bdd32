"""Per-principal rate limits and the bound on queued generations: who gets a 429, and when
to come back.

The contract (`RateLimit`, an ASGI middleware right inside `serving.auth.Authenticate`, so
the principal is known and nothing else has run):

* Every ``/v1`` request takes one token from its principal's **request bucket**:
  ``/v1/feedback`` and ``/v1/preferences`` from the feedback bucket
  (``feedback_rate_limit_rps``, ``feedback_rate_limit_burst``), every other ``/v1`` route
  from the chat bucket (``rate_limit_rps``, ``rate_limit_burst``). Ratings have a budget of
  their own, larger than chat's, so they stay cheap and chat traffic never uses it up. An
  empty bucket is **429**, type ``requests``, code ``rate_limit_exceeded``.
* A generation request (``/v1/chat/completions``, ``/v1/completions``) also needs its
  principal's **completion-token bucket** (``rate_limit_tokens_per_min``; it holds one
  minute's worth) above zero; else 429, type ``tokens``, code ``rate_limit_exceeded``.
  Tokens are charged when an answer ends (`Limits.charge`, from
  `serving.generation.Generation`): what was generated, streamed or not. A principal can so
  overdraw by what its requests already in flight generate; it then waits until the bucket
  is above zero again.
* A generation request beyond ``max_queued_generations`` held by this replica at once
  (waiting for the engine, generating or streaming; held from admission until its response
  ends) is 429, type ``requests``, code ``queue_full``, whoever asks.
* Every 429 carries ``Retry-After`` (whole seconds, at least 1: when the bucket that refused
  will allow the request again; 1 for a full queue), has the OpenAI error shape, is decided
  before the body is read, costs no engine time, publishes nothing, and is counted in
  ``alignloop_http_requests_total`` (status 429) and ``alignloop_rate_limited_total{reason}``.
  A refused request takes no token from any bucket.
* A setting of 0 turns its limit off. Limits are per replica: N replicas behind a load
  balancer let a principal have about N times as much. Buckets are made on a principal's
  first request and kept: one set per key name, as many as the key file has names.

Single-threaded by design: every check and take happens on the event loop with no ``await``
in between, so no lock is needed.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from schemas.errors import error_body
from schemas.settings import Settings
from serving import metrics
from serving.auth import ROUTE_SCOPES, principal_of

FEEDBACK_PATHS = frozenset({"/v1/feedback", "/v1/preferences"})
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


class TokenBucket:
    """``capacity`` tokens, refilled at ``rate`` a second; the level may go below zero
    (an overdraft, for tokens charged after the fact)."""

    __slots__ = ("capacity", "level", "rate", "stamp")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.level = capacity
        self.stamp = now

    def refill(self, now: float) -> float:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        return self.level

    def wait_s(self, needed: float, now: float) -> float:
        """Seconds until the level reaches ``needed`` (0: it has)."""
        level = self.refill(now)
        return 0.0 if level >= needed else (needed - level) / self.rate


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused, as the 429 says it."""

    reason: str  # requests | feedback | tokens | queue_full: the metric's label
    retry_after_s: float
    message: str

    @property
    def type(self) -> str:
        return "tokens" if self.reason == "tokens" else "requests"

    @property
    def code(self) -> str:
        return "queue_full" if self.reason == "queue_full" else "rate_limit_exceeded"

    def retry_after(self) -> str:
        return str(max(1, math.ceil(self.retry_after_s)))


class Limits:
    """The buckets of every principal and the count of generations held (see the module)."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.chat: dict[str, TokenBucket] = {}
        self.feedback: dict[str, TokenBucket] = {}
        self.tokens: dict[str, TokenBucket] = {}
        self.held = 0  # generation requests admitted and not yet answered

    def _bucket(
        self, buckets: dict[str, TokenBucket], name: str, rate: float, capacity: float
    ) -> TokenBucket | None:
        if rate <= 0:
            return None
        bucket = buckets.get(name)
        if bucket is None:
            bucket = buckets[name] = TokenBucket(rate, capacity, self.clock())
        return bucket

    def admit(self, principal: str, *, feedback: bool, generation: bool) -> Refusal | None:
        """Take what the request needs (a request token; a queue place for a generation),
        or say why not (and take nothing)."""
        s, now = self.settings, self.clock()
        if generation and s.max_queued_generations and self.held >= s.max_queued_generations:
            return Refusal(
                "queue_full",
                1.0,
                f"This replica already holds {self.held} generation requests "
                f"(max_queued_generations); retry shortly.",
            )
        if feedback:
            requests = self._bucket(
                self.feedback, principal, s.feedback_rate_limit_rps, s.feedback_rate_limit_burst
            )
            reason, rps = "feedback", s.feedback_rate_limit_rps
        else:
            requests = self._bucket(self.chat, principal, s.rate_limit_rps, s.rate_limit_burst)
            reason, rps = "requests", s.rate_limit_rps
        wait = requests.wait_s(1.0, now) if requests is not None else 0.0
        if wait > 0:
            return Refusal(
                reason,
                wait,
                f"Rate limit reached for the key '{principal}' on requests per second "
                f"({rps:g}/s on this replica); retry after the Retry-After header's seconds.",
            )
        if generation:
            tokens = self._token_bucket(principal)
            # Overdrawn: wait until the level is above zero (a hair above, so a whole token).
            wait = tokens.wait_s(min(1.0, tokens.capacity), now) if tokens is not None else 0.0
            if wait > 0:
                return Refusal(
                    "tokens",
                    wait,
                    f"Rate limit reached for the key '{principal}' on completion tokens per "
                    f"minute ({s.rate_limit_tokens_per_min} on this replica); retry after the "
                    "Retry-After header's seconds.",
                )
            self.held += 1
        if requests is not None:
            requests.level -= 1.0
        return None

    def _token_bucket(self, principal: str) -> TokenBucket | None:
        per_min = self.settings.rate_limit_tokens_per_min
        return self._bucket(self.tokens, principal, per_min / 60.0, float(per_min))

    def release(self) -> None:
        """A generation request admitted by `admit` has been answered (or abandoned)."""
        self.held -= 1

    def charge(self, principal: str, tokens: int) -> None:
        """``tokens`` completion tokens generated for ``principal``."""
        bucket = self._token_bucket(principal)
        if bucket is not None and tokens > 0:
            bucket.refill(self.clock())
            bucket.level -= tokens


class RateLimit:
    """ASGI middleware: `Limits.admit` for every ``/v1`` request, a 429 when refused; a
    generation request's queue place is given back when its response has ended."""

    def __init__(self, app: ASGIApp, *, limits: Limits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        route = path.rstrip("/")
        generation = route in GENERATION_PATHS
        refusal = self.limits.admit(
            principal_of(scope).name, feedback=route in FEEDBACK_PATHS, generation=generation
        )
        if refusal is not None:
            await _refuse(send, route, refusal)
            return
        if not generation:
            await self.app(scope, receive, send)
            return
        metrics.QUEUED_GENERATIONS.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            self.limits.release()
            metrics.QUEUED_GENERATIONS.dec()


async def _refuse(send: Send, route: str, refusal: Refusal) -> None:
    body = json.dumps(error_body(refusal.message, refusal.type, None, refusal.code)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", refusal.retry_after().encode()),
    ]
    await send({"type": "http.response.start", "status": 429, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    metrics.REQUESTS.labels(route if route in ROUTE_SCOPES else "unmatched", "429", "-").inc()
    metrics.RATE_LIMITED.labels(refusal.reason).inc()
