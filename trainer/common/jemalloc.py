"""jemalloc under a training process, where the machine has it.

PyTorch's CPU allocator is plain ``malloc``. A training update allocates activation
blocks of 1-4 MB whose sizes change with every micro-batch's width; glibc's heap cannot
fit later blocks into the holes earlier ones left, so the heap it holds grows far past
what is ever in use at once (and with glibc's defaults, every freed large block goes back
to the system and costs page faults when asked for again: what
:func:`trainer.common.malloc_tuning.keep_freed_memory` trades against). jemalloc serves
such blocks from size classes and returns unused pages on a timer: on the PPO benchmark
at 31 M parameters, a training peak of 465 MB against tuned glibc's 633 at the same
episodes/s (docs/benchmarks.md, "jemalloc and activation checkpointing: both PPO targets at 31 M").

jemalloc keeps the pages of freed blocks ("dirty" pages) for reuse and gives them back to
the system on a timer (10 s by default). :func:`release_freed_pages` gives them back now:
the PPO trainer calls it between an update and the next rollout, so the decode loop's KV
cache and folded weights do not sit on top of the update's leftovers.

An allocator cannot be swapped inside a running process, so :func:`run_on_jemalloc`
executes the same command line again with jemalloc preloaded (``LD_PRELOAD``), once,
before the command imports anything heavy. The setting ``allocator: glibc``
(``ALIGNLOOP_ALLOCATOR``) keeps glibc; without the library (Debian/Ubuntu package
``libjemalloc2``) or off Linux nothing changes.
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

_REEXECUTED = "ALIGNLOOP_ALLOCATOR_REEXECUTED"
_ALL_ARENAS = 4096
"""``MALLCTL_ARENAS_ALL`` of ``jemalloc.h``: the arena index that names every arena."""


def find_jemalloc() -> str | None:
    """The jemalloc shared library's name as the dynamic loader finds it, or None."""
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.util.find_library("jemalloc")


def jemalloc_loaded(maps: Path = Path("/proc/self/maps")) -> bool:
    """Whether this process has jemalloc mapped (preloaded or linked)."""
    try:
        return "jemalloc" in maps.read_text()
    except OSError:
        return False


def preloaded_env(env: Mapping[str, str], library: str) -> dict[str, str]:
    """``env`` with ``library`` first on ``LD_PRELOAD`` (kept once, others after it)."""
    others = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p != library]
    return {**env, "LD_PRELOAD": " ".join([library, *others])}


def run_on_jemalloc(allocator: str = "auto") -> None:
    """Run this process's command again with jemalloc preloaded, where that applies (see
    the module docstring; ``allocator``: the setting, ``auto`` or ``glibc``); returns only
    when it does not."""
    if allocator == "glibc" or os.environ.get(_REEXECUTED):
        return
    library = find_jemalloc()
    if library is None or jemalloc_loaded():
        return
    env = preloaded_env(os.environ, library)
    env[_REEXECUTED] = "1"  # once: a library the loader refuses must not loop
    sys.stdout.flush()
    sys.stderr.flush()
    log.debug("running again on %s", library)
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def release_freed_pages() -> bool:
    """Give the pages of freed blocks jemalloc keeps back to the system now, in every arena
    (``mallctl("arena.<all>.purge")``); True where jemalloc did. Live memory is untouched:
    only the resident size falls, and a later allocation that needs those pages faults them
    in again. Without jemalloc in this process nothing happens (False)."""
    try:
        mallctl = ctypes.CDLL(None).mallctl
    except (OSError, AttributeError):  # glibc's malloc, or no dynamic symbols
        return False
    mallctl.argtypes = [ctypes.c_char_p, *[ctypes.c_void_p] * 3, ctypes.c_size_t]
    return mallctl(f"arena.{_ALL_ARENAS}.purge".encode(), None, None, None, 0) == 0
