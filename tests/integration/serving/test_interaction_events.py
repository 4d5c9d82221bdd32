"""Every completion produces exactly one interaction event, even across a broker outage."""

from __future__ import annotations

import concurrent.futures
import time
from collections import Counter

import httpx
import pytest
from openai import OpenAI

from schemas import topics
from schemas.events import InteractionLogged
from tests.fixtures.events import wait_for_events
from tests.fixtures.server import AUTH

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "What colour is a lemon?"}]


def response_id_of(event) -> str:
    return event.response_id if isinstance(event, InteractionLogged) else ""


@pytest.fixture(scope="module")
def client(serving) -> OpenAI:
    return OpenAI(base_url=f"{serving.base_url}/v1", api_key=serving.api_key, max_retries=0)


def test_each_completion_yields_one_matching_event(serving, client):
    plain = [
        client.chat.completions.create(
            model="alignloop", messages=MESSAGES, max_tokens=12, user="u-plain", seed=s
        )
        for s in range(3)
    ]
    streamed = []
    for s in range(2):
        chunks = list(
            client.chat.completions.create(
                model="alignloop",
                messages=MESSAGES,
                max_tokens=12,
                stream=True,
                seed=s,
                stream_options={"include_usage": True},
            )
        )
        streamed.append(chunks)
    wanted = {r.id for r in plain} | {c[0].id for c in streamed}
    events = wait_for_events(
        serving.broker.bootstrap, topics.INTERACTIONS, response_id_of, wanted, timeout=60
    )
    counts = Counter(e.response_id for e in events)
    assert set(counts) == wanted and set(counts.values()) == {1}, counts

    by_id = {e.response_id: e for e in events}
    for r in plain:
        e = by_id[r.id]
        assert not e.stream and e.user == "u-plain" and e.policy_version == "base"
        assert e.choices[0].text == r.choices[0].message.content
        assert e.completion_tokens == r.usage.completion_tokens
        assert e.prompt_tokens == r.usage.prompt_tokens
        assert e.messages[0].content == MESSAGES[0]["content"]
        assert e.sampling.max_tokens == 12 and e.latency_ms > 0
    for chunks in streamed:
        e = by_id[chunks[0].id]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert e.stream and e.choices[0].text == text
        assert e.completion_tokens == chunks[-1].usage.completion_tokens
        assert e.ttft_ms is not None and 0 < e.ttft_ms <= e.latency_ms


def test_broker_outage_loses_nothing(serving):
    """Broker down: 50 requests are all answered; after it returns all 50 events arrive."""
    serving.broker.stop()
    try:

        def ask(i: int) -> str:
            r = httpx.post(
                f"{serving.base_url}/v1/chat/completions",
                timeout=120,
                json={
                    "model": "alignloop",
                    "messages": MESSAGES,
                    "max_tokens": 8,
                    "seed": i,
                    "user": f"outage-{i}",
                },
                headers=AUTH,
            )
            assert r.status_code == 200, r.text
            return r.json()["id"]

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            ids = set(pool.map(ask, range(50)))
        assert len(ids) == 50
        # While the broker is away the publisher says so, and holds the events on disk.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            health = httpx.get(f"{serving.base_url}/healthz").json()["events"]
            if health["spool_records"] > 0:
                break
            time.sleep(0.5)
        assert health["spool_records"] > 0, health
    finally:
        serving.broker.restart()

    events = wait_for_events(
        serving.broker.bootstrap, topics.INTERACTIONS, response_id_of, ids, timeout=120
    )
    counts = Counter(e.response_id for e in events)
    assert set(counts) == ids, f"missing {len(ids - set(counts))} events"
    assert set(counts.values()) == {1}, "duplicated events"
    assert len({e.event_id for e in events}) == 50
