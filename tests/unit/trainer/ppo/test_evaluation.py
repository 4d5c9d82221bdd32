"""Tests of :mod:`trainer.ppo.evaluation`."""

from __future__ import annotations

import pytest
import torch

from trainer.ppo.evaluation import distinct_n, win_rate


def test_distinct_n_by_hand():
    texts = ["a b a b", "a b c"]
    # unigrams: a b a b a b c -> 3 unique of 7; bigrams: ab ba ab | ab bc -> 3 unique of 5
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    assert distinct_n(["one"], 2) == 0.0


def test_win_rate_counts_ties_half():
    candidate = torch.tensor([1.0, 2.0, 3.0, 0.0])
    stable = torch.tensor([0.0, 2.0, 4.0, -1.0])
    assert win_rate(candidate, stable) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert win_rate(torch.zeros(0), torch.zeros(0)) == 0.0
