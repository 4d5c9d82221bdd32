"""Tests of :mod:`trainer.rounds.training_round`."""

from __future__ import annotations

from trainer.rounds.training_round import iteration_prompts


def test_iteration_prompts_are_a_pure_function_of_the_iteration():
    pool = list(range(100))
    first = iteration_prompts(pool, 3, 10, seed=1)
    assert first == iteration_prompts(pool, 3, 10, seed=1)
    assert first != iteration_prompts(pool, 4, 10, seed=1)
    assert len(set(first)) == 10  # without replacement while the pool is large enough
    assert len(iteration_prompts(pool[:4], 0, 10, seed=1)) == 10  # with, when it is not
