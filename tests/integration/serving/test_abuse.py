"""Abuse of the trust boundary, end to end over HTTP, against one real stack started for
this module: a serving process (vLLM engine, per-key limits) routing a live canary from a
real registry, its own broker, and the real ingestor writing the same Postgres the canary
controller and the dataset builders read.

* client mistakes (``stop: ""`` by the hundred, bad seeds and sampling values), routed and
  pinned to the canary, are 400s that leave no ``RequestFailed`` behind, and the
  controller does not roll the canary back on them; real engine faults (the engine process
  killed under the server) from several keys do roll it back, those of one key alone do not;
* a key flooding votes through many user ids weighs at most its capped share in the
  canary's comparison and in the reward model's data; votes on someone else's answers,
  choices an answer does not have, and text preferences without ``annotate`` are refused
  and leave nothing behind;
* a chat flood at ten times the replica's queue bound is answered by 429s in the OpenAI
  shape (never a 5xx), the server's memory stays bounded, and every rating accepted
  meanwhile is stored once (their latency is a benchmark: benchmarks/saturation.py).

The engine-fault test kills the module's engine, so it runs last (tests run in file order).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import openai
import psycopg
import pytest
from kafka import KafkaConsumer, TopicPartition

from deploy.canary import data as canary_data
from deploy.canary.controller import CanaryController
from deploy.canary.decision import decide
from deploy.canary.stats import CanaryConfig
from deploy.local.broker import EmbeddedBroker
from deploy.policies import registry
from feedback.datasets import explicit_pairs, pointwise_labels, principal_keep, snapshot
from feedback.db import connect, connect_and_migrate
from schemas import topics
from schemas.events import RequestFailed
from serving.api_keys import add_key
from serving.response_ids import ResponseIdSigner
from tests.fixtures.adapters import make_adapter
from tests.fixtures.broker import consume_events, unique_topic
from tests.fixtures.ingestor import running_ingestor
from tests.fixtures.polling import wait_until
from tests.fixtures.postgres import create_database, drop_database
from tests.fixtures.saturation import flood, rss_kb
from tests.fixtures.server import (
    RESPONSE_ID_SECRET,
    TEST_KEYS,
    free_port,
    start_serving,
    wait_healthy,
    write_test_keys,
)
from trainer.reward.config import RewardConfig

pytestmark = pytest.mark.slow

QUEUE_BOUND = 4
# Per-key limits on (the flood below meets the queue bound first; the abuse tests stay
# within the burst, so a 429 never hides the status they check).
LIMIT_ENV = {
    "ALIGNLOOP_RATE_LIMIT_RPS": "20",
    "ALIGNLOOP_RATE_LIMIT_BURST": "400",
    "ALIGNLOOP_FEEDBACK_RATE_LIMIT_RPS": "200",
    "ALIGNLOOP_FEEDBACK_RATE_LIMIT_BURST": "2000",
    "ALIGNLOOP_MAX_QUEUED_GENERATIONS": str(QUEUE_BOUND),
}
SCOPES = {
    "abuser": ("chat", "feedback"),
    "honest-a": ("chat", "feedback"),
    "honest-b": ("chat", "feedback"),
    "pinner": ("chat", "feedback", "pin"),
    "rater": ("feedback",),
    **{f"flood-{i}": ("chat",) for i in range(4)},
}
KEYS = {name: f"al-test-abuse-{name}-key-{'0' * 24}" for name in SCOPES}
QUESTION = [{"role": "user", "content": "What is the capital of Fenwick?"}]
CANARY, STABLE = "v1", "base"
# A strict 5xx guardrail: with one failing key enough, any RequestFailed that a client
# mistake left behind would roll the canary back. Latency on a shared 2-core test machine
# is noise, so that guardrail is off here; time minimums off so no test sleeps.
STRICT = dataclasses.replace(
    CanaryConfig.demo(),
    guardrail_min_requests=1,
    guardrail_min_failing_principals=1,
    max_latency_p95_ratio=1e9,
    min_stage_duration_s=0,
    min_duration_s=0,
)


@dataclass
class Stack:
    base_url: str
    db_url: str
    bootstrap: str
    group_id: str
    proc: subprocess.Popen
    state_dir: Path

    def db(self) -> psycopg.Connection:
        return connect(self.db_url, autocommit=True)

    def count(self, sql: str, *args: object) -> int:
        with self.db() as conn:
            row = conn.execute(sql, args).fetchone()
        assert row is not None
        return int(row[0])


@pytest.fixture(scope="module")
def stack(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("abuse")
    db_url = create_database()
    broker = EmbeddedBroker(log_path=work / "broker.log")
    proc = None
    try:
        with connect_and_migrate(db_url):
            pass
        with connect(db_url, autocommit=True) as conn:
            adapter = make_adapter(demo_model_dir, work / CANARY, seed=1, scale=0.01)
            registry.register_candidate(conn, CANARY, str(adapter), actor="trainer")
            registry.start_canary(conn, CANARY, 0.5, actor="test", reason="abuse tests")
        broker.start()
        keys_file = write_test_keys(work / "serving")
        for name, scopes in SCOPES.items():
            add_key(keys_file, name, KEYS[name], scopes)
        port = free_port()
        env = {"ALIGNLOOP_DATABASE_URL": db_url, **LIMIT_ENV}
        proc, log_path = start_serving(
            demo_model_dir, broker.bootstrap, work / "serving", port, extra_env=env
        )
        group_id = unique_topic("abuse-ingest")
        # The ingestor joins its group while the engine starts.
        with running_ingestor(db_url, broker.bootstrap, group_id=group_id):
            url = f"http://127.0.0.1:{port}"
            if not wait_healthy(url, proc, timeout=300):
                pytest.fail(f"serving did not become healthy:\n{log_path.read_text()[-4000:]}")
            yield Stack(url, db_url, broker.bootstrap, group_id, proc, work)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        broker.stop()
        drop_database(db_url)


def headers(name: str) -> dict[str, str]:
    key = KEYS[name] if name in KEYS else TEST_KEYS[name][0]
    return {"Authorization": f"Bearer {key}"}


def chat(stack: Stack, name: str, user: str | None, **fields: object) -> httpx.Response:
    body = {"model": "alignloop", "messages": QUESTION, "max_tokens": 1, **fields}
    if user is not None:
        body["user"] = user
    return httpx.post(
        f"{stack.base_url}/v1/chat/completions", json=body, headers=headers(name), timeout=120
    )


def served(stack: Stack, name: str, users: list[str]) -> dict[str, tuple[str, str]]:
    """One answer per user to key ``name``, stored by the ingestor: user -> (response id,
    policy version). The version comes from the stored interaction: only a ``pin`` key is
    told its arm."""

    def one(user: str) -> tuple[str, str]:
        r = chat(stack, name, user)
        assert r.status_code == 200, r.text
        return user, r.json()["id"]

    # Below the queue bound: these answers must all be served, not refused.
    with ThreadPoolExecutor(QUEUE_BOUND - 1) as pool:
        ids = dict(pool.map(one, users))
    wait_ingested(stack, list(ids.values()))
    with stack.db() as conn:
        version = dict(
            conn.execute(
                "SELECT response_id, policy_version FROM interactions WHERE response_id = ANY(%s)",
                (list(ids.values()),),
            ).fetchall()
        )
    return {user: (rid, version[rid]) for user, rid in ids.items()}


def rate(stack: Stack, name: str, body: dict) -> httpx.Response:
    return httpx.post(f"{stack.base_url}/v1/feedback", json=body, headers=headers(name), timeout=30)


def drained(stack: Stack) -> bool:
    """The ingestor's group has committed every record the broker holds on the topics it
    reads (it commits only after the Postgres transaction): everything sent is stored."""
    consumer = KafkaConsumer(
        bootstrap_servers=stack.bootstrap, group_id=stack.group_id, enable_auto_commit=False
    )
    try:
        parts = [
            TopicPartition(topic, p)
            for topic in (topics.INTERACTIONS, topics.FEEDBACK, topics.POLICY)
            for p in consumer.partitions_for_topic(topic) or ()
        ]
        ends = consumer.end_offsets(parts)
        return all((consumer.committed(tp) or 0) >= ends[tp] for tp in parts)
    finally:
        consumer.close()


def stored(stack: Stack, response_ids: list[str]) -> int:
    return stack.count(
        "SELECT count(*) FROM interactions WHERE response_id = ANY(%s)", list(response_ids)
    )


def wait_ingested(stack: Stack, response_ids: list[str]) -> None:
    wait_until(lambda: stored(stack, response_ids) == len(response_ids), 60, "the interactions")
    wait_until(lambda: drained(stack), 60, "the ingestor to drain the broker")


def observe(stack: Stack, conn: psycopg.Connection, cap: float):
    routing = registry.routing_table(conn)
    assert routing.canary_version == CANARY and routing.canary_started_at is not None
    now = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]  # one row
    strata = registry.canary_strata(conn, CANARY, routing.canary_started_at)
    obs = canary_data.load_observations(
        conn, CANARY, STABLE, strata, now, settle_seconds=0, principal_cap=cap
    )
    return obs, routing, now


def assert_openai_400(r: httpx.Response, param: str | None) -> None:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error


# --- guardrail abuse ---------------------------------------------------------------------


def _schema(schema: dict[str, object]) -> dict[str, object]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


# Client mistakes, each a 400 naming the field (the same table as test_bad_input's, here
# sent in bulk while a canary is live).
MISTAKES: list[tuple[dict[str, object], str | None]] = [
    ({"stop": ""}, "stop"),
    ({"stop": ["x", ""]}, "stop"),
    ({"seed": 2**64}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"temperature": 7}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"presence_penalty": 5}, "presence_penalty"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"max_tokens": 100_000}, "max_tokens"),
    ({"min_tokens": 5, "max_tokens": 1}, "min_tokens"),
    ({"n": 2, "temperature": 0}, None),  # vLLM's own check: greedy sampling has one answer
    # Valid JSON Schemas the engine's grammar compiler refuses: the engine's refusal path.
    ({"response_format": _schema({"type": "string", "pattern": "(?<=a)b"})}, None),
    ({"response_format": _schema({"type": "integer", "minimum": 5, "maximum": 1})}, None),
]


def test_client_mistakes_never_count_against_the_canary(stack: Stack) -> None:
    # Real routed traffic, so the guardrail has canary requests to weigh failures against.
    good = served(stack, "honest-a", [f"guard-{i}" for i in range(12)])
    assert {v for _, v in good.values()} == {CANARY, STABLE}  # both arms served

    def send(job: tuple[str, str, dict[str, object]]) -> httpx.Response:
        name, model, fields = job
        return chat(stack, name, f"guard-{uuid.uuid4().hex[:8]}", model=model, **fields)

    jobs: list[tuple[str, str, dict[str, object]]] = [
        ("abuser", "alignloop", {"stop": ""})
    ] * 200  # routed: half would be canary users
    jobs += [("pinner", CANARY, {"stop": ""})] * 200  # pinned to the canary by name
    # Below the queue bound: the bound is checked before the body is read, so even a 400
    # holds a queue place until it is answered, and more of them at once than the bound
    # would be (rightly) 429s, not 400s.
    with ThreadPoolExecutor(QUEUE_BOUND - 1) as pool:
        answers = list(pool.map(send, jobs))
    # One at a time: the engine's own refusals hold their queue place longer still.
    answers += [
        send((who, m, f))
        for who, m in (("abuser", "alignloop"), ("pinner", CANARY))
        for f, _ in MISTAKES
    ]
    params = [p for _, p in MISTAKES]
    expected = ["stop"] * 400 + params + params
    for r, param in zip(answers, expected, strict=True):
        assert_openai_400(r, param)
    # The official client sees the same thing as a BadRequestError.
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=KEYS["pinner"], max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=CANARY, messages=QUESTION, stop="", max_tokens=1)  # type: ignore[arg-type]
    assert caught.value.status_code == 400

    wait_ingested(stack, [rid for rid, _ in good.values()])
    events = consume_events(stack.bootstrap, topics.POLICY, expected=10**6, timeout=5)
    assert not [e for e in events if isinstance(e, RequestFailed)]
    assert stack.count("SELECT count(*) FROM request_failures") == 0

    with stack.db() as conn:
        obs, routing, now = observe(stack, conn, STRICT.max_principal_vote_share)
        assert obs.health.errors_5xx == (0, 0)
        assert obs.health.requests is not None and min(obs.health.requests) >= 1
        decision = decide(STRICT, obs, 0, routing.canary_started_at, now)
        assert decision.action != "rollback" and decision.statistics["guardrail_breaches"] == []
        ticked = CanaryController(STRICT, settle_seconds=0).tick(conn)
        assert ticked is not None and ticked.action != "rollback", ticked
        assert registry.get(conn, CANARY).state == "canary"


# --- vote flooding -----------------------------------------------------------------------

N_FLOOD, N_HONEST = 80, 20


def _ratings(
    stack: Stack, name: str, answers: dict[str, tuple[str, str]], flood_: bool
) -> list[str]:
    """Each answer rated once by its own user; the flood likes every canary answer and
    dislikes every stable one, honest users like a third of each arm's answers."""
    ids = []
    for i, (user, (rid, version)) in enumerate(sorted(answers.items())):
        up = version == CANARY if flood_ else i % 3 == 0
        r = rate(stack, name, {"response_id": rid, "rating": "up" if up else "down", "user": user})
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    return ids


# Long on purpose: one story (serve, rate, refuse, ingest, then read what the canary and
# the reward data make of it), whose later checks need the earlier steps' ids.
def test_a_vote_flood_weighs_its_capped_share(stack: Stack) -> None:
    flood_answers = served(stack, "abuser", [f"bot-{i}" for i in range(N_FLOOD)])
    honest = {
        name: served(stack, name, [f"{name}-user-{i}" for i in range(N_HONEST)])
        for name in ("honest-a", "honest-b")
    }
    accepted = _ratings(stack, "abuser", flood_answers, flood_=True)
    for name, answers in honest.items():
        accepted += _ratings(stack, name, answers, flood_=False)

    # choice_index 0..127 on an n=1 answer: 0 is a (re-)rating, every other one a 400.
    user, (target, _) = sorted(flood_answers.items())[0]
    statuses = [
        rate(
            stack,
            "abuser",
            {"response_id": target, "rating": "up", "user": user, "choice_index": i},
        )
        for i in range(128)
    ]
    assert statuses[0].status_code == 202
    accepted.append(statuses[0].json()["id"])
    for r in statuses[1:]:
        assert_openai_400(r, "choice_index")

    # Rating someone else's answer: another key, or the same key as another end user.
    for name, body in [
        ("honest-a", {"response_id": target, "rating": "down", "user": user}),
        ("abuser", {"response_id": target, "rating": "down", "user": "bot-1"}),
        ("abuser", {"response_id": target, "rating": "down"}),
    ]:
        r = rate(stack, name, body)
        assert r.status_code == 404 and r.json()["error"]["code"] == "response_not_found", r.text

    # Text preferences without `annotate` are refused; a key with it (ops) is the control.
    with stack.db() as conn, snapshot(conn) as wm:
        pairs_before = sum(1 for _ in explicit_pairs(conn, wm))
    prefs_before = stack.count("SELECT count(*) FROM preferences")
    text_pref = {"messages": QUESTION, "chosen": "Fenwick City.", "rejected": "No idea."}
    for name in ("honest-a", "abuser", "pinner"):
        r = httpx.post(
            f"{stack.base_url}/v1/preferences", json=text_pref, headers=headers(name), timeout=30
        )
        assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope", r.text
    (a, _), (b, _) = list(flood_answers.values())[:2]
    r = httpx.post(
        f"{stack.base_url}/v1/preferences",
        json={"chosen_response_id": a, "rejected_response_id": b, "user": "bot-0"},
        headers=headers("honest-a"),
        timeout=30,
    )
    assert r.status_code == 404, r.text  # the abuser's answers, compared by another key
    control = httpx.post(
        f"{stack.base_url}/v1/preferences", json=text_pref, headers=headers("ops"), timeout=30
    )
    assert control.status_code == 202, control.text

    every = [rid for answers in (flood_answers, *honest.values()) for rid, _ in answers.values()]
    wait_ingested(stack, every)
    wait_until(
        lambda: (
            stack.count(
                "SELECT count(*) FROM feedback_events WHERE feedback_id = ANY(%s)", accepted
            )
            == len(accepted)
        ),
        60,
        "the accepted ratings",
    )
    # Nothing of the refused ratings was stored: the target has the abuser's votes only,
    # on choice 0 only; one text preference (the control) was added, and one pair.
    rows = _rows(
        stack, "SELECT principal, choice_index FROM feedback_events WHERE response_id = %s", target
    )
    assert Counter(rows) == {("abuser", 0): 2}
    assert stack.count("SELECT count(*) FROM feedback_events WHERE choice_index > 0") == 0
    assert stack.count("SELECT count(*) FROM preferences") == prefs_before + 1
    with stack.db() as conn, snapshot(conn) as wm:
        assert sum(1 for _ in explicit_pairs(conn, wm)) == pairs_before + 1

    # The canary's comparison: the honest keys' 40 votes at full weight; the flood's 80
    # weigh as much as a share of `cap` of the total allows (total = 40 / (1 - cap)).
    cap = CanaryConfig().max_principal_vote_share
    with stack.db() as conn:
        uncapped, _, _ = observe(stack, conn, 1.0)
        capped, _, _ = observe(stack, conn, cap)
    honest_votes = 2 * N_HONEST
    assert np.isclose(uncapped.votes.sum(), honest_votes + N_FLOOD)
    total = capped.votes.sum()
    assert np.isclose(total, honest_votes / (1 - cap))
    assert (total - honest_votes) / total <= cap + 1e-9
    assert N_FLOOD / (N_FLOOD + honest_votes) > cap  # uncapped, the flood was over it

    # The reward model's data: the flood keeps a seeded sample of its answers, about
    # `cap` of the thumbs data; the honest keys keep every answer.
    share = RewardConfig().max_principal_share
    with stack.db() as conn, snapshot(conn) as wm:
        keep = principal_keep(conn, wm, share)
        labels = list(pointwise_labels(conn, wm, principal_cap=share))
    expected_keep = share * (honest_votes / (1 - share)) / N_FLOOD
    assert keep.keys() == {"abuser"} and np.isclose(keep["abuser"], expected_keep)
    labelled = {label.response_id for label in labels}
    honest_ids = {rid for answers in honest.values() for rid, _ in answers.values()}
    assert honest_ids <= labelled
    kept = len(labelled & {rid for rid, _ in flood_answers.values()})
    # Binomial(80, keep = 0.5) around 40: four standard deviations either side.
    spread = 4 * (N_FLOOD * expected_keep * (1 - expected_keep)) ** 0.5
    assert abs(kept - N_FLOOD * expected_keep) <= spread, kept


def _rows(stack: Stack, sql: str, *args: object) -> list[tuple]:
    with stack.db() as conn:
        return conn.execute(sql, args).fetchall()


# --- saturation ------------------------------------------------------------------------------

RSS_BOUND_KB = 300 * 1024


def test_a_tenfold_chat_flood_gets_429s_and_ratings_are_all_stored(stack: Stack) -> None:
    before = rss_kb(stack.proc.pid)
    signer = ResponseIdSigner(RESPONSE_ID_SECRET.encode())
    flood_keys = [KEYS[f"flood-{i}"] for i in range(4)]
    result = flood(
        stack.base_url,
        pid=stack.proc.pid,
        chat_keys=flood_keys,
        threads_per_key=10 * QUEUE_BOUND // len(flood_keys),  # 40 in flight: 10x the bound
        requests_per_thread=4,
        rating_key=KEYS["rater"],
        rating_principal="rater",
        signer=signer,
    )
    after = rss_kb(stack.proc.pid)
    assert not result.chat_errors, result.chat_errors[:5]
    assert set(result.chat_statuses) <= {200, 429}, result.chat_statuses
    assert result.chat_statuses[429] > 0 and result.chat_statuses[200] > 0, result.chat_statuses
    assert set(result.chat_429_codes) <= {"queue_full", "rate_limit_exceeded"}
    assert not result.bad_429s, result.bad_429s[:5]
    assert max(result.rss_kb) - before < RSS_BOUND_KB, (before, max(result.rss_kb))
    assert after - before < RSS_BOUND_KB, (before, after)

    assert set(result.rating_statuses) == {202}, result.rating_statuses
    ids = result.accepted_rating_ids
    assert ids
    sql = "SELECT count(*) FROM feedback_events WHERE feedback_id = ANY(%s)"
    wait_until(lambda: stack.count(sql, ids) >= len(ids), 60, "the accepted ratings")
    wait_until(lambda: drained(stack), 60, "the ingestor to drain the broker")
    assert stack.count(sql, ids) == len(ids)  # once each: no duplicates
    assert stack.count(
        "SELECT count(DISTINCT feedback_id) FROM feedback_events WHERE feedback_id = ANY(%s)", ids
    ) == len(ids)


# --- real engine faults -------------------------------------------------------------------


def _engine_core_pids(pid: int) -> list[int]:
    """The serving process's children that run vLLM's engine core."""
    found = []
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = [int(c) for c in f.read().split()]
    for child in children:
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                cmdline = f.read()
        except FileNotFoundError:
            continue
        if b"EngineCore" in cmdline or b"spawn_main" in cmdline:
            found.append(child)
    return found


def test_real_engine_faults_from_several_keys_roll_the_canary_back(stack: Stack) -> None:
    """The contrast to the client mistakes: the engine process dies under the server, so
    every request fails for real. One key's failures alone do not roll the canary back
    (the production floor of failing principals, 3); four keys' do. Pinned requests fail
    too but report nothing (the caller chose the version)."""
    keys = ["honest-a", "honest-b", "product", "other"]
    arms = {name: served(stack, name, [f"fault-{name}-{i}" for i in range(6)]) for name in keys}
    canary_users = {
        name: [u for u, (_, v) in answers.items() if v == CANARY] for name, answers in arms.items()
    }
    assert all(canary_users.values()), canary_users
    wait_ingested(stack, [rid for a in arms.values() for rid, _ in a.values()])

    cores = _engine_core_pids(stack.proc.pid)
    assert cores, "no engine core process found"
    for core in cores:
        os.kill(core, signal.SIGKILL)
    wait_until(
        lambda: chat(stack, "pinner", "probe", model=CANARY).status_code == 500,
        60,
        "the engine to be dead",
    )
    # The replica says so: liveness fails, so an orchestrator restarts it.
    health = httpx.get(f"{stack.base_url}/healthz", timeout=10)
    assert health.status_code == 503 and health.json()["status"] == "engine_dead", health.text
    assert httpx.get(f"{stack.base_url}/readyz", timeout=10).status_code == 503

    config = dataclasses.replace(
        CanaryConfig(), guardrail_min_requests=1, max_latency_p95_ratio=1e9
    )
    assert config.guardrail_min_failing_principals == 3  # the production floor

    def fail(name: str) -> None:
        for user in canary_users[name]:
            r = chat(stack, name, user)
            assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text

    def failures() -> list[tuple]:
        return _rows(stack, "SELECT version, arm, principal FROM request_failures ORDER BY seq")

    fail("honest-a")
    wait_until(lambda: len(failures()) == len(canary_users["honest-a"]), 60, "one key's failures")
    with stack.db() as conn:
        obs, routing, now = observe(stack, conn, 1.0)
        assert obs.health.failing_principals == (0, 1)
        one_key = decide(config, obs, 0, routing.canary_started_at, now)
        assert one_key.statistics["guardrail_breaches"] == [], one_key

    for name in keys[1:]:
        fail(name)
    n_failed = sum(len(users) for users in canary_users.values())
    wait_until(lambda: len(failures()) == n_failed, 60, "every key's failures")
    wait_until(lambda: drained(stack), 60, "the ingestor to drain the broker")
    assert Counter((v, a) for v, a, _ in failures()) == {(CANARY, "canary"): n_failed}
    assert {p for _, _, p in failures()} == set(keys)  # the pinned probes reported nothing
    with stack.db() as conn:
        decision = CanaryController(config, settle_seconds=0).tick(conn)
        assert decision is not None and decision.action == "rollback", decision
        (breach,) = decision.statistics["guardrail_breaches"]
        assert breach.startswith("5xx rate") and breach.endswith("from 4 principals"), breach
        assert registry.get(conn, CANARY).state == "rolled_back"
    assert json.dumps(decision.statistics)  # the audit log's statistics stay JSON
