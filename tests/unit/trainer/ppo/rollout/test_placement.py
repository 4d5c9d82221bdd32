"""Tests of :mod:`trainer.ppo.rollout.placement`."""

from __future__ import annotations

import os

from trainer.ppo.rollout.placement import split_cpus


def test_cpus_split_between_the_rollout_engine_and_the_trainer():
    cores = sorted(os.sched_getaffinity(0))
    split = split_cpus(0)
    if len(cores) < 2:
        assert split is None
        return
    engine, trainer = split
    assert engine and trainer and not engine & trainer
    assert sorted(engine | trainer) == cores and len(engine) == len(cores) // 2
    assert split_cpus(1) == ({cores[0]}, set(cores[1:]))
    assert split_cpus(len(cores)) is None  # every core for the engine: no pinning
