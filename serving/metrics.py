"""Prometheus metrics of the chat API (the event publisher keeps its own)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REQUESTS = Counter(
    "alignloop_http_requests_total",
    "HTTP requests answered, by route, status code and policy version ('-' if none).",
    ["route", "status", "policy_version"],
)
LATENCY = Histogram(
    "alignloop_request_latency_seconds",
    "Time from request arrival to the last byte of a chat completion.",
    ["policy_version", "stream"],
    buckets=_LATENCY_BUCKETS,
)
TTFT = Histogram(
    "alignloop_time_to_first_token_seconds",
    "Time from request arrival to the first generated token.",
    ["policy_version", "stream"],
    buckets=_LATENCY_BUCKETS,
)
COMPLETION_TOKENS = Counter(
    "alignloop_completion_tokens_total", "Tokens generated.", ["policy_version"]
)
PROMPT_TOKENS = Counter(
    "alignloop_prompt_tokens_total", "Prompt tokens processed.", ["policy_version"]
)
IN_FLIGHT = Gauge("alignloop_requests_in_flight", "Chat completions being generated now.")
QUEUED_GENERATIONS = Gauge(
    "alignloop_queued_generations",
    "Generation requests this replica holds (waiting, generating or streaming); bounded by "
    "max_queued_generations.",
)
RATE_LIMITED = Counter(
    "alignloop_rate_limited_total",
    "Requests refused with 429, by reason: requests, feedback, tokens, queue_full.",
    ["reason"],
)
ABORTED = Counter(
    "alignloop_generations_aborted_total",
    "Generations stopped because their client went away (no interaction event is logged).",
    ["stream"],
)
RECEIVE_TIMEOUTS = Counter(
    "alignloop_receive_timeouts_total",
    "Connections closed because the client did not send its whole request within "
    "receive_deadline_s.",
)
