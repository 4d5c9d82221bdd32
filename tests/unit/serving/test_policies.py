"""The policy router's adapter checks and stable fallback, on real adapter directories
(checksummed the trainer's way) and an engine stand-in that records what it was asked to
load. The real engine runs the same paths in tests/integration/serving/test_routing.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from schemas.durable import write_dir_atomically
from serving.engine import Adapter
from serving.policies import PolicyRouter, PolicyUnavailable
from serving.routing import RoutingTable, bucket


class RecordingEngine:
    def __init__(self) -> None:
        self.loaded: list[str] = []

    async def add_adapter(self, adapter: Adapter) -> None:
        self.loaded.append(adapter.name)


def _signed(root: Path, version: str) -> tuple[str, str]:
    path = root / version
    checksum = write_dir_atomically(path, lambda d: (d / "weights.bin").write_bytes(b"w" * 64))
    return str(path), checksum


def _flip(path: str) -> None:
    weights = Path(path) / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[3] ^= 0x01
    weights.write_bytes(bytes(data))


def _router(table: RoutingTable) -> tuple[PolicyRouter, RecordingEngine]:
    engine = RecordingEngine()
    router = PolicyRouter("alignloop", "salt", engine)  # type: ignore[arg-type]
    router.apply(table)
    return router, engine


def test_a_tampered_canary_is_refused_before_the_engine_sees_it(tmp_path: Path) -> None:
    (good, good_sum), (bad, bad_sum) = _signed(tmp_path, "v1"), _signed(tmp_path, "v2")
    _flip(bad)
    table = RoutingTable(
        2, "v1", "v2", 0.5,
        adapters={"base": None, "v1": good, "v2": bad, "v3": str(tmp_path / "v1")},
        checksums={"base": None, "v1": good_sum, "v2": bad_sum, "v3": None},
    )  # fmt: skip
    router, engine = _router(table)
    user = next(u for u in (f"user-{i}" for i in range(100)) if bucket("salt", u) < 0.5)
    target = asyncio.run(router.resolve("alignloop", user))
    assert target.version == "v1"  # the canary's users get the stable
    assert engine.loaded == ["v1"]
    with pytest.raises(PolicyUnavailable, match="v2 failed to load"):
        asyncio.run(router.resolve("v2", "anyone"))
    assert "refused the adapter of policy version v2" in router._failed["v2"]
    assert "weights.bin does not match its sha256" in router._failed["v2"]
    assert asyncio.run(router.resolve("v3", "anyone")).version == "v3"  # no checksum: loads
    assert engine.loaded == ["v1", "v3"]


def test_an_unloadable_stable_is_served_by_the_newest_earlier_stable_that_loads(
    tmp_path: Path,
) -> None:
    paths = {v: _signed(tmp_path, v) for v in ("v1", "v2", "v3")}
    _flip(paths["v3"][0])  # the stable
    _flip(paths["v2"][0])  # the most recently retired one
    table = RoutingTable(
        5, "v3",
        adapters={"base": None, **{v: p for v, (p, _) in paths.items()}},
        checksums={"base": None, **{v: c for v, (_, c) in paths.items()}},
        previous_stables=("v2", "v1", "base"),
    )  # fmt: skip
    router, engine = _router(table)
    assert router.serving_stable() == "v3"  # not tried yet
    target = asyncio.run(router.resolve("alignloop", "someone"))
    assert target.version == "v1" and engine.loaded == ["v1"]
    assert router.serving_stable() == "v1"
    with pytest.raises(PolicyUnavailable):  # naming it is still a clear 503
        asyncio.run(router.resolve("v3", "someone"))

    # No earlier stable loads either: then, and only then, a 503.
    only_v2 = RoutingTable(
        5, "v3", adapters=table.adapters, checksums=table.checksums, previous_stables=("v2",)
    )
    router, _ = _router(only_v2)
    with pytest.raises(PolicyUnavailable, match=r"v3 \(stable\) failed to load, and so did"):
        asyncio.run(router.resolve("alignloop", "someone"))
