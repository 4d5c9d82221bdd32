"""A connection's two ways of going wrong: a client too slow to send its request, and a
client that leaves before its answer.

**The receive deadline** (`http_protocol`). A client must send its whole request, headers
and body, within ``receive_deadline_s`` of opening the connection (its first request) or of
the first byte of a later one on the same connection. Otherwise it gets **408**
``request_timeout`` in the OpenAI error shape with ``Connection: close`` (when no answer has
begun) and the connection is closed; the application, if it was reading that body, sees the
client disconnect. So a slowloris client holds a connection, and a generation slot, for at
most that long. Idle keep-alive connections between requests are uvicorn's business
(``timeout_keep_alive``). This lives in uvicorn's HTTP protocol, not in an ASGI middleware:
the application is not called until the headers are complete, and a client trickling a
body after an early answer (a 401, a 429) is no longer the application's. It subclasses
uvicorn's protocol (httptools when installed, else h11), the one place uvicorn parses.
Counted in ``alignloop_receive_timeouts_total``.

**A client that leaves** (`unless_client_leaves`). A request whose body has been read runs
its work (waiting for the engine, collecting a whole answer) while the ASGI receive channel
is watched; when the client disconnects first, the work is cancelled, which aborts its
engine request, and `ClientGone` is raised. Streamed answers are watched by Starlette's
``StreamingResponse`` itself.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.types import Receive

from schemas.errors import error_body
from serving import metrics

T = TypeVar("T")


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


async def unless_client_leaves(receive: Receive, work: Coroutine[Any, Any, T]) -> T:
    """``work``'s result, or `ClientGone` once the client disconnects first (``work`` is
    cancelled and has unwound by then). Call only after the request body has been read
    whole: the watcher reads the receive channel until it says ``http.disconnect``."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # we are cancelled ourselves (shutdown)
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.wait((task,))
    if task.cancelled():
        raise ClientGone
    return task.result()  # done before the disconnect was seen: carry on as usual


async def _disconnected(receive: Receive) -> None:
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:  # a broken channel: nobody is there to answer either
        return


def _timeout_response(deadline_s: float) -> bytes:
    body = json.dumps(
        error_body(
            f"The request was not received whole within {deadline_s:g} seconds.",
            "invalid_request_error",
            None,
            "request_timeout",
        )
    ).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


class _ReceiveDeadline:
    """What both protocol subclasses share: one timer per connection, armed while a
    request is being received. Mixed in before uvicorn's protocol class."""

    receive_deadline_s = 30.0
    _receive_timer: asyncio.TimerHandle | None = None
    # Provided by uvicorn's protocol classes.
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    cycle: Any

    def _arm(self) -> None:
        if self._receive_timer is None:
            self._receive_timer = self.loop.call_later(
                self.receive_deadline_s, self._receive_timed_out
            )

    def _disarm(self) -> None:
        if self._receive_timer is not None:
            self._receive_timer.cancel()
            self._receive_timer = None

    def _receive_timed_out(self) -> None:
        self._receive_timer = None
        if self.transport.is_closing():
            return
        metrics.RECEIVE_TIMEOUTS.inc()
        cycle = self.cycle  # the request being received, or the last one answered
        if cycle is None or cycle.response_complete or not cycle.response_started:
            self.transport.write(_timeout_response(self.receive_deadline_s))
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # whatever the app answers goes nowhere
            cycle.message_event.set()  # and its receive() says http.disconnect
        self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]


def _httptools_protocol() -> type[asyncio.Protocol]:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HttpToolsWithDeadline(_ReceiveDeadline, HttpToolsProtocol):
        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

    return HttpToolsWithDeadline


def _h11_protocol() -> type[asyncio.Protocol]:
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class H11WithDeadline(_ReceiveDeadline, H11Protocol):
        def handle_events(self) -> None:
            super().handle_events()
            state = self.conn.their_state
            if state is h11.SEND_BODY or (state is h11.IDLE and self.conn.trailing_data[0]):
                self._arm()  # headers or a body under way
            elif state is not h11.IDLE:
                self._disarm()  # received whole (DONE), or the connection is ending

    return H11WithDeadline


def http_protocol(deadline_s: float, impl: str = "auto") -> type[asyncio.Protocol] | str:
    """uvicorn's ``http`` argument: its protocol with the receive deadline (``"auto"``
    unchanged when ``deadline_s`` is 0). ``impl``: ``auto`` (httptools when installed, as
    uvicorn picks), ``httptools`` or ``h11``."""
    if deadline_s <= 0:
        return "auto"
    if impl == "auto":
        try:
            import httptools  # noqa: F401
        except ImportError:
            impl = "h11"
        else:
            impl = "httptools"
    base = _httptools_protocol() if impl == "httptools" else _h11_protocol()
    return type(base.__name__, (base,), {"receive_deadline_s": deadline_s})
