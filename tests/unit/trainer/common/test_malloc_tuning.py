"""Tests of :mod:`trainer.common.malloc_tuning`."""

from __future__ import annotations

from pathlib import Path

from trainer.common.malloc_tuning import keep_freed_memory


def _rss_kib() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])


def test_glibc_keeps_freed_memory_after_tuning():
    """On glibc both thresholds are taken; a large block freed and allocated again then
    comes back from the heap (the RSS does not drop on free)."""
    import ctypes

    assert keep_freed_memory(1 << 28) is True
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)  # touch every page
    before = _rss_kib()
    libc.free(block)
    assert _rss_kib() > before - (size >> 10) // 2  # not handed back to the OS
