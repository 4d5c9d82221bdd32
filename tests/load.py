"""Concurrent HTTP load against the feedback API, shared by tests and benchmarks.

A minimal HTTP/1.1 keep-alive client on asyncio streams (uvloop when it is installed):
on two cores the load generator shares the CPU with the server it measures, and a general
client costs several times more per request than the request costs the server. aiohttp
spent about 150 us of CPU per request here; this client about a third of that. It speaks
just what the feedback API needs: POST a JSON body, read a response with Content-Length.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class LoadResult:
    accepted_ids: list[str] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    seconds: float = 0.0

    @property
    def accepted(self) -> int:
        return len(self.accepted_ids)


class _BadResponse(Exception):
    pass


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, keep-alive) of one response that carries a Content-Length."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise _BadResponse(lines[0])
    length = None
    keep_alive = True
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            keep_alive = value.strip().lower() != b"close"
    if length is None:
        raise _BadResponse(b"no content-length")
    return int(parts[1]), await reader.readexactly(length), keep_alive


async def _post_all(base_url: str, path: str, payloads: list[dict], concurrency: int) -> LoadResult:
    url = urlsplit(base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
        "Content-Type: application/json\r\nContent-Length: "
    ).encode()
    result = LoadResult()
    bodies = iter([json.dumps(p).encode() for p in payloads])

    async def worker() -> None:
        reader = writer = None
        for body in bodies:
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                writer.write(b"%s%d\r\n\r\n%s" % (head, len(body), body))
                async with asyncio.timeout(60):
                    status, content, keep_alive = await _read_response(reader)
                result.statuses[status] = result.statuses.get(status, 0) + 1
                if status == 202:
                    result.accepted_ids.append(json.loads(content)["id"])
                if not keep_alive:
                    writer.close()
                    reader = writer = None
            except (OSError, TimeoutError, asyncio.IncompleteReadError, _BadResponse, ValueError):
                result.errors += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.seconds = time.perf_counter() - start
    return result


def post_all(base_url: str, path: str, payloads: list[dict], concurrency: int = 32) -> LoadResult:
    """POST every payload (each once), ``concurrency`` requests in flight."""
    coro = _post_all(base_url, path, payloads, concurrency)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
