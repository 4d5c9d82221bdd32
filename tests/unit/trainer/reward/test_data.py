"""Tests of :mod:`trainer.reward.data`."""

from __future__ import annotations

from trainer.reward.data import batch_indices


def test_batches_are_a_pure_function_of_seed_and_step() -> None:
    assert batch_indices(10, 4, 3, seed=7) == batch_indices(10, 4, 3, seed=7)
    assert batch_indices(10, 4, 0, seed=7) != batch_indices(10, 4, 0, seed=8)
    assert batch_indices(0, 4, 3, seed=7) == []


def test_each_epoch_visits_every_example_once() -> None:
    stream = [i for step in range(5) for i in batch_indices(10, 4, step, seed=1)]
    assert sorted(stream[:10]) == list(range(10))
    assert sorted(stream[10:20]) == list(range(10))
