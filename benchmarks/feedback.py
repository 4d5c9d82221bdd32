"""Feedback end to end: ratings of served answers, HTTP API → Kafka → ingestor → Postgres.

Starts a broker, an ingestor and two serving processes (as `alignloop up` would): one as
production runs it (API keys, rate limits at their defaults) and one open
(``insecure_no_auth``, every limit off), for the cost of keys and limits. Per round:

1. **answers first.** A few real chat completions through the chat API (``--chats``), and
   the bulk through serving's own event path: `serving.publisher.EventPublisher` publishes
   ``InteractionLogged`` events to the interactions topic, each with a response id signed
   by serving's secret for the principal and user who will rate it
   (`serving.response_ids`), its policy version chosen by serving's sticky routing
   (`serving.routing.choose_version` on a 50 % canary, `routing_key` identity); the round
   waits until the ingestor has stored them all;
2. **ratings** of those answers through ``POST /v1/feedback`` from ``--clients`` clients,
   each by the key and user that was served, with an idempotency key; 10 % re-rate an
   answer the same user rated before (flips), 2 % are client retries of an accepted rating
   (same idempotency key). On the keyed server the load is spread over ``--keys`` product
   keys (a product's share under the default 1,000 ratings/s per key);
3. **checks** once every accepted rating is stored: accepted = stored, rows per
   idempotency key, ``policy_stats`` equal to `feedback.ab_counters.recount_policy_counts`
   and to the counts the benchmark expects from what it sent, and lag from the API's event
   time to the ingest transaction's commit (``ingest_commits``, migration 0013).

Rounds: the measured run (keys on, ``--events``), then ``--cost-rounds`` pairs of smaller
rounds in the order off, on, on, off, … (the same work on each side), then a **kill** round:
the ingestor is SIGKILLed while ratings flow, the group's committed offsets are rewound by
``--rewind`` records per feedback partition (offset commits lost, as after a rebalance),
and a new ingestor redelivers them; the checks above then show whether anything was stored
or counted twice (``redelivered`` is what the new ingestor consumed and found stored).

    python -m benchmarks.feedback [--quick] [--events 30000] [--clients 64]

Prints one JSON object on stdout (keys described in docs/benchmarks.md, "Feedback end to
end"). Targets: events_per_s ≥ 3,000, lag_p99_s < 2, accepted = stored (the measured run).
Uses ALIGNLOOP_TEST_PG_ADMIN_URL (default postgres@127.0.0.1:5432) to create the database.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from deploy.local.broker import EmbeddedBroker, free_port
from feedback.ab_counters import policy_counts, recount_policy_counts
from feedback.db import connect_and_migrate
from schemas import topics
from schemas.events import InteractionLogged, LoggedChoice, LoggedMessage, SamplingRecord
from serving.api_keys import add_key
from serving.publisher import EventPublisher
from serving.response_ids import ResponseIdSigner
from serving.routing import RoutingTable, choose_version, routing_key
from tests.fixtures.load import post_all
from tests.fixtures.postgres import create_database, drop_database
from tests.fixtures.server import RESPONSE_ID_SECRET, ROUTING_SALT, start_serving, wait_healthy

GROUP = "alignloop-ingestor"  # the ingestor's default consumer group
CANARY = RoutingTable(
    generation=1, stable="base", canary="bench-canary", canary_weight=0.5,
    adapters={"base": None, "bench-canary": None},
)  # fmt: skip
OPEN_ENV = {  # the open server: no keys, every limit off
    "ALIGNLOOP_INSECURE_NO_AUTH": "true",
    "ALIGNLOOP_RATE_LIMIT_RPS": "0",
    "ALIGNLOOP_RATE_LIMIT_TOKENS_PER_MIN": "0",
    "ALIGNLOOP_FEEDBACK_RATE_LIMIT_RPS": "0",
    "ALIGNLOOP_MAX_QUEUED_GENERATIONS": "0",
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, round(q * (len(s) - 1)))], 4)


@dataclass(frozen=True)
class Answer:
    """An answer the service served: whom to, how many choices, under which policy."""

    principal: str
    user: str
    response_id: str
    n: int
    policy: str


@dataclass
class Side:
    """One serving process: its URL and the keys (principal -> bearer key) it accepts;
    the open server has the single principal ``anonymous`` and no key."""

    name: str
    url: str
    keys: dict[str, str | None]

    def headers(self, principal: str) -> dict[str, str]:
        key = self.keys[principal]
        return {} if key is None else {"Authorization": f"Bearer {key}"}


@dataclass
class Stack:
    """Broker, database, ingestor and the two serving sides."""

    work: Path
    db_url: str
    broker: EmbeddedBroker
    sides: dict[str, Side] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)
    ingestor: subprocess.Popen | None = None
    metrics_port: int = 0

    def start_ingestor(self) -> None:
        self.metrics_port = free_port()
        env = {
            **os.environ,
            "ALIGNLOOP_DATABASE_URL": self.db_url,
            "ALIGNLOOP_KAFKA_BOOTSTRAP": self.broker.bootstrap,
            "ALIGNLOOP_INGEST_METRICS_PORT": str(self.metrics_port),
        }
        with open(self.work / "ingestor.log", "ab") as out:
            self.ingestor = subprocess.Popen(
                [sys.executable, "-m", "deploy.cli", "ingest"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def ingest_metric(self, name: str, label: str) -> float:
        """A counter of the running ingestor's /metrics (summed over lines with ``label``)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + "{") and label in line
        )

    def stop(self) -> None:
        procs = [*self.procs, *([self.ingestor] if self.ingestor else [])]
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        self.broker.stop()
        drop_database(self.db_url)


def start_stack(model_dir: Path, n_keys: int) -> Stack:
    """Database, broker, ingestor, the keyed server (``n_keys`` product keys with chat and
    feedback scopes, limits at their defaults) and the open one."""
    work = Path(tempfile.mkdtemp(prefix="alignloop-bench-feedback-"))
    db_url = create_database()
    with connect_and_migrate(db_url):
        pass
    broker = EmbeddedBroker(log_path=work / "broker.log")
    broker.start()
    stack = Stack(work, db_url, broker)
    keys_file = work / "keyed" / "secrets" / "api_keys.jsonl"
    keys: dict[str, str | None] = {}
    for i in range(n_keys):
        keys[f"product-{i}"] = f"al-bench-product-key-{i:02d}-{uuid.uuid4().hex}"
        add_key(keys_file, f"product-{i}", keys[f"product-{i}"] or "", ("chat", "feedback"))
    open_keys: dict[str, str | None] = {"anonymous": None}
    for name, env, side_keys in (
        ("keyed", {"ALIGNLOOP_API_KEYS_FILE": str(keys_file)}, keys),
        ("open", OPEN_ENV, open_keys),
    ):
        port = free_port()
        proc, _ = start_serving(model_dir, broker.bootstrap, work / name, port, extra_env=env)
        stack.procs.append(proc)
        stack.sides[name] = Side(name, f"http://127.0.0.1:{port}", side_keys)
    stack.start_ingestor()
    return stack


def chat_answers(side: Side, count: int, tag: str) -> list[Answer]:
    """``count`` real chat completions (n = 1 or 2, 8 tokens) through the official client,
    8 at a time, each as one product user; what the service said it served."""
    import openai

    principals = list(side.keys)

    def one(i: int) -> Answer:
        principal, user, n = principals[i % len(principals)], f"{tag}-chat-{i}", 1 + i % 2
        client = openai.OpenAI(
            base_url=f"{side.url}/v1", api_key=side.keys[principal] or "none", max_retries=0
        )
        r = client.chat.completions.create(
            model="alignloop",
            messages=[{"role": "user", "content": f"Say something about {i}."}],
            max_tokens=8,
            n=n,
            user=user,
        )
        return Answer(principal, user, r.id, n, "base")  # serving without a database: base

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(count)))


def logged_answers(
    stack: Stack, side: Side, count: int, tag: str, rng: random.Random
) -> list[Answer]:
    """``count`` answers logged through serving's event path (module doc, step 1): users of
    heavy and light activity (log-normal), ids signed as serving signs them, the policy
    version from serving's sticky routing."""
    signer = ResponseIdSigner(RESPONSE_ID_SECRET.encode())
    principals = list(side.keys)
    users = max(count // 8, 1)
    weights = [rng.lognormvariate(0.0, 1.0) for _ in range(users)]
    publisher = EventPublisher(
        stack.broker.bootstrap, stack.work / f"spool-{tag}", 1 << 30, client_id=f"bench-{tag}"
    ).start()
    answers, futures = [], []
    try:
        for u in rng.choices(range(users), weights, k=count):
            principal, user = principals[u % len(principals)], f"{tag}-u{u}"
            n = 2 if rng.random() < 0.2 else 1
            policy = choose_version(CANARY, ROUTING_SALT, routing_key(principal, user))
            a = Answer(principal, user, signer.new_id(principal, user, n), n, policy)
            answers.append(a)
            futures.append(publisher.publish(topics.INTERACTIONS, _interaction(a)))
        for f in futures:
            f.result(timeout=120)
    finally:
        publisher.close()
    return answers


def _interaction(a: Answer) -> InteractionLogged:
    return InteractionLogged(
        producer="benchmarks.feedback",
        response_id=a.response_id,
        user=a.user,
        principal=a.principal,
        policy_version=a.policy,
        model="alignloop",
        messages=[LoggedMessage(role="user", content="Say something about feedback.")],
        choices=[
            LoggedChoice(index=i, text=f"answer {i}", finish_reason="length", completion_tokens=8)
            for i in range(a.n)
        ],
        prompt_tokens=12,
        completion_tokens=8 * a.n,
        latency_ms=100.0,
        ttft_ms=20.0,
        stream=False,
        sampling=SamplingRecord(temperature=1.0, top_p=1.0, max_tokens=8, n=a.n),
    )


def ratings(
    side: Side, answers: list[Answer], events: int, rng: random.Random, retries: float
) -> tuple[list[dict], list[dict[str, str]]]:
    """``events`` ratings of ``answers`` and the headers of each (module doc, step 2), each
    with an idempotency key; ``retries`` of them resend an earlier payload unchanged (a
    client retry)."""
    payloads: list[dict] = []
    headers: list[dict[str, str]] = []
    rated: list[tuple[Answer, int]] = []
    for i in range(events):
        if payloads and rng.random() < retries:
            j = rng.randrange(len(payloads))
            payloads.append(payloads[j])
            headers.append(headers[j])
            continue
        if rated and rng.random() < 0.10:
            a, choice = rated[rng.randrange(len(rated))]  # the same user again: a flip
        else:
            a = answers[i % len(answers)]
            choice = rng.randrange(a.n)
            rated.append((a, choice))
        payloads.append({
            "response_id": a.response_id, "choice_index": choice,
            "rating": rng.choice(("up", "up", "down")), "user": a.user,
            "idempotency_key": uuid.uuid4().hex,
        })  # fmt: skip
        headers.append(side.headers(a.principal))
    return payloads, headers


def wait_rows(db_url: str, sql: str, params: tuple, wanted: int, timeout: float) -> int:
    """Poll ``sql`` (a count) until it reaches ``wanted``; the last count."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(db_url, autocommit=True) as conn:
        while True:
            row = conn.execute(sql, params).fetchone()
            got = int(row[0]) if row else 0
            if got >= wanted or time.monotonic() > deadline:
                return got
            time.sleep(0.25)


def produce_answers(stack: Stack, side: Side, count: int, chats: int, tag: str, rng) -> list:
    answers = chat_answers(side, chats, tag) + logged_answers(stack, side, count, tag, rng)
    ids = [a.response_id for a in answers]
    got = wait_rows(
        stack.db_url,
        "SELECT count(*) FROM interactions WHERE response_id = ANY(%s)",
        (ids,),
        len(ids),
        300,
    )
    if got < len(ids):
        raise RuntimeError(f"only {got} of {len(ids)} interactions were ingested")
    return answers


def run_round(
    stack: Stack,
    side_name: str,
    events: int,
    clients: int,
    chats: int,
    rng: random.Random,
    retries: float = 0.02,
    during=None,
) -> dict:
    """One round (module doc, steps 1-3) on ``side_name``; ``during(stack)`` runs in a
    thread while the ratings are sent (the kill round's fault)."""
    side = stack.sides[side_name]
    tag = f"{side_name}-{uuid.uuid4().hex[:6]}"
    with psycopg.connect(stack.db_url, autocommit=True) as conn:
        before = policy_counts(conn)
    answers = produce_answers(stack, side, max(events * 9 // 10, 1), chats, tag, rng)
    payloads, headers = ratings(side, answers, events, rng, retries)
    fault = threading.Thread(target=during, args=(stack,)) if during else None
    log(f"[{tag}] {len(answers)} answers stored; sending {events} ratings…")
    started = time.time()
    if fault:
        fault.start()
    result = post_all(side.url, "/v1/feedback", payloads, clients, headers=headers)
    if fault:
        fault.join()
    accepted = set(result.accepted_ids)
    answer_ids = [a.response_id for a in answers]
    wait_rows(
        stack.db_url,
        "SELECT count(DISTINCT feedback_id) FROM feedback_events WHERE response_id = ANY(%s)",
        (answer_ids,),
        len(accepted),
        180,
    )
    time.sleep(1.0)  # anything stored twice would arrive with or just after the last one
    with psycopg.connect(stack.db_url, autocommit=True) as conn:
        checks = read_back(conn, answers, before, started)
    stored_ids = checks.pop("stored_ids")
    return {
        "side": side_name,
        "events_per_s": round(
            len(accepted & stored_ids) / max(checks.pop("last") - started, 1e-9), 1
        ),
        "http_accept_per_s": round(result.accepted / result.seconds, 1),
        "sent": events,
        "accepted_responses": result.accepted,
        "accepted": len(accepted),
        "stored": len(accepted & stored_ids),
        "lost": len(accepted - stored_ids),
        "statuses": {str(k): v for k, v in sorted(result.statuses.items())},
        "client_errors": result.errors,
        "client_retries": events - len({p["idempotency_key"] for p in payloads}),
        **checks,
        "answers": len(answers),
        "answers_through_chat_api": chats,
    }


def read_back(conn: psycopg.Connection, answers: list[Answer], before: dict, started: float):
    """What the round left in Postgres (module doc, step 3): rows and lags, duplicates per
    idempotency key, latest-wins, and the counters against the recount and against the
    counts expected from the round's own answers (their policies from routing)."""
    ids = [a.response_id for a in answers]
    rows = conn.execute(
        "SELECT f.feedback_id::text, extract(epoch FROM c.committed_at),"
        " extract(epoch FROM c.committed_at - f.occurred_at)"
        " FROM feedback_events f LEFT JOIN ingest_commits c ON c.xact::xid = f.xmin"
        " WHERE f.response_id = ANY(%s)",
        (ids,),
    ).fetchall()
    latest = conn.execute(
        "SELECT DISTINCT ON (response_id, choice_index, user_key) response_id, choice_index,"
        " user_key, rating FROM feedback_events WHERE response_id = ANY(%s)"
        " ORDER BY response_id, choice_index, user_key, occurred_at DESC, event_id DESC",
        (ids,),
    ).fetchall()
    current = conn.execute(
        "SELECT response_id, choice_index, user_key, rating FROM feedback_current"
        " WHERE response_id = ANY(%s)",
        (ids,),
    ).fetchall()
    after, recounted = policy_counts(conn), recount_policy_counts(conn)
    policy = {a.response_id: a.policy for a in answers}
    expected: dict[str, list[int]] = {}  # policy -> served, rated, ups, downs
    for a in answers:
        expected.setdefault(a.policy, [0, 0, 0, 0])[0] += a.n
    for response_id, _, _, rating in latest:
        e = expected[policy[response_id]]
        e[2 if rating == "up" else 3] += 1
    for response_id, _ in {(r[0], r[1]) for r in latest}:
        expected[policy[response_id]][1] += 1
    delta = {
        v: [getattr(c, f) - getattr(before.get(v, c.__class__()), f)
            for f in ("served", "rated", "ups", "downs")]
        for v, c in after.items()
    }  # fmt: skip
    per_key: dict[str, int] = {}
    for r in rows:
        per_key[r[0]] = per_key.get(r[0], 0) + 1
    stamped = [r for r in rows if r[1] is not None]
    lags = [float(r[2]) for r in stamped]
    return {
        "stored_ids": {r[0] for r in rows},
        "last": max((float(r[1]) for r in stamped), default=started),
        "rows_per_idempotency_key_max": max(per_key.values(), default=0),
        "rows_without_commit_stamp": len(rows) - len(stamped),
        "current_is_latest_event": sorted(current) == sorted(latest),
        "counters_as_expected": all(delta.get(v) == e for v, e in expected.items()),
        "counters_equal_recount": after == recounted,
        "counter_deltas": {v: d for v, d in delta.items() if any(d)},
        "lag_p50_s": pct(lags, 0.5),
        "lag_p99_s": pct(lags, 0.99),
        "lag_max_s": pct(lags, 1.0),
    }


def kill_and_rewind(stack: Stack, after_rows: int, rewind: int, report: dict) -> None:
    """Once ``after_rows`` more ratings are stored: SIGKILL the ingestor, rewind the
    group's committed feedback offsets by ``rewind`` records per partition (lost offset
    commits), start a new ingestor. Fills ``report``."""
    count = "SELECT count(*) FROM feedback_events"
    base = wait_rows(stack.db_url, count, (), 0, 0)
    wait_rows(stack.db_url, count, (), base + after_rows, 120)
    assert stack.ingestor is not None
    stack.ingestor.send_signal(signal.SIGKILL)
    stack.ingestor.wait()
    report["killed_after_rows"] = wait_rows(stack.db_url, count, (), 0, 0) - base
    report["rewound"] = rewind_offsets(stack.broker.bootstrap, rewind)
    stack.start_ingestor()


def rewind_offsets(bootstrap: str, rewind: int) -> int:
    """Move the ingestor group's committed offsets on the feedback topic back by
    ``rewind`` per partition: join the group (its only member was killed) as a consumer of
    that topic, commit the earlier offsets, leave. Returns how many records the group will
    be given again (0 if the broker refused)."""
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError
    from kafka.structs import OffsetAndMetadata

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, group_id=GROUP, enable_auto_commit=False,
        session_timeout_ms=6000, heartbeat_interval_ms=1000, max_poll_interval_ms=10000,
        max_poll_records=1,
    )  # fmt: skip
    try:
        consumer.subscribe([topics.FEEDBACK])
        deadline = time.monotonic() + 60
        while not consumer.assignment() and time.monotonic() < deadline:
            consumer.poll(timeout_ms=500)
        before = {tp: consumer.committed(tp) for tp in consumer.assignment()}
        back = {
            tp: OffsetAndMetadata(max(off - rewind, 0), "", -1) for tp, off in before.items() if off
        }
        try:
            consumer.commit(back)
        except KafkaError as exc:
            log(f"offset rewind refused: {exc!r}")
            return 0
        return sum((before[tp] or 0) - (consumer.committed(tp) or 0) for tp in back)
    finally:
        consumer.close(autocommit=False)


def kill_round(stack: Stack, events: int, clients: int, rewind: int, rng) -> dict:
    """The kill round (module doc): ratings flow, the ingestor is SIGKILLed once a fifth of
    them are stored, offsets are rewound, a new ingestor redelivers. No client retries
    here, so everything the new ingestor consumed without storing it is a redelivery."""
    fault: dict = {}
    out = run_round(
        stack, "keyed", events, clients, 0, rng, retries=0.0,
        during=lambda s: kill_and_rewind(s, events // 5, rewind, fault),
    )  # fmt: skip
    consumed = stack.ingest_metric("alignloop_ingest_events_total", f'topic="{topics.FEEDBACK}"')
    inserted = stack.ingest_metric(
        "alignloop_ingest_rows_inserted_total", 'table="feedback_events"'
    )
    return {**out, **fault, "redelivered": int(consumed - inserted)}


def machine() -> dict:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    load = os.getloadavg()
    return {"cpu": cpu, "nproc": os.cpu_count(), "loadavg_1_5_15": [round(x, 2) for x in load]}


def cost_of_keys(rounds: list[dict]) -> dict:
    """Medians per side and the median of the on/off ratios of adjacent pairs."""
    on = [r for r in rounds if r["side"] == "keyed"]
    off = [r for r in rounds if r["side"] == "open"]
    out: dict = {"order": [r["side"] for r in rounds]}
    for metric in ("http_accept_per_s", "events_per_s", "lag_p99_s"):
        out[metric] = {
            "keys_and_limits_on": statistics.median(r[metric] for r in on),
            "open_limits_off": statistics.median(r[metric] for r in off),
            "on_over_off_median_ratio": round(
                statistics.median(a[metric] / b[metric] for a, b in zip(on, off, strict=True)), 3
            ),
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="smaller rounds (CI-sized)")
    ap.add_argument("--events", type=int, default=30_000, help="ratings in the measured run")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--keys", type=int, default=6, help="product keys sharing the load")
    ap.add_argument("--chats", type=int, default=200, help="real chat answers per round")
    ap.add_argument("--cost-rounds", type=int, default=2, help="off/on pairs (ABBA order)")
    ap.add_argument("--cost-events", type=int, default=10_000)
    ap.add_argument("--kill-events", type=int, default=10_000)
    ap.add_argument("--rewind", type=int, default=500, help="per partition, kill round")
    ap.add_argument("--seed", type=int, default=19)
    ap.add_argument("--model-dir", type=Path, help="default: the cached demo model")
    args = ap.parse_args()
    if args.quick:
        args.events, args.cost_events, args.kill_events, args.chats = 5_000, 3_000, 3_000, 40
        args.cost_rounds = 1
    if args.model_dir is None:
        from tests.fixtures.model import demo_model_cache_dir
        from trainer.demo.model import bootstrap_demo_model

        args.model_dir = bootstrap_demo_model(demo_model_cache_dir())
    rng = random.Random(args.seed)
    stack = start_stack(args.model_dir, args.keys)
    try:
        log("starting two serving processes (vLLM engines) and the ingestor…")
        for side, proc in zip(stack.sides.values(), stack.procs, strict=True):
            if not wait_healthy(side.url, proc, 400):
                log(f"serving '{side.name}' did not start; logs in {stack.work}")
                return 1
        # Warm-up on both sides: connections, topic creation, the ingestor's group join.
        for name in ("keyed", "open"):
            run_round(stack, name, 500, 8, 4, rng)
        measured = run_round(stack, "keyed", args.events, args.clients, args.chats, rng)
        order = ["open", "keyed", "keyed", "open"] * args.cost_rounds
        cost = [
            run_round(stack, name, args.cost_events, args.clients, args.chats, rng)
            for name in order[: 2 * args.cost_rounds]
        ]
        killed = kill_round(stack, args.kill_events, args.clients, args.rewind, rng)
    finally:
        stack.stop()
    out = {
        "measured": measured,
        "cost_of_keys_and_limits": cost_of_keys(cost),
        "cost_rounds": cost,
        "kill": killed,
        "targets_met": measured["events_per_s"] >= 3000
        and (measured["lag_p99_s"] or 99) < 2
        and measured["lost"] == 0,
        "config": {k: v for k, v in vars(args).items() if k != "model_dir"},
        "machine": machine(),
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
