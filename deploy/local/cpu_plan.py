"""Which cores each process of ``alignloop up`` may use on a CPU-only machine.

Every torch/OpenMP pool assumes it owns the machine: with serving's vLLM engine and the
trainer both spinning their worker threads on the same two cores, one PPO iteration took
minutes under chat load instead of seconds (docs/benchmarks.md, "A round idle and under
load"). So the embedded stack splits the cores: the trainer gets ``trainer_cpu_share`` of
them (at least one), serving (API process and engine) the rest, and the light processes
(ingestor, canary controller) float over all cores with one thread each. :func:`plan` is
pure; the supervisor passes each child its cores in ``ALIGNLOOP_CPUS`` and :func:`apply`
(called first thing by the ``alignloop`` entry point, before torch or vLLM start a thread)
pins the process and sizes its thread pools.
"""

from __future__ import annotations

import os
from collections.abc import Collection, MutableMapping
from dataclasses import dataclass

ENV = "ALIGNLOOP_CPUS"
THREAD_POOLS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass(frozen=True)
class CpuPlan:
    serving: tuple[int, ...]
    trainer: tuple[int, ...]
    light: tuple[int, ...]
    """Cores the light processes float over (one thread each)."""


def plan(cores: Collection[int], trainer_share: float) -> CpuPlan | None:
    """Split ``cores``: the trainer takes ``round(share · n)`` of them (at least 1, at most
    n − 1) from the top, serving the rest. None when there is nothing to split (one core,
    or a share of 0)."""
    ordered = tuple(sorted(cores))
    if len(ordered) < 2 or trainer_share <= 0:
        return None
    n_trainer = min(len(ordered) - 1, max(1, round(trainer_share * len(ordered))))
    cut = len(ordered) - n_trainer
    return CpuPlan(serving=ordered[:cut], trainer=ordered[cut:], light=ordered)


def format_cpus(cores: Collection[int]) -> str:
    return ",".join(str(c) for c in sorted(cores))


def child_env(cores: Collection[int], threads: int, *, vllm: bool = False) -> dict[str, str]:
    """The environment that gives a child ``cores`` and ``threads`` threads per pool;
    ``vllm``: the child runs a vLLM CPU engine, whose OpenMP threads are bound there too."""
    env = {ENV: format_cpus(cores)}
    env.update({pool: str(threads) for pool in THREAD_POOLS})
    if vllm:
        # vLLM's CPU worker binds one OpenMP thread per listed core (its default, "auto",
        # would take every core of the NUMA node whatever this process's affinity says).
        env["VLLM_CPU_OMP_THREADS_BIND"] = format_cpus(cores)
    return env


def apply(environ: MutableMapping[str, str] | None = None) -> tuple[int, ...] | None:
    """Pin this process to the cores ``ALIGNLOOP_CPUS`` names (nothing when unset) and
    return them. Must run before any thread pool starts: threads made later inherit it."""
    environ = os.environ if environ is None else environ
    value = environ.get(ENV, "").strip()
    if not value:
        return None
    cores = tuple(sorted({int(c) for c in value.split(",")}))
    os.sched_setaffinity(0, cores)
    return cores
