"""The caches of oneDNN computations PyTorch keeps per product shape, bounded for a training
process.

PyTorch runs a CPU product through oneDNN under bfloat16 autocast (and in the decode loop's
laid-out products, :mod:`trainer.common.onednn_layout`). Two caches keep what it built for
a shape, for the next product of that shape: oneDNN's own (its compiled kernels, the
``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` most recent) and that of ideep, the C++ wrapper PyTorch
calls oneDNN through (the ``LRU_CACHE_CAPACITY`` most recent computations, each holding its
kernel alive past oneDNN's cache). Both keep 1,024 unless the environment says otherwise,
and every entry holds memory. Serving a fixed model, a few dozen shapes come back again and
again. A training process meets new ones all the time: every micro-batch has its own width,
every decode step of a rollout batch its own number of rows still writing; the caches fill
over a round, and what they hold stays live. 300 bfloat16 products of 300 shapes left 573
MB live at the defaults, 45 MB with both caches at 64. On the PPO benchmark at 31 M
parameters (an AMX CPU), alignloop's training-only peak was 335 MB at the defaults against
260 bounded, and at SmolLM2 705-712 against 597-611 MB, at the same episodes/s
(docs/benchmarks.md, "Bounded caches of oneDNN computations").

Each cache reads its capacity once, when the first product needs it, so
:func:`bound_computation_caches` runs before the process multiplies anything. An operator's
own setting of either variable is kept (``LRU_CACHE_CAPACITY=0`` is not "no cache":
torch 2.13 crashes on it).
"""

from __future__ import annotations

import os

ENVS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
"""The environment variables oneDNN and ideep read their caches' capacities from."""

CAPACITY = 64
"""Entries each cache keeps. At 31 M parameters the benchmark ran as fast with both at 64
as at the defaults; ideep's alone at 256 peaked as high as at 1,024 (docs/benchmarks.md,
"Bounded caches of oneDNN computations")."""


def bound_computation_caches(capacity: int = CAPACITY) -> dict[str, str]:
    """Keep at most ``capacity`` entries in each cache, unless the environment names a
    capacity for it already; returns each variable's value in effect. Call it before the
    first product: later, the caches have read their capacities."""
    if capacity < 1:
        raise ValueError(f"capacity must be at least 1, not {capacity}")
    return {name: os.environ.setdefault(name, str(capacity)) for name in ENVS}
