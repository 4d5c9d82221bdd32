"""Following the policy registry through the admin API while a simulation runs.

Contract. :meth:`RegistryWatch.open` probes ``GET /admin/routing`` with the bearer token;
when that fails (unreachable, disabled, no or wrong token) the watch is *untracked*:
:attr:`note` says why and every later call is a no-op, so the simulation runs on without
registry facts. When it works, :meth:`poll` (called every few seconds) reads
``GET /admin/policies`` (states, metrics, routing) and, for each version that is new or
changed state since the previous poll, its audit trail (``GET /admin/policies/{v}``), and
turns audit rows it has not seen into :class:`~deploy.simulator.report.RegistryEvent`:
``register`` → candidate, ``start_canary`` → canary, ``promote`` → promotion,
``rollback`` → rollback, ``restore`` → restore, ``reject`` → rejection. Everything the
registry held before the run is a baseline, not an event.

An event's time is its audit timestamp on this machine's clock, clamped into the interval
between the poll that saw it and the one before, so a clock difference with a remote
registry costs at most one polling interval. Read-only: the watch never changes anything.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import httpx

from deploy.simulator.report import RegistryEvent, RegistryFacts

EVENT_OF_ACTION = {
    "register": "candidate",
    "start_canary": "canary",
    "promote": "promotion",
    "rollback": "rollback",
    "restore": "restore",
    "reject": "rejection",
}


def _as_float(x: Any) -> float | None:
    if isinstance(x, bool) or x is None:
        return None
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None
    return value if value == value else None  # NaN → None


def kl_of(metrics: Any) -> float | None:
    """``metrics.evaluation.kl_to_reference`` (what a PPO round registers), else None."""
    if not isinstance(metrics, dict):
        return None
    evaluation = metrics.get("evaluation")
    if not isinstance(evaluation, dict):
        return None
    return _as_float(evaluation.get("kl_to_reference"))


class RegistryWatch:
    def __init__(self, client: httpx.AsyncClient | None, note: str | None) -> None:
        self.client = client
        self.note = note
        self.states: dict[str, str] = {}
        self.metrics: dict[str, Any] = {}
        self.routing: dict[str, Any] = {}
        self.events: list[RegistryEvent] = []
        self._seen_audit: set[int] = set()
        self._last_poll_t = 0.0
        self._start_wall = 0.0
        self._start_mono = 0.0

    @property
    def tracked(self) -> bool:
        return self.client is not None

    @classmethod
    async def open(cls, admin_url: str | None, token: str | None) -> RegistryWatch:
        """Probe the admin API; an untracked watch (with the reason) if it cannot be read."""
        if not admin_url:
            return cls(None, "no admin URL given: registry events not tracked")
        if not token:
            return cls(
                None,
                "no admin token (--admin-token, ALIGNLOOP_ADMIN_TOKEN or STATE_DIR/admin_token):"
                " registry events not tracked",
            )
        client = httpx.AsyncClient(
            base_url=admin_url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=10.0,
        )
        try:
            r = await client.get("/admin/routing")
        except httpx.HTTPError as e:
            await client.aclose()
            return cls(None, f"admin API at {admin_url} unreachable ({type(e).__name__}): "
                       "registry events not tracked")  # fmt: skip
        if r.status_code != 200:
            await client.aclose()
            code = _error_code(r)
            return cls(
                None,
                f"admin API at {admin_url} answered {r.status_code}"
                f"{f' {code}' if code else ''}: registry events not tracked",
            )
        return cls(client, None)

    async def untrack(self, note: str) -> None:
        """Give up on the registry (the run goes on without it)."""
        await self.close()
        self.client, self.note = None, note

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    async def baseline(self, start_mono: float, start_wall: float) -> None:
        """Record what the registry holds now; only later changes become events."""
        self._start_mono, self._start_wall = start_mono, start_wall
        if self.client is None:
            return
        await self._read_policies()
        for version in list(self.states):
            for row in await self._audit(version):
                self._seen_audit.add(int(row["id"]))

    async def poll(self) -> None:
        """One look at the registry (raises httpx.HTTPError / ValueError on failure)."""
        if self.client is None:
            return
        now = time.monotonic() - self._start_mono
        before = dict(self.states)
        await self._read_policies()
        for version, state in self.states.items():
            if before.get(version) == state:
                continue
            for row in await self._audit(version):
                audit_id = int(row["id"])
                if audit_id in self._seen_audit:
                    continue
                self._seen_audit.add(audit_id)
                kind = EVENT_OF_ACTION.get(row.get("action", ""))
                if kind is None:
                    continue
                at = datetime.fromisoformat(row["at"]).timestamp() - self._start_wall
                t = min(now, max(self._last_poll_t, at))
                self.events.append(RegistryEvent(t, kind, version))
        self.events.sort(key=lambda e: e.t)
        self._last_poll_t = now

    async def _read_policies(self) -> None:
        assert self.client is not None
        r = await self.client.get("/admin/policies")
        r.raise_for_status()
        body = r.json()
        self.states = {v["version"]: v["state"] for v in body["versions"]}
        self.metrics = {v["version"]: v.get("metrics") for v in body["versions"]}
        self.routing = body.get("routing") or {}

    async def _audit(self, version: str) -> list[dict[str, Any]]:
        assert self.client is not None
        r = await self.client.get(f"/admin/policies/{version}", params={"audit_limit": 1000})
        r.raise_for_status()
        return list(r.json().get("audit") or [])

    def count(self, kind: str) -> int:
        return sum(1 for e in self.events if e.event == kind)

    def row_states(self) -> dict[str, str] | None:
        """version -> state for the table (the canary with its traffic share)."""
        if self.client is None:
            return None
        out = dict(self.states)
        canary = self.routing.get("canary_version")
        if canary in out:
            out[canary] = f"canary {100 * float(self.routing.get('canary_weight') or 0):.0f}%"
        return out

    def line(self) -> str | None:
        """One line on the registry for the per-minute table."""
        if self.client is None:
            return None
        r = self.routing
        parts = [f"stable {r.get('stable_version', '?')}"]
        if r.get("canary_version"):
            weight = 100 * float(r.get("canary_weight") or 0)
            parts.append(f"canary {r['canary_version']} at {weight:.0f}%")
        if r.get("held"):
            parts.append("HELD")
        candidates = [v for v, s in self.states.items() if s == "candidate"]
        if candidates:
            parts.append(f"candidates {', '.join(candidates)}")
        parts.append(
            f"promotions {self.count('promotion')}, rollbacks {self.count('rollback')}, "
            f"rejections {self.count('rejection')}"
        )
        return "; ".join(parts)

    def facts(self) -> RegistryFacts:
        if self.client is None:
            return RegistryFacts(tracked=False, note=self.note)
        return RegistryFacts(
            tracked=True,
            events=list(self.events),
            final_stable=self.routing.get("stable_version"),
            final_canary=self.routing.get("canary_version"),
            states=dict(self.states),
            kl_to_reference={v: kl_of(m) for v, m in self.metrics.items()},
        )


def _error_code(r: httpx.Response) -> str | None:
    try:
        return r.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
