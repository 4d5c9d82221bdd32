"""The latency guardrail compares like with like: during an adapter canary against the
bare base, serving answers the stable arm through a zero copy of the canary's adapter.

A real serving process (vLLM engine), a real registry and real interaction events: the
stable arm's answers stay exactly the base's, its requests pay the LoRA path like the
canary's, and the guardrail computed from the logged latencies no longer charges a
candidate for being an adapter. Measured on this machine, without the zero copy: see
docs/benchmarks.md ("like-for-like latency").
"""

from __future__ import annotations

import concurrent.futures
import re
from collections import defaultdict

import httpx
import numpy as np
import pytest

from deploy.canary.stats import STABLE, CanaryConfig, Health, guardrail_breaches
from deploy.policies import registry
from schemas import topics
from schemas.events import InteractionLogged
from tests.fixtures.adapters import make_adapter
from tests.fixtures.broker import consume_events
from tests.fixtures.replicas import routed_replicas
from tests.fixtures.server import AUTH

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of Veltoria?"}]


@pytest.fixture(scope="module")
def replica(demo_model_dir, tmp_path_factory, broker):
    work = tmp_path_factory.mktemp("like-for-like")
    # A small random adapter: it answers a little differently (and, greedily, at greater
    # length than the base; the latency test caps both arms at the same length).
    adapter = make_adapter(demo_model_dir, work / "v1", seed=1, scale=0.02)
    with routed_replicas(demo_model_dir, broker.bootstrap, work, n=1) as replicas:
        with replicas.db() as conn:
            registry.register_candidate(conn, "v1", str(adapter), actor="test")
            routing = registry.start_canary(conn, "v1", 0.5, actor="test", reason="test split")
        replicas.wait_generation(routing.generation)
        yield replicas


def _chat(
    client: httpx.Client, url: str, user: str, model: str = "alignloop", max_tokens: int = 24
) -> dict:
    r = client.post(
        f"{url}/v1/chat/completions",
        json={"model": model, "messages": QUESTION, "max_tokens": max_tokens, "temperature": 0,
              "user": user},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()


def test_the_stable_arm_runs_through_a_zero_adapter_and_answers_as_the_base(replica):
    url = replica.urls[0]
    with httpx.Client(timeout=120, headers=AUTH) as client:
        answers = {u: _chat(client, url, f"user-{u}") for u in range(12)}
        stable = [a for a in answers.values() if a["policy_version"] == "base"]
        canary = [a for a in answers.values() if a["policy_version"] == "v1"]
        assert stable and canary  # both arms populated
        pinned_base = _chat(client, url, "anyone", model="base")["choices"][0]["message"]
        metrics = client.get(f"{url}/metrics").text
    # The zero copy was loaded and used; the answers are exactly the base's (greedy).
    assert re.search(r'alignloop_adapter_loads_total\{.*version="v1@zero".*\} 1\.0', metrics)
    assert {a["choices"][0]["message"]["content"] for a in stable} == {pinned_base["content"]}
    # The canary is served through its own adapter, not the zero copy.
    assert re.search(r'alignloop_adapter_loads_total\{.*version="v1".*\} 1\.0', metrics)


def test_the_latency_guardrail_sees_no_adapter_overhead(replica):
    """Concurrent routed traffic from many users; the guardrail reads the latencies the
    interaction events carry (what the ingestor stores and the controller queries).

    Both arms answer the same number of tokens (the cap, below every greedy answer's
    length): the adapter's own answers are longer than the base's, and a canary that
    really answers at greater length is slower on purpose (the guardrail is meant to see
    that). Here the question is only whether the LoRA path itself is charged."""
    url = replica.urls[0]
    users = [f"load-{i}" for i in range(120)]
    with (
        httpx.Client(timeout=120, headers=AUTH) as client,
        concurrent.futures.ThreadPoolExecutor(8) as pool,
    ):
        answers = list(pool.map(lambda u: _chat(client, url, u, max_tokens=4), users * 2))
    ids = {a["id"] for a in answers}
    events = [
        e
        for e in consume_events(replica.bootstrap, topics.INTERACTIONS, expected=10_000, timeout=20)
        if isinstance(e, InteractionLogged) and e.response_id in ids
    ]
    assert len({e.response_id for e in events}) == len(ids)
    assert {e.completion_tokens for e in events} == {4}  # the same work on both arms
    per_token: dict[str, list[float]] = defaultdict(list)
    latency: dict[str, list[float]] = defaultdict(list)
    for e in events:
        latency[e.policy_version].append(e.latency_ms)
        per_token[e.policy_version].append(e.latency_ms / max(1, e.completion_tokens))
    health = Health(
        requests=(len(latency["base"]), len(latency["v1"])),
        errors_5xx=(0, 0),
        latency_p95_ms=(
            float(np.percentile(latency["base"], 95)),
            float(np.percentile(latency["v1"], 95)),
        ),
    )
    config = CanaryConfig(guardrail_min_requests=50)
    assert health.requests is not None and min(health.requests) >= 50, health
    assert guardrail_breaches(config, health) == [], (health, _medians(per_token))
    # The guardrail still has teeth: on the same request counts, a canary twice as slow as
    # the measured stable arm is rolled back. (Doubling the canary's own p95 is not enough:
    # on a loaded machine the stable arm's tail can be the slower one by more than 2x/1.5.)
    assert health.latency_p95_ms is not None
    slower = Health(
        requests=health.requests,
        errors_5xx=(0, 0),
        latency_p95_ms=(health.latency_p95_ms[STABLE], 2 * health.latency_p95_ms[STABLE]),
    )
    assert any("latency p95 ratio" in b for b in guardrail_breaches(config, slower))


def _medians(values: dict[str, list[float]]) -> dict[str, float]:
    return {k: float(np.median(v)) for k, v in values.items()}
