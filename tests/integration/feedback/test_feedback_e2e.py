"""Feedback end to end: HTTP API → Kafka → ingestor → Postgres, exactly once."""

from __future__ import annotations

import time
import uuid

import psycopg
import pytest

from feedback.ab_counters import policy_counts
from serving.response_ids import ResponseIdSigner
from tests.fixtures.ingestor import running_ingestor
from tests.fixtures.load import post_all
from tests.fixtures.server import AUTH, RESPONSE_ID_SECRET

pytestmark = pytest.mark.slow

N = 10_000


@pytest.fixture
def ingestor(serving, migrated_url):
    group_id = f"e2e-{uuid.uuid4().hex[:8]}"
    with running_ingestor(migrated_url, serving.broker.bootstrap, group_id=group_id) as ing:
        yield ing


def count_where(url: str, sql: str, *args) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, args).fetchone()[0]


def test_ten_thousand_ratings_become_ten_thousand_rows(serving, ingestor, migrated_url):
    signer = ResponseIdSigner(RESPONSE_ID_SECRET.encode())
    user = f"load-{uuid.uuid4().hex[:8]}"
    payloads = [
        {
            "response_id": signer.new_id("ops", user, 1),
            "rating": "up" if i % 3 else "down",
            "user": user,
        }
        for i in range(N)
    ]
    result = post_all(serving.base_url, "/v1/feedback", payloads, concurrency=32, headers=AUTH)
    assert result.statuses == {202: N}, result.statuses
    assert len(set(result.accepted_ids)) == N

    sql = "SELECT count(*) FROM feedback_events WHERE user_id = %s"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and count_where(migrated_url, sql, user) < N:
        time.sleep(1)
    time.sleep(2)  # anything beyond N would be a duplicate: give it a chance to show
    assert count_where(migrated_url, sql, user) == N
    assert (
        count_where(
            migrated_url,
            "SELECT count(DISTINCT feedback_id) FROM feedback_events WHERE user_id = %s",
            user,
        )
        == N
    )
    assert count_where(
        migrated_url,
        "SELECT count(*) FROM feedback_current WHERE user_id = %s AND rating = 'down'",
        user,
    ) == len(range(0, N, 3))


def test_rating_a_served_answer_counts_for_its_policy(serving, ingestor, migrated_url):
    import httpx

    r = httpx.post(
        f"{serving.base_url}/v1/chat/completions",
        timeout=60,
        json={
            "model": "alignloop",
            "messages": [{"role": "user", "content": "What is 4 plus 4?"}],
            "max_tokens": 8,
            "user": "counter-check",
        },
        headers=AUTH,
    )
    rid = r.json()["id"]
    for rating in ("up", "down"):  # re-rating: the latest wins
        f = httpx.post(
            f"{serving.base_url}/v1/feedback",
            timeout=30,
            json={"response_id": rid, "rating": rating, "user": "counter-check"},
            headers=AUTH,
        )
        assert f.status_code == 202
        time.sleep(0.05)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with psycopg.connect(migrated_url) as conn:
            current = conn.execute(
                "SELECT rating FROM feedback_current WHERE response_id = %s", (rid,)
            ).fetchall()
            history = conn.execute(
                "SELECT count(*) FROM feedback_events WHERE response_id = %s", (rid,)
            ).fetchone()[0]
            counts = policy_counts(conn, ["base"])["base"]
        if current == [("down",)] and history == 2 and counts.served >= 1:
            break
        time.sleep(0.5)
    assert current == [("down",)]
    assert history == 2
    assert counts.downs >= 1 and counts.rated >= 1
