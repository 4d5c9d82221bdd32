"""Bounded everything, against a real serving process started for this module with small
limits (one vLLM start for every test here): per-principal request and token rate limits,
the bound on queued generations, the receive deadline, and a client that leaves.

Each test uses principals of its own (keys added to the test key file), so one test's spent
budget never decides another's outcome.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from schemas import topics
from schemas.events import InteractionLogged, RequestFailed
from serving.api_keys import add_key
from tests.fixtures.broker import consume_events
from tests.fixtures.events import wait_for_events
from tests.fixtures.polling import wait_until
from tests.fixtures.server import (
    ServingProcess,
    free_port,
    start_serving,
    wait_healthy,
    write_test_keys,
)

pytestmark = pytest.mark.slow

RPS, BURST = 0.5, 6
FEEDBACK_BURST = 8
TOKENS_PER_MIN = 120
DEADLINE_S = 2.0
LIMIT_ENV = {
    "ALIGNLOOP_RATE_LIMIT_RPS": str(RPS),
    "ALIGNLOOP_RATE_LIMIT_BURST": str(BURST),
    "ALIGNLOOP_RATE_LIMIT_TOKENS_PER_MIN": str(TOKENS_PER_MIN),
    "ALIGNLOOP_FEEDBACK_RATE_LIMIT_RPS": str(RPS),
    "ALIGNLOOP_FEEDBACK_RATE_LIMIT_BURST": str(FEEDBACK_BURST),
    "ALIGNLOOP_MAX_QUEUED_GENERATIONS": "2",
    "ALIGNLOOP_RECEIVE_DEADLINE_S": str(DEADLINE_S),
    "ALIGNLOOP_MAX_N": "32",  # for LONG
}
PRINCIPALS = ("flood", "bystander", "tokens", "queue", "leaver", "slow")
KEYS = {name: f"al-test-limits-{name}-key-{'0' * 24}" for name in PRINCIPALS}
QUESTION = [{"role": "user", "content": "What is the capital of Fenwick?"}]
# An answer that takes many seconds (4 s with n=8 on 2 CPU cores; n=32 several times that),
# so a test can tell an aborted generation from one that ran to its end.
LONG = {"max_tokens": 440, "n": 32, "ignore_eos": True}


@pytest.fixture(scope="module")
def limited(demo_model_dir: Path, broker, tmp_path_factory) -> Iterator[ServingProcess]:
    state_dir = tmp_path_factory.mktemp("limited")
    keys_file = write_test_keys(state_dir)
    for name, key in KEYS.items():
        add_key(keys_file, name, key, ["chat", "feedback"])
    port = free_port()
    proc, log_path = start_serving(
        demo_model_dir, broker.bootstrap, state_dir, port, extra_env=LIMIT_ENV
    )
    server = ServingProcess(f"http://127.0.0.1:{port}", broker, proc, state_dir, log_path)
    try:
        if not wait_healthy(server.base_url, proc, timeout=300):
            pytest.fail(f"serving did not become healthy:\n{server.log_tail()}")
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except Exception:
            proc.kill()


def headers(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def chat(server: ServingProcess, name: str, **fields) -> httpx.Response:
    body = {"model": "alignloop", "messages": QUESTION, "max_tokens": 3, **fields}
    return httpx.post(
        f"{server.base_url}/v1/chat/completions", json=body, headers=headers(name), timeout=120
    )


def rate(server: ServingProcess, name: str) -> httpx.Response:
    """A rating of an answer nobody was served: 404, unless the rating budget is spent."""
    body = {"response_id": "chatcmpl-" + "0" * 40, "rating": "up"}
    return httpx.post(
        f"{server.base_url}/v1/feedback", json=body, headers=headers(name), timeout=30
    )


def metric(server: ServingProcess, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 if none)."""
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and labels.items() <= s.labels.items():
                total += s.value
    return total


def assert_429(r: httpx.Response, type_: str, code: str, retry_max: int) -> int:
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == (type_, code)
    retry_after = int(r.headers["retry-after"])
    assert 1 <= retry_after <= retry_max
    return retry_after


def send_raw(server: ServingProcess, name: str, body: dict) -> socket.socket:
    """A chat request sent whole on a socket of our own, so the test can walk away."""
    data = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        f"authorization: Bearer {KEYS[name]}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(data)}\r\n\r\n"
    ).encode()
    port = int(server.base_url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(head + data)
    return sock


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float | None]:
    """What the server sent, and after how long it closed (None: still open)."""
    sock.settimeout(0.1)
    started, data = time.monotonic(), b""
    while time.monotonic() - started < timeout:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return data, time.monotonic() - started
        if not chunk:
            return data, time.monotonic() - started
        data += chunk
    return data, None


def idle(server: ServingProcess) -> bool:
    return (
        metric(server, "alignloop_requests_in_flight") == 0
        and metric(server, "alignloop_queued_generations") == 0
    )


# --- rate limits ------------------------------------------------------------------------


def test_a_principal_past_its_request_rate_gets_429_and_others_do_not(limited) -> None:
    url = limited.base_url
    statuses = [
        httpx.get(f"{url}/v1/models", headers=headers("flood"), timeout=10).status_code
        for _ in range(BURST + 4)
    ]
    assert statuses[:BURST] == [200] * BURST and set(statuses[BURST:]) == {429}, statuses
    retry_after = assert_429(chat(limited, "flood"), "requests", "rate_limit_exceeded", 2)

    # Another key is not slowed down, and ratings have a budget of their own.
    assert (
        httpx.get(f"{url}/v1/models", headers=headers("bystander"), timeout=10).status_code == 200
    )
    assert chat(limited, "bystander").status_code == 200
    rated = [rate(limited, "flood").status_code for _ in range(FEEDBACK_BURST + 2)]
    assert rated[:FEEDBACK_BURST] == [404] * FEEDBACK_BURST and set(rated[FEEDBACK_BURST:]) == {
        429
    }, rated
    assert_429(rate(limited, "flood"), "requests", "rate_limit_exceeded", 2)

    time.sleep(retry_after + 0.2)  # what Retry-After promised
    assert httpx.get(f"{url}/v1/models", headers=headers("flood"), timeout=10).status_code == 200

    assert metric(limited, "alignloop_rate_limited_total", reason="requests") >= 5
    assert metric(limited, "alignloop_rate_limited_total", reason="feedback") >= 3
    assert metric(limited, "alignloop_http_requests_total", route="/v1/models", status="429") >= 4


def test_a_principal_past_its_token_budget_gets_429_tokens(limited) -> None:
    r = chat(limited, "tokens", max_tokens=200, ignore_eos=True)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 200
    # 200 charged against 120 a minute (2/s): about 41 s until the bucket holds a token.
    retry_after = assert_429(chat(limited, "tokens"), "tokens", "rate_limit_exceeded", 45)
    assert retry_after >= 30
    assert chat(limited, "bystander").status_code == 200
    assert (
        httpx.get(
            f"{limited.base_url}/v1/models", headers=headers("tokens"), timeout=10
        ).status_code
        == 200
    )  # only generations spend tokens


# --- the queued-generation bound ----------------------------------------------------------


def test_generations_beyond_the_queue_bound_get_429(limited) -> None:
    wait_until(lambda: idle(limited), 30, "an idle replica")
    socks = [send_raw(limited, "queue", {"model": "alignloop", "messages": QUESTION, **LONG})]
    socks.append(send_raw(limited, "queue", {"model": "alignloop", "messages": QUESTION, **LONG}))
    try:
        wait_until(
            lambda: metric(limited, "alignloop_queued_generations") == 2, 30, "two held generations"
        )
        assert_429(chat(limited, "bystander"), "requests", "queue_full", 1)
        assert rate(limited, "bystander").status_code == 404  # ratings are never queued
        assert metric(limited, "alignloop_queued_generations") == 2  # still generating
    finally:
        for s in socks:
            s.close()
    wait_until(lambda: idle(limited), 10, "the held generations to be given back")
    assert chat(limited, "bystander").status_code == 200
    assert metric(limited, "alignloop_rate_limited_total", reason="queue_full") >= 1


# --- a client that leaves ----------------------------------------------------------------------


def _request_failures(server: ServingProcess) -> int:
    events = consume_events(server.broker.bootstrap, topics.POLICY, expected=10**6, timeout=5)
    return sum(isinstance(e, RequestFailed) for e in events)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_client_that_leaves_aborts_its_generation(limited, stream: bool) -> None:
    wait_until(lambda: idle(limited), 30, "an idle replica")
    aborted = metric(limited, "alignloop_generations_aborted_total", stream=str(stream).lower())
    failures = _request_failures(limited)
    user = f"leaver-{uuid.uuid4().hex[:8]}"
    body = {"model": "alignloop", "messages": QUESTION, "user": user, "stream": stream, **LONG}
    sock = send_raw(limited, "leaver", body)
    wait_until(
        lambda: metric(limited, "alignloop_requests_in_flight") == 1, 30, "the generation to start"
    )
    if stream:  # the first chunk is out: the answer is under way when the client leaves
        sock.settimeout(30)
        received = b""
        while b"data: " not in received:
            received += sock.recv(65536)
    time.sleep(0.5)
    sock.close()
    left = time.monotonic()
    wait_until(lambda: idle(limited), 5, "in-flight back to 0 after the client left")
    assert time.monotonic() - left < 5  # the whole answer takes far longer (see LONG)
    assert (
        metric(limited, "alignloop_generations_aborted_total", stream=str(stream).lower())
        == aborted + 1
    )
    assert metric(limited, "alignloop_http_requests_total", status="500") == 0

    # A control answer's event arrives; the abandoned one has none, and no server fault.
    control = chat(limited, "bystander", user=f"{user}-control").json()["id"]
    events = wait_for_events(
        limited.broker.bootstrap,
        topics.INTERACTIONS,
        lambda e: e.response_id if isinstance(e, InteractionLogged) else "",
        {control},
        timeout=60,
    )
    assert [e.response_id for e in events] == [control]
    later = consume_events(limited.broker.bootstrap, topics.INTERACTIONS, expected=10**6, timeout=5)
    assert not [e for e in later if isinstance(e, InteractionLogged) and e.user == user]
    assert _request_failures(limited) == failures
    # The engine is free again: a short answer comes back promptly.
    started = time.monotonic()
    assert chat(limited, "bystander", max_tokens=8).status_code == 200
    assert time.monotonic() - started < 10


# --- the receive deadline ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "sent",
    [
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer "
        + KEYS["slow"].encode()
        + b"\r\ncontent-type: application/json\r\ncontent-length: 300\r\n\r\n"
        + b'{"model": "alignloop", "mess',
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\n",
    ],
    ids=["half-a-body", "half-the-headers"],
)
def test_a_slow_sender_gets_408_and_is_disconnected(limited, sent: bytes) -> None:
    timeouts = metric(limited, "alignloop_receive_timeouts_total")
    port = int(limited.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(sent)
        data, closed_after = read_until_closed(sock, DEADLINE_S + 5)
    assert closed_after is not None and closed_after < DEADLINE_S + 1.5, closed_after
    assert data.startswith(b"HTTP/1.1 408 ")
    body = json.loads(data.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "request_timeout"
    assert metric(limited, "alignloop_receive_timeouts_total") == timeouts + 1
    wait_until(lambda: idle(limited), 5, "the slow request's place given back")
    assert metric(limited, "alignloop_http_requests_total", status="500") == 0
    assert chat(limited, "bystander").status_code == 200
