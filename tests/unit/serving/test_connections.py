"""serving.connections: the receive deadline (on both of uvicorn's HTTP parsers, against a
tiny app in a uvicorn of its own) and cancelling work when the client leaves."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from serving.connections import ClientGone, http_protocol, unless_client_leaves
from tests.fixtures.server import free_port

DEADLINE = 0.6
IMPLS = ["httptools", "h11"]


class App:
    """Reads the whole body, answers 200 with its length; remembers a disconnect."""

    def __init__(self) -> None:
        self.disconnects = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnects += 1
                return
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = str(size).encode()
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def serve(impl: str, deadline: float) -> Iterator[tuple[int, App]]:
    app = App()
    port = free_port()
    http = http_protocol(deadline, impl) if deadline else impl
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, http=http, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline_at = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline_at:
        time.sleep(0.02)
    try:
        yield port, app
    finally:
        server.should_exit = True
        thread.join(10)


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float | None]:
    """Everything the server sends, and when it closed (None: still open at ``timeout``)."""
    sock.settimeout(0.05)
    started = time.monotonic()
    data = b""
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


def request_head(length: int) -> bytes:
    return (
        b"POST /x HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(length).encode() + b"\r\n\r\n"
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_a_partial_body_gets_408_and_the_connection_closed(impl: str) -> None:
    with serve(impl, DEADLINE) as (port, app), socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(request_head(100) + b'{"a": ')
        data, closed_after = read_until_closed(s, 5)
        assert closed_after is not None and closed_after < DEADLINE + 1.0
        assert data.startswith(b"HTTP/1.1 408 ")
        assert b'"code": "request_timeout"' in data
        time.sleep(0.1)
        assert app.disconnects == 1  # the app reading the body saw the client go


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "sent", [b"", b"POST /x HTTP/1.1\r\nhost: t\r\n"], ids=["nothing", "half-head"]
)
def test_a_connection_that_never_finishes_its_headers_is_closed(impl: str, sent: bytes) -> None:
    with serve(impl, DEADLINE) as (port, _), socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(sent)
        data, closed_after = read_until_closed(s, 5)
        assert closed_after is not None and closed_after < DEADLINE + 1.0
        assert data.startswith(b"HTTP/1.1 408 ")


@pytest.mark.parametrize("impl", IMPLS)
def test_without_a_deadline_the_slow_client_stays(impl: str) -> None:
    """The control: uvicorn alone lets a half-sent request hold its connection."""
    with serve(impl, 0) as (port, _), socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(request_head(100) + b'{"a": ')
        _, closed_after = read_until_closed(s, DEADLINE + 1.5)
        assert closed_after is None


@pytest.mark.parametrize("impl", IMPLS)
def test_slow_but_in_time_and_later_requests_on_the_connection_are_served(impl: str) -> None:
    with serve(impl, DEADLINE) as (port, _), socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(request_head(4) + b"ab")
        time.sleep(DEADLINE / 2)
        s.sendall(b"cd")
        s.settimeout(5)
        assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
        # Idle for longer than the deadline between requests: keep-alive's business, not ours.
        time.sleep(DEADLINE + 0.5)
        s.sendall(request_head(2) + b"ok")
        assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
        # And the next request has a deadline of its own.
        s.sendall(request_head(10) + b"x")
        data, closed_after = read_until_closed(s, 5)
        assert closed_after is not None and data.startswith(b"HTTP/1.1 408 ")


def test_zero_leaves_uvicorn_as_it_is() -> None:
    assert http_protocol(0) == "auto"


# --- unless_client_leaves -------------------------------------------------------------


class Channel:
    """An ASGI receive channel that says http.disconnect once `leave` is called."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()

    async def receive(self) -> dict:
        await self.gone.wait()
        return {"type": "http.disconnect"}


def test_work_is_cancelled_when_the_client_leaves() -> None:
    unwound = []

    async def work() -> str:
        try:
            await asyncio.sleep(30)
        finally:
            unwound.append(True)
        return "answer"

    async def main() -> None:
        channel = Channel()
        asyncio.get_running_loop().call_later(0.05, channel.gone.set)
        started = time.monotonic()
        with pytest.raises(ClientGone):
            await unless_client_leaves(channel.receive, work())
        assert time.monotonic() - started < 1
        assert unwound == [True]  # cancelled and unwound before ClientGone

    asyncio.run(main())


def test_work_that_ends_first_gives_its_result_or_its_error() -> None:
    async def answer() -> str:
        await asyncio.sleep(0.01)
        return "answer"

    async def fail() -> str:
        raise ValueError("refused")

    async def main() -> None:
        channel = Channel()
        assert await unless_client_leaves(channel.receive, answer()) == "answer"
        with pytest.raises(ValueError, match="refused"):
            await unless_client_leaves(channel.receive, fail())

    asyncio.run(main())
