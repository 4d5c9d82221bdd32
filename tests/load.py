"""Concurrent HTTP load against the feedback API, shared by tests and benchmarks.

aiohttp rather than httpx: on two cores the client's own overhead matters, and aiohttp
sends several times more requests per CPU second.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    accepted_ids: list[str] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    seconds: float = 0.0

    @property
    def accepted(self) -> int:
        return len(self.accepted_ids)


async def _post_all(base_url: str, path: str, payloads: list[dict], concurrency: int) -> LoadResult:
    import aiohttp

    result = LoadResult()
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for p in payloads:
        queue.put_nowait(p)

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            payload = queue.get_nowait()
            try:
                async with session.post(f"{base_url}{path}", json=payload) as r:
                    body = await r.json(content_type=None)
                    result.statuses[r.status] = result.statuses.get(r.status, 0) + 1
                    if r.status == 202:
                        result.accepted_ids.append(body["id"])
            except (TimeoutError, aiohttp.ClientError):
                result.errors += 1

    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        result.seconds = time.perf_counter() - start
    return result


def post_all(base_url: str, path: str, payloads: list[dict], concurrency: int = 32) -> LoadResult:
    """POST every payload (each once), ``concurrency`` requests in flight."""
    return asyncio.run(_post_all(base_url, path, payloads, concurrency))
