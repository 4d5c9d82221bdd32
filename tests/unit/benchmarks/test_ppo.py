"""The PPO benchmark's pure helpers: the alternating run order, the ratio against the
better of TRL's configurations and one allocator for both sides (benchmarks/ppo.py)."""

from __future__ import annotations

import pytest

from benchmarks import ppo as bench_ppo
from benchmarks.ppo import against_better, alternating_order


def test_order_alternates_so_no_side_always_runs_first() -> None:
    order = alternating_order(["alignloop", "trl_full", "trl_lora"], 4)
    assert order == [
        ["alignloop", "trl_full", "trl_lora"],
        ["trl_lora", "trl_full", "alignloop"],
        ["alignloop", "trl_full", "trl_lora"],
        ["trl_lora", "trl_full", "alignloop"],
    ]
    assert alternating_order(["alignloop"], 3) == [["alignloop"]] * 3


def test_speed_ratio_is_against_the_faster_configuration() -> None:
    ratio, against = against_better(90.0, {"trl_full": 40.0, "trl_lora": 45.0}, True)
    assert against == "trl_lora"
    assert ratio == pytest.approx(2.0)


def test_memory_ratio_is_against_the_smaller_configuration() -> None:
    ratio, against = against_better(100.0, {"trl_full": 400.0, "trl_lora": 250.0}, False)
    assert against == "trl_lora"
    assert ratio == pytest.approx(0.4)


def test_both_sides_children_get_one_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    """jemalloc preloaded for every child, or glibc with nothing preloaded and alignloop's
    own re-execution onto jemalloc switched off: never one side on each. The oneDNN caches'
    capacity asked for replaces whatever this process's environment says."""
    monkeypatch.setenv("LD_PRELOAD", "libother.so")
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "7")
    monkeypatch.setattr(bench_ppo, "find_jemalloc", lambda: "libjemalloc.so.2")
    on_jemalloc = bench_ppo.child_env("jemalloc", 64)
    assert on_jemalloc["LD_PRELOAD"] == "libjemalloc.so.2"
    assert "ALIGNLOOP_ALLOCATOR" not in on_jemalloc
    caches = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    assert [on_jemalloc[name] for name in caches] == ["64", "64"]
    on_glibc = bench_ppo.child_env("glibc", 1024)
    assert "LD_PRELOAD" not in on_glibc and on_glibc["ALIGNLOOP_ALLOCATOR"] == "glibc"
    assert [on_glibc[name] for name in caches] == ["1024", "1024"]
    assert bench_ppo.resolved_allocator("auto") == "jemalloc"
    monkeypatch.setattr(bench_ppo, "find_jemalloc", lambda: None)
    assert bench_ppo.resolved_allocator("auto") == "glibc"
    with pytest.raises(SystemExit, match="libjemalloc2"):
        bench_ppo.resolved_allocator("jemalloc")
