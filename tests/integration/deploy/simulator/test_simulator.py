"""The traffic simulator against real services: the registry watch over the real admin API
(real Postgres), and the driver against the real serving process (vLLM), checking that
chats and ratings were accepted, counted per policy version, and reached Kafka with the
simulated users' ids."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from deploy.local.broker import free_port
from deploy.ops.admin_api import create_app, serve_in_thread
from deploy.policies import registry
from deploy.simulator import PopulationConfig, SimConfig, Until, run
from deploy.simulator.population import Population
from deploy.simulator.registry_watch import RegistryWatch
from feedback.db import connect
from schemas import topics
from schemas.events import FeedbackSubmitted, PreferenceSubmitted
from tests.fixtures.broker import consume_events

TOKEN = "simulator-admin-token-0123456789abcdef"
EVAL = {"evaluation": {"kl_to_reference": 0.042, "win_rate": 0.6}}


@dataclass
class Admin:
    url: str
    database_url: str


@pytest.fixture
def admin(migrated_url: str) -> Iterator[Admin]:
    port = free_port()
    server, thread = serve_in_thread(create_app(migrated_url, TOKEN), "127.0.0.1", port)
    try:
        yield Admin(f"http://127.0.0.1:{port}", migrated_url)
    finally:
        server.should_exit = True
        thread.join(10)


def _registry(url: str):
    return connect(url, autocommit=True)


# --- the registry watch (no engine) ------------------------------------------------------------


def test_watch_turns_audit_rows_into_events(admin: Admin) -> None:
    with _registry(admin.database_url) as conn:
        registry.register_candidate(conn, "before", "/a/before", actor="trainer")

    async def scenario() -> RegistryWatch:
        watch = await RegistryWatch.open(admin.url, TOKEN)
        assert watch.tracked and watch.note is None
        start = time.monotonic()
        await watch.baseline(start, time.time())
        await watch.poll()
        assert watch.events == []  # what the registry held before the run is no event
        with _registry(admin.database_url) as conn:
            registry.register_candidate(conn, "v1", "/a/v1", actor="trainer", metrics=EVAL)
            await watch.poll()
            registry.start_canary(conn, "v1", 0.05, actor="controller")
            registry.promote(conn, "v1", actor="controller")
            await watch.poll()
            registry.register_candidate(conn, "v2", "/a/v2", actor="trainer")
            registry.start_canary(conn, "v2", 0.05, actor="controller")
            registry.rollback(conn, actor="controller", expect_canary="v2")
            registry.reject(conn, "before", actor="operator")
            await watch.poll()
        await watch.close()
        return watch

    watch = asyncio.run(scenario())
    events = [(e.event, e.version) for e in watch.events]
    assert events[:3] == [("candidate", "v1"), ("canary", "v1"), ("promotion", "v1")]
    assert sorted(events[3:]) == sorted(
        [("candidate", "v2"), ("canary", "v2"), ("rollback", "v2"), ("rejection", "before")]
    )
    times = [e.t for e in watch.events]
    assert times == sorted(times) and times[0] >= 0.0
    facts = watch.facts()
    assert facts.tracked and facts.final_stable == "v1" and facts.final_canary is None
    assert facts.states["v2"] == "rolled_back" and facts.states["base"] == "retired"
    assert facts.kl_to_reference["v1"] == 0.042 and facts.kl_to_reference["v2"] is None
    assert watch.row_states() is not None and watch.row_states()["v1"] == "stable"
    assert "stable v1" in (watch.line() or "")


def test_watch_explains_why_it_cannot_track(admin: Admin, migrated_url: str) -> None:
    async def note(url: str | None, token: str | None) -> str:
        watch = await RegistryWatch.open(url, token)
        assert not watch.tracked and watch.row_states() is None and watch.line() is None
        await watch.poll()  # a no-op, not an error
        assert watch.facts().tracked is False
        return watch.note or ""

    assert "403 invalid_token" in asyncio.run(note(admin.url, "wrong"))
    assert "no admin token" in asyncio.run(note(admin.url, None))
    assert "no admin URL" in asyncio.run(note(None, TOKEN))
    assert "unreachable" in asyncio.run(note(f"http://127.0.0.1:{free_port()}", TOKEN))
    port = free_port()
    server, thread = serve_in_thread(create_app(migrated_url, None), "127.0.0.1", port)
    try:
        assert "503 admin_disabled" in asyncio.run(note(f"http://127.0.0.1:{port}", TOKEN))
    finally:
        server.should_exit = True
        thread.join(10)


# --- the driver against the real serving process -------------------------------------------------


def _quick_config(serving, **overrides) -> SimConfig:
    values = {
        "base_url": serving.base_url,
        "api_key": serving.api_key,
        "minutes": 8 / 60,
        "rate": 3.0,
        "concurrency": 3,
        "max_tokens": 24,
        "population": PopulationConfig(
            users=12, rate_share=1.0, rate_prob=1.0, compare_share=0.5, compare_prob=0.4, seed=7
        ),
        "preference": "plain",
        "admin_url": None,
        "report_interval_s": 4.0,
        "poll_interval_s": 0.5,
        "seed": 7,
    }
    values.update(overrides)
    return SimConfig(**values)


@pytest.mark.slow
def test_driver_chats_rates_and_counts_per_version(serving) -> None:
    config = _quick_config(serving)
    out = io.StringIO()
    summary = asyncio.run(run(config, out=out))

    totals = summary.totals
    assert totals["chats"] >= 8, summary.to_dict()
    assert totals["ratings"] >= 4 and totals["preferences"] >= 1, summary.to_dict()
    assert summary.errors == {} and totals["errors"] == 0
    # no registry behind the serving fixture: every answer came from the base
    assert set(summary.versions) == {"base"}
    base = summary.versions["base"]
    assert base["served"] == totals["chats"] and base["rated"] == totals["ratings"]
    assert 0 < base["mean_words"] < 100 and base["up_rate_ci95"] is not None
    assert summary.base == base
    assert summary.first_rating_s is not None and summary.stopped_by == "time"
    # no admin access: the registry fields are null and the report says why
    assert summary.registry_tracked is False and "no admin URL" in (summary.registry_note or "")
    assert summary.time_to_first_candidate_s is None and summary.promotions is None
    table = out.getvalue()
    assert "note: no admin URL" in table
    rows = [ln.split() for ln in table.splitlines() if ln.split()[1:2] == ["base"]]
    # one row per 4-s window, in order (a last one for answers that finished after 8 s)
    assert [r[0] for r in rows][:2] == ["1", "2"] and len(rows) <= 3
    assert sum(int(r[2]) for r in rows) == base["served"]
    assert sum(int(r[3]) for r in rows) <= base["rated"]  # a row counts ratings in by then

    # every accepted rating and preference is on Kafka, from the simulated user who asked
    users = {u.id for u in Population(config.population).users}
    events = consume_events(serving.broker.bootstrap, topics.FEEDBACK, expected=1, timeout=30)
    ours = [e for e in events if getattr(e, "user", None) in users]
    thumbs = [e for e in ours if isinstance(e, FeedbackSubmitted)]
    prefs = [e for e in ours if isinstance(e, PreferenceSubmitted)]
    assert len(thumbs) == totals["ratings"] and len(prefs) == totals["preferences"]
    assert sum(e.rating == "up" for e in thumbs) == totals["ups"]
    assert all(p.chosen_response_id != p.rejected_response_id for p in prefs)


@pytest.mark.slow
def test_driver_follows_the_registry_and_stops_at_until(serving, admin: Admin) -> None:
    def operator() -> None:  # the registry moves while the users are chatting
        time.sleep(2.0)
        with _registry(admin.database_url) as conn:
            registry.register_candidate(conn, "v1", "/a/v1", actor="trainer", metrics=EVAL)
            time.sleep(1.0)
            registry.start_canary(conn, "v1", 0.05, actor="controller")
            time.sleep(1.0)
            registry.promote(conn, "v1", actor="controller")

    config = _quick_config(
        serving,
        minutes=1.0,
        admin_url=admin.url,
        admin_token=TOKEN,
        until=Until("promotion"),
        population=PopulationConfig(users=12, rate_share=1.0, compare_share=0.0, seed=8),
    )
    thread = threading.Thread(target=operator)
    thread.start()
    started = time.monotonic()
    out = io.StringIO()
    try:
        summary = asyncio.run(run(config, out=out))
    finally:
        thread.join()
    assert time.monotonic() - started < 30  # stopped at the promotion, not after a minute
    assert summary.stopped_by == "until promotion"
    assert summary.registry_tracked and summary.registry_note is None
    assert summary.promotions == 1 and summary.rollbacks == 0
    t_cand = summary.time_to_first_candidate_s
    t_canary = summary.time_to_first_canary_s
    t_prom = summary.time_to_first_promotion_s
    assert t_cand is not None and t_canary is not None and t_prom is not None
    assert t_cand <= t_canary <= t_prom and t_prom - t_cand >= 1.5
    assert summary.final_stable is not None and summary.final_stable["version"] == "v1"
    assert summary.kl_stable_to_base == 0.042
    assert summary.registry_states == {"base": "retired", "v1": "stable"}
    assert "registry: stable v1" in out.getvalue()
