"""The simulation itself: simulated users talking to a running alignloop over HTTP.

Contract. :func:`run` (async) / :func:`run_sync` take a :class:`SimConfig` and return the
run's :class:`~deploy.simulator.report.Summary`. They use only alignloop's public HTTP
API, as a product would:

* ``POST /v1/chat/completions`` with ``model`` (default ``alignloop``: the routed policy)
  and ``user=<simulated user id>``, so routing is sticky per simulated user; the serving
  version is read from the ``policy_version`` field (the ``X-Alignloop-Policy`` header
  when the field is missing);
* ``POST /v1/feedback`` ``{response_id, rating, user}`` when the user rates: the thumb is
  drawn from the hidden preference's score of the answer text (see
  :mod:`~deploy.simulator.population`); a rating counts once the API answered 202;
* ``POST /v1/preferences`` ``{chosen_response_id, rejected_response_id, user}`` when a
  comparing user asked the same question twice (two requests: one response id each);
* and, read-only, the admin API (:mod:`~deploy.simulator.registry_watch`) for the
  registry's state and events, when a token is available.

Turns start at ``rate`` per second (Poisson arrivals) with at most ``concurrency`` in
flight; when the server is slower than that, turns wait for a free slot instead of piling
up. Every turn draws from its own ``random.Random`` seeded by (seed, turn number), so the
users, prompts and thumbs of a run do not depend on the order answers come back in. Errors
(connection failures, timeouts, non-2xx answers) are counted by kind and never stop the
run. The run ends after ``minutes``, or when ``until`` is reached (first candidate / canary
/ promotion, or N promotions; this needs the admin API), or when :func:`run`'s ``stop``
event is set; turns in flight then get ``drain_s`` to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import httpx

from deploy.simulator.population import Population, PopulationConfig, SimUser
from deploy.simulator.preferences import HiddenPreference, load_preference, words
from deploy.simulator.prompts import PromptSource, SimPrompt, make_source
from deploy.simulator.registry_watch import RegistryWatch
from deploy.simulator.report import (
    HEADER,
    Observation,
    Recorder,
    Summary,
    build_summary,
    print_window,
    window_stats,
)

DEFAULT_ADMIN_URL = "http://127.0.0.1:9103"
_UNTIL = re.compile(r"^(?:(candidate|canary|promotion|rollback)|(\d+)-promotions?)$")


class SimulationError(RuntimeError):
    """The simulation cannot start (bad configuration, ``until`` without admin access)."""


@dataclass(frozen=True)
class Until:
    """Stop once the registry shows ``count`` events of ``event`` since the start."""

    event: str
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Until:
        """``candidate``, ``canary``, ``promotion``, ``rollback`` or ``N-promotions``."""
        m = _UNTIL.match(text.strip())
        if m is None or (m.group(2) is not None and int(m.group(2)) < 1):
            raise ValueError(
                f"--until {text!r}: expected candidate, canary, promotion, rollback or N-promotions"
            )
        if m.group(1):
            return cls(m.group(1), 1)
        return cls("promotion", int(m.group(2)))

    def __str__(self) -> str:
        if self.event == "promotion" and self.count > 1:
            return f"{self.count}-promotions"
        return self.event


@dataclass
class SimConfig:
    base_url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    """The chat API key; None: ALIGNLOOP_API_KEY, else the file ``state_dir/api_key`` that
    ``alignloop up`` keeps (its ``default`` key has every scope, ``pin`` included, which the
    per-version counts need: only a pin key sees which version answered)."""
    model: str = "alignloop"
    minutes: float = 10.0
    rate: float = 2.0
    """Target turns per second (a comparing turn sends two chats)."""
    concurrency: int = 8
    population: PopulationConfig = field(default_factory=PopulationConfig)
    preference: str = "plain"
    prompts_file: str | None = None
    answerable_share: float = 0.5
    max_tokens: int = 64
    temperature: float = 1.0
    until: Until | None = None
    admin_url: str | None = DEFAULT_ADMIN_URL
    admin_token: str | None = None
    """None: ALIGNLOOP_ADMIN_TOKEN, else the file ``state_dir/admin_token``."""
    state_dir: str | None = None
    """Where to look for ``admin_token``; None: ALIGNLOOP_STATE_DIR, else ``.alignloop``."""
    base_version: str = "base"
    report_interval_s: float = 60.0
    """Length of a table row's window ("per minute")."""
    poll_interval_s: float = 3.0
    request_timeout_s: float = 120.0
    drain_s: float = 30.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.minutes <= 0:
            raise SimulationError(f"minutes must be > 0; got {self.minutes}")
        if self.rate <= 0:
            raise SimulationError(f"rate must be > 0; got {self.rate}")
        if self.concurrency < 1:
            raise SimulationError(f"concurrency must be >= 1; got {self.concurrency}")
        if self.max_tokens < 1:
            raise SimulationError(f"max_tokens must be >= 1; got {self.max_tokens}")
        if self.report_interval_s <= 0 or self.poll_interval_s <= 0:
            raise SimulationError("report and poll intervals must be > 0")

    def describe(self) -> dict[str, Any]:
        """The configuration as JSON values, without secrets."""
        out = asdict(self)
        out["until"] = None if self.until is None else str(self.until)
        out["api_key"] = None if self.api_key is None else "(set)"
        out["admin_token"] = None if self.admin_token is None else "(set)"
        return out


def resolve_admin_token(explicit: str | None, state_dir: str | None) -> str | None:
    """The admin token: given, else ALIGNLOOP_ADMIN_TOKEN, else STATE_DIR/admin_token."""
    return _resolve(explicit, "ALIGNLOOP_ADMIN_TOKEN", state_dir, "admin_token")


def resolve_api_key(explicit: str | None, state_dir: str | None) -> str | None:
    """The chat API key: given, else ALIGNLOOP_API_KEY, else STATE_DIR/api_key."""
    return _resolve(explicit, "ALIGNLOOP_API_KEY", state_dir, "api_key")


def _resolve(explicit: str | None, env_name: str, state_dir: str | None, file: str) -> str | None:
    if explicit:
        return explicit
    env = os.environ.get(env_name, "").strip()
    if env:
        return env
    root = Path(state_dir or os.environ.get("ALIGNLOOP_STATE_DIR") or ".alignloop")
    try:
        token = (root / file).read_text().strip()
    except OSError:
        return None
    return token or None


@dataclass
class _Answer:
    response_id: str
    version: str
    text: str
    obs: Observation


class _Run:
    """One simulation's state: the HTTP client, the users, the recorder."""

    def __init__(
        self,
        config: SimConfig,
        client: httpx.AsyncClient,
        preference: HiddenPreference,
        source: PromptSource,
    ) -> None:
        self.config = config
        self.client = client
        self.preference = preference
        self.source = source
        self.population = Population(config.population)
        self.recorder = Recorder()
        self.start = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.start

    async def chat(self, prompt: SimPrompt, user: SimUser) -> _Answer | None:
        c = self.config
        body = {
            "model": c.model,
            "messages": prompt.wire_messages(),
            "max_tokens": c.max_tokens,
            "temperature": c.temperature,
            "user": user.id,
        }
        r = await self._send("/v1/chat/completions", body, "chat", expect=200)
        if r is None:
            return None
        try:
            data = r.json()
            text = data["choices"][0]["message"]["content"] or ""
            response_id = data["id"]
        except (ValueError, KeyError, IndexError, TypeError):
            self.recorder.error("chat:bad_body")
            return None
        version = data.get("policy_version") or r.headers.get("x-alignloop-policy") or "unknown"
        obs = self.recorder.served(self.now(), version, len(words(text)))
        return _Answer(response_id, version, text, obs)

    def score(self, prompt: SimPrompt, answer: _Answer) -> float | None:
        try:
            return self.preference(prompt.text, answer.text, answerable=prompt.answerable)
        except Exception as e:  # a plug-in's bug must not end the run
            self.recorder.error(f"preference:{type(e).__name__}")
            return None

    async def post(self, path: str, body: dict[str, Any], kind: str) -> bool:
        """A feedback or preference POST; True once it was accepted (202)."""
        return await self._send(path, body, kind, expect=202) is not None

    async def _send(
        self, path: str, body: dict[str, Any], kind: str, *, expect: int
    ) -> httpx.Response | None:
        """POST ``body``; the response when its status is ``expect``, else None with the
        failure counted under ``kind`` (never raised: a failed request does not end a run)."""
        try:
            r = await self.client.post(path, json=body)
        except httpx.HTTPError as e:
            self.recorder.error(f"{kind}:{type(e).__name__}")
            return None
        if r.status_code != expect:
            self.recorder.error(f"{kind}:http_{r.status_code}")
            return None
        return r

    async def turn(self, i: int) -> None:
        rng = random.Random(f"{self.config.seed}-turn-{i}")
        user = self.population.pick(rng)
        prompt = self.source.draw(rng)
        self.recorder.turns += 1
        if self.population.wants_to_compare(user, rng):
            a, b = await asyncio.gather(self.chat(prompt, user), self.chat(prompt, user))
            if a is None or b is None:
                return
            sa, sb = self.score(prompt, a), self.score(prompt, b)
            if sa is None or sb is None:
                return
            a_wins = self.population.choose(user, sa, sb, rng) == "a"
            chosen, rejected = (a, b) if a_wins else (b, a)
            body = {
                "chosen_response_id": chosen.response_id,
                "rejected_response_id": rejected.response_id,
                "user": user.id,
            }
            if await self.post("/v1/preferences", body, "preference"):
                self.recorder.preferences += 1
            return
        answer = await self.chat(prompt, user)
        if answer is None or not self.population.wants_to_rate(user, rng):
            return
        score = self.score(prompt, answer)
        if score is None:
            return
        thumb = self.population.thumb(user, score, rng)
        body = {"response_id": answer.response_id, "rating": thumb, "user": user.id}
        if await self.post("/v1/feedback", body, "feedback"):
            self.recorder.rated(answer.obs, thumb, self.now())

    async def guarded_turn(self, i: int) -> None:
        try:
            await self.turn(i)
        except Exception as e:  # never let one turn end the run
            self.recorder.error(f"turn:{type(e).__name__}")


async def _sleep_until(deadline: float, stop: asyncio.Event) -> bool:
    """Sleep until ``deadline`` (monotonic) unless ``stop`` is set first; True if stopped."""
    delay = deadline - time.monotonic()
    if delay <= 0:
        return stop.is_set()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)
    return stop.is_set()


class _Session:
    """One run's moving parts: arrivals, the registry poller and the per-minute table, all
    stopping on the same ``stop`` event."""

    def __init__(
        self, config: SimConfig, sim: _Run, watch: RegistryWatch, stop: asyncio.Event, out
    ) -> None:
        self.config, self.sim, self.watch, self.stop, self.out = config, sim, watch, stop, out
        self.end = sim.start + 60.0 * config.minutes
        self.interval = config.report_interval_s
        self.in_flight: set[asyncio.Task] = set()
        self.slots = asyncio.Semaphore(config.concurrency)
        self.printed = 0  # table windows printed so far
        self.stopped_by = "time"

    def print_minute(self, minute: int, t1: float) -> None:
        stats = window_stats(self.sim.recorder.observations, (minute - 1) * self.interval, t1)
        print_window(self.out, minute, stats, self.watch.row_states(), self.watch.line())

    async def schedule(self) -> None:
        """Poisson arrivals at ``rate``, at most ``concurrency`` turns in flight."""
        rng = random.Random(f"{self.config.seed}-arrivals")
        next_at = self.sim.start
        i = 0
        while True:
            next_at += rng.expovariate(self.config.rate)
            if next_at >= self.end or await _sleep_until(next_at, self.stop):
                return
            await self.slots.acquire()
            if self.stop.is_set() or time.monotonic() >= self.end:
                self.slots.release()
                return
            next_at = max(next_at, time.monotonic())  # no catch-up burst after a stall
            task = asyncio.create_task(self.sim.guarded_turn(i))
            self.in_flight.add(task)
            task.add_done_callback(self.in_flight.discard)
            task.add_done_callback(lambda _: self.slots.release())
            i += 1

    async def watch_registry(self) -> None:
        """Poll the admin API; stop the run once ``until`` is met."""
        while not await _sleep_until(time.monotonic() + self.config.poll_interval_s, self.stop):
            try:
                await self.watch.poll()
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
                self.sim.recorder.error(f"admin:{type(e).__name__}")
                continue
            until = self.config.until
            if until is not None and self.watch.count(until.event) >= until.count:
                self.stopped_by = f"until {until}"
                self.stop.set()

    async def report(self) -> None:
        """Print each finished window of the table."""
        grace = min(2.0, self.interval / 10)  # ratings of the window's last answers land
        while True:
            boundary = self.sim.start + (self.printed + 1) * self.interval
            if boundary > self.end or await _sleep_until(boundary + grace, self.stop):
                return
            self.printed += 1
            self.print_minute(self.printed, self.printed * self.interval)

    async def drive(self) -> None:
        """Arrivals until the end (or ``stop``), then drain the turns still in flight."""
        poller = asyncio.create_task(self.watch_registry())
        reporter = asyncio.create_task(self.report())
        try:
            await self.schedule()
            if self.stopped_by == "time" and self.stop.is_set():
                self.stopped_by = "stopped"
        except asyncio.CancelledError:
            self.stopped_by = "interrupted"
            raise
        finally:
            if self.in_flight:
                _, pending = await asyncio.wait(set(self.in_flight), timeout=self.config.drain_s)
                for task in pending:
                    task.cancel()
                    self.sim.recorder.error("turn:cancelled_at_end")
                if pending:
                    await asyncio.gather(*pending, return_exceptions=True)
            self.stop.set()
            for task in (poller, reporter):
                task.cancel()
            await asyncio.gather(poller, reporter, return_exceptions=True)

    async def finish(self) -> float:
        """A last registry look and the rest of the table (drained answers included);
        returns the run's duration."""
        try:
            await self.watch.poll()
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            self.sim.recorder.error(f"admin:{type(e).__name__}")
        duration = self.sim.now()
        last = max(1, math.ceil(duration / self.interval))
        for minute in range(self.printed + 1, last + 1):
            self.print_minute(minute, math.inf if minute == last else minute * self.interval)
        return duration


async def _open_watch(config: SimConfig, start: float) -> RegistryWatch:
    """The registry watch with its baseline, or untracked (a note says why) when the admin
    API is unavailable and nothing depends on it."""
    token = resolve_admin_token(config.admin_token, config.state_dir)
    watch = await RegistryWatch.open(config.admin_url, token)
    if config.until is not None and not watch.tracked:
        await watch.close()
        raise SimulationError(f"--until {config.until} needs the admin API: {watch.note}")
    try:
        await watch.baseline(start, time.time())
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        if config.until is not None:
            await watch.close()
            raise SimulationError(f"the admin API failed at the start: {e!r}") from None
        await watch.untrack(f"the admin API failed at the start ({e!r}): not tracked")
    return watch


async def run(
    config: SimConfig, *, out: TextIO | None = sys.stdout, stop: asyncio.Event | None = None
) -> Summary:
    """Run one simulation (see the module docstring); the per-minute table goes to ``out``
    (None: silent). Raises :class:`SimulationError` before sending anything if the
    configuration cannot work (bad preference or prompts file, ``until`` without admin)."""
    try:
        preference = load_preference(config.preference)
        source = make_source(config.prompts_file, answerable_share=config.answerable_share)
    except ValueError as e:
        raise SimulationError(str(e)) from None
    api_key = resolve_api_key(config.api_key, config.state_dir)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    client = httpx.AsyncClient(
        base_url=config.base_url.rstrip("/"),
        headers=headers,
        timeout=config.request_timeout_s,
        limits=httpx.Limits(max_connections=2 * config.concurrency + 4),
    )
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    sim = _Run(config, client, preference, source)
    try:
        watch = await _open_watch(config, sim.start)
    except BaseException:
        await client.aclose()
        raise
    try:
        if out is not None:
            if not watch.tracked:
                print(f"note: {watch.note}", file=out)
            print(HEADER, file=out, flush=True)
        session = _Session(config, sim, watch, stop or asyncio.Event(), out)
        await session.drive()
        duration = await session.finish()
        return build_summary(
            sim.recorder,
            watch.facts(),
            started_at=started_at,
            duration_s=duration,
            stopped_by=session.stopped_by,
            base_version=config.base_version,
            config=config.describe(),
        )
    finally:
        await client.aclose()
        await watch.close()


def run_sync(config: SimConfig, *, out: TextIO | None = sys.stdout) -> Summary:
    """:func:`run` in a fresh event loop."""
    return asyncio.run(run(config, out=out))
