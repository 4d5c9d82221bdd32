"""Which cores the rollout engine and the trainer use on a CPU-only machine.

The engine's processes keep their cores for good; the trainer narrows to the rest while the
engine generates (it scores finished answers meanwhile) and widens to every core while the
engine is idle.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch


def split_cpus(engine_cpus: int) -> tuple[set[int], set[int]] | None:
    """``(engine cores, trainer cores)`` out of this process's cores, or None to share
    them all (one core, or ``engine_cpus`` asks for every core)."""
    cores = sorted(os.sched_getaffinity(0))
    wanted = engine_cpus or len(cores) // 2
    if len(cores) < 2 or not 1 <= wanted < len(cores):
        return None
    return set(cores[:wanted]), set(cores[wanted:])


def pin_process(cores: set[int]) -> None:
    """Every thread of this process (the torch/OpenMP workers too: ``sched_setaffinity(0)``
    moves only the calling thread) onto ``cores``."""
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(int(task.name), cores)


class CorePlacement:
    """The CPU split between the rollout engine and the trainer (this process).

    The engine's processes keep ``engine`` cores for good (they inherit them at start-up).
    The trainer keeps to the other cores while the engine generates (:meth:`narrow`; it
    scores finished answers meanwhile) and takes every core, with as many torch threads as
    it had, while the engine is idle (:meth:`widen`): scoring the last answers and the
    update then use the whole machine instead of leaving the engine's cores idle."""

    def __init__(self, engine: set[int], trainer: set[int]) -> None:
        self.engine, self.trainer = engine, trainer
        self.every = os.sched_getaffinity(0)
        self.threads = torch.get_num_threads()

    def narrow(self) -> None:
        pin_process(self.trainer)
        torch.set_num_threads(max(1, min(self.threads, len(self.trainer))))

    def widen(self) -> None:
        pin_process(self.every)  # first: new worker threads inherit the caller's cores
        torch.set_num_threads(self.threads)
