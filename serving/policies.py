"""Resolve a request to a policy version and a loaded adapter.

`PolicyRouter` answers one question for the chat handler: which version serves this
request, and with which adapter? It combines the current `RoutingTable` (swapped in by the
routing watcher), sticky arm assignment, and the adapters already loaded into the engine.

Adapters are loaded on first use with ``engine.add_adapter`` *before* any request uses
them: vLLM survives a failed ``add_lora`` but dies if a generation names an adapter it
cannot load. A version registered with a checksum is first checked against it
(:func:`schemas.durable.verify_checksum`: the manifest's sha256, then every file's); a
mismatch is refused like any load failure. A version registered without one (``base``, an
operator's adapter registered with no checksum) loads unverified. A version whose adapter
fails to load is marked failed in this replica, an `AdapterLoadFailed` event tells the
canary controller (which rolls a canary back), and its routed traffic is served by the
stable version meanwhile; when the stable itself cannot load, by the newest earlier stable
that does (``previous_stable`` in ``alignloop_routed_requests_total``, ``serving_stable``
on ``/healthz``), not a 503 for everyone. Each version keeps one adapter
name and id for the life of the process: versions are immutable, so a name never has to be
reloaded with new content (vLLM could reuse a stale prefix cache for it).

Like for like during a canary: while an adapter canary runs against the adapter-less base,
routed stable-arm requests are served through a zero copy of the canary's adapter
(:mod:`serving.zero_adapter`; ``like_for_like_dir`` set). Their answers are the base's,
their cost is the canary's, so latency and throughput differ between the arms only by what
the candidate's weights do. Should the zero copy fail to load, the stable arm is served by
the base as before (and the guardrail may then see LoRA's own overhead).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

from prometheus_client import Counter

from schemas import topics
from schemas.chat import ModelCard
from schemas.durable import CorruptedDirectory, verify_checksum
from schemas.events import AdapterLoadFailed
from serving.engine import Adapter, Engine
from serving.publisher import PRODUCER, EventPublisher
from serving.routing import (
    BASE_VERSION,
    ROUTING_GENERATION,
    RoutingTable,
    choose_version,
)
from serving.zero_adapter import write_zero_adapter

log = logging.getLogger(__name__)

ADAPTER_LOADS = Counter(
    "alignloop_adapter_loads_total",
    "Adapter loads into the engine, by version and outcome.",
    ["version", "outcome"],
)
ROUTED = Counter(
    "alignloop_routed_requests_total",
    "Requests by how they were routed (stable, canary, pinned, fallback: a canary user "
    "served by stable, previous_stable: a stable user served by an earlier stable).",
    ["arm"],
)


@dataclass(frozen=True)
class PolicyTarget:
    version: str
    adapter: Adapter | None  # None = the base weights, no adapter
    arm: str = "stable"
    """How the request got here: stable, canary, pinned, fallback or previous_stable."""


class UnknownModel(LookupError):
    pass


class PolicyUnavailable(RuntimeError):
    """A version was named explicitly, or is the stable one, and cannot be loaded."""


class PolicyRouter:
    def __init__(
        self,
        served_model_name: str,
        salt: str,
        engine: Engine | None = None,
        publisher: EventPublisher | None = None,
        load_timeout_s: float = 60.0,
        like_for_like_dir: Path | None = None,
    ) -> None:
        self.served_model_name = served_model_name
        self.salt = salt
        self.engine = engine
        self.publisher = publisher
        self.load_timeout_s = load_timeout_s
        self.like_for_like_dir = like_for_like_dir
        self.table = RoutingTable.base_only()
        self._ids: dict[str, int] = {}
        self._next_id = itertools.count(1)
        self._loaded: dict[str, Adapter] = {}
        self._failed: dict[str, str] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # stable version -> the version serving its arm (itself, or an earlier stable)
        self.served_stable: dict[str, str] = {}

    # -- the routing table ------------------------------------------------------------
    def apply(self, table: RoutingTable) -> None:
        """Install a new snapshot (called from the watcher thread; one reference swap)."""
        old = self.table
        if table.generation < old.generation:
            return  # a late read of an older state
        self.table = table
        ROUTING_GENERATION.set(table.generation)
        if (old.stable, old.canary, old.canary_weight) != (
            table.stable,
            table.canary,
            table.canary_weight,
        ):
            log.info(
                "routing generation %d: stable %s, canary %s at %.0f%%",
                table.generation,
                table.stable,
                table.canary,
                100 * table.canary_weight,
            )

    def model_names(self) -> list[str]:
        """What GET /v1/models lists: the routed name, then every servable version."""
        versions = sorted(v for v in self.table.adapters if v not in self._failed)
        return [self.served_model_name, *versions]

    def model_cards(self, created: int, max_model_len: int) -> list[ModelCard]:
        """`model_names` as `/v1/models` entries, each with its state: ``routed`` (the
        name that follows the routing table), ``stable``, ``canary``, or ``available``
        (a version a request may name, e.g. a candidate or a retired stable)."""
        table = self.table

        def state(name: str) -> str:
            if name == self.served_model_name:
                return "routed"
            if name == table.stable:
                return "stable"
            if name == table.canary:
                return "canary"
            return "base" if name == BASE_VERSION else "available"

        return [
            ModelCard(
                id=name,
                created=created,
                owned_by="alignloop",
                max_model_len=max_model_len,
                state=state(name),
                parent=None if name == self.served_model_name else self.served_model_name,
            )
            for name in self.model_names()
        ]

    # -- one request ------------------------------------------------------------------
    async def resolve(self, model: str, user_key: str) -> PolicyTarget:
        table = self.table  # this request's snapshot, whatever changes meanwhile
        if model == self.served_model_name:
            version = choose_version(table, self.salt, user_key)
            arm = "canary" if version == table.canary else "stable"
        elif model in table.adapters:
            version, arm = model, "pinned"
        else:
            raise UnknownModel(model)
        try:
            target = await self._target(table, version)
        except PolicyUnavailable:
            if arm == "pinned":
                raise
            # The canary cannot load here: its users get the stable. The stable cannot: an
            # earlier stable, not a 503 for everyone.
            arm = "fallback" if arm == "canary" else "previous_stable"
            target = await self._stable(table)
        if arm == "stable" and target.adapter is None and table.canary is not None:
            zero = await self._zero_copy(table, table.canary)
            if zero is not None:
                target = PolicyTarget(target.version, zero)
        ROUTED.labels(arm).inc()
        return replace(target, arm=arm)

    async def _stable(self, table: RoutingTable) -> PolicyTarget:
        """The stable version, or, when its adapter cannot load here, the newest earlier
        stable that does (``table.previous_stables``: most recently retired first)."""
        for version in (table.stable, *table.previous_stables):
            try:
                target = await self._target(table, version)
            except PolicyUnavailable:
                continue
            if version != table.stable and self.served_stable.get(table.stable) != version:
                log.error(
                    "stable %s cannot load here (%s); its traffic is served by %s, the "
                    "newest earlier stable that loads",
                    table.stable,
                    self._failed.get(table.stable),
                    version,
                )
            self.served_stable[table.stable] = version
            return target
        raise PolicyUnavailable(
            f"policy version {table.stable} (stable) failed to load, and so did every earlier "
            "stable"
        )

    def serving_stable(self) -> str:
        """The version that serves the stable arm now: the stable, or the earlier stable
        standing in for it while its adapter cannot load (for /healthz)."""
        stable = self.table.stable
        return stable if stable not in self._failed else self.served_stable.get(stable, stable)

    async def _zero_copy(self, table: RoutingTable, canary: str) -> Adapter | None:
        """The loaded zero copy of the canary's adapter (see the module docstring), or None
        when like for like is off, the canary has no adapter or the copy cannot load."""
        path = table.adapters.get(canary)
        name = f"{canary}@zero"
        if self.like_for_like_dir is None or path is None or {canary, name} & self._failed.keys():
            return None
        if name in self._loaded:
            return self._loaded[name]
        async with self._locks.setdefault(f"{name}:write", asyncio.Lock()):
            if name in self._loaded or name in self._failed:
                return self._loaded.get(name)
            target = self.like_for_like_dir / f"{canary}-zero"
            checksum = table.checksums.get(canary)
            try:
                if checksum is not None:  # shapes from a tampered adapter: no copy either
                    await asyncio.to_thread(_verify, canary, path, checksum)
                zero_path = await asyncio.to_thread(write_zero_adapter, path, target)
                return await self._load(name, str(zero_path), report=False)
            except Exception as exc:  # any failure: serve the base, as without like for like
                self._failed.setdefault(name, f"{type(exc).__name__}: {exc}"[:2000])
                log.warning(
                    "no zero copy of %s's adapter (%s): its stable arm is served by the base",
                    canary,
                    exc,
                )
                return None

    async def _target(self, table: RoutingTable, version: str) -> PolicyTarget:
        if version in self._failed:
            raise PolicyUnavailable(
                f"policy version {version} failed to load: {self._failed[version]}"
            )
        path = table.adapters.get(version)
        if path is None:
            return PolicyTarget(version, None)
        return PolicyTarget(version, await self._load(version, path, table.checksums.get(version)))

    async def _load(
        self, version: str, path: str, checksum: str | None = None, *, report: bool = True
    ) -> Adapter:
        if version in self._loaded:
            return self._loaded[version]
        lock = self._locks.setdefault(version, asyncio.Lock())
        async with lock:  # concurrent first requests load once
            if version in self._loaded:
                return self._loaded[version]
            if version in self._failed:
                raise PolicyUnavailable(self._failed[version])
            adapter = Adapter(version, self._ids.setdefault(version, next(self._next_id)), path)
            try:
                if not os.path.isdir(path):
                    raise FileNotFoundError(f"no adapter directory at {path}")
                if checksum is not None:
                    await asyncio.to_thread(_verify, version, path, checksum)
                assert self.engine is not None
                await asyncio.wait_for(self.engine.add_adapter(adapter), self.load_timeout_s)
            except Exception as exc:
                self._mark_failed(version, path, exc, report=report)
                raise PolicyUnavailable(f"policy version {version} failed to load") from exc
            ADAPTER_LOADS.labels(version, "ok").inc()
            self._loaded[version] = adapter
            log.info("loaded adapter of %s from %s", version, path)
            return adapter

    def _mark_failed(
        self, version: str, path: str, exc: BaseException, *, report: bool = True
    ) -> None:
        error = f"{type(exc).__name__}: {exc}"[:2000]
        self._failed[version] = error
        ADAPTER_LOADS.labels(version, "failed").inc()
        log.error(
            "adapter of %s failed to load (%s); its routed traffic goes to stable", version, error
        )
        if report and self.publisher is not None:
            self.publisher.publish(
                topics.POLICY,
                AdapterLoadFailed(
                    producer=PRODUCER,
                    version=version,
                    adapter_uri=path,
                    error=error,
                ),
            )


def _verify(version: str, path: str, checksum: str) -> None:
    """Check an adapter directory against its registered checksum before the engine sees
    it; :class:`CorruptedDirectory` names the version and both checksums that differ."""
    try:
        verify_checksum(Path(path), checksum)
    except CorruptedDirectory as exc:
        raise CorruptedDirectory(
            f"refused the adapter of policy version {version}: {exc}"
        ) from None


__all__ = ["BASE_VERSION", "PolicyRouter", "PolicyTarget", "PolicyUnavailable", "UnknownModel"]
