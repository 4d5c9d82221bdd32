"""Reward losses and metrics against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.reward.losses import (
    accuracy_bounds,
    auc,
    auc_bounds,
    bradley_terry_loss,
    pairwise_accuracy,
    pointwise_logistic_loss,
    reward_loss,
)


def test_bradley_terry_matches_hand_computation() -> None:
    # -log sigmoid(2) = log(1 + e^-2) = 0.126928; -log sigmoid(0) = log 2 = 0.693147
    loss = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert loss.item() == pytest.approx((math.log1p(math.exp(-2)) + math.log(2)) / 2)
    assert loss.item() == pytest.approx(0.410038, abs=1e-6)


def test_bradley_terry_depends_only_on_the_difference() -> None:
    a = bradley_terry_loss(torch.tensor([1.5]), torch.tensor([0.5]))
    b = bradley_terry_loss(torch.tensor([101.5]), torch.tensor([100.5]))
    assert a.item() == pytest.approx(b.item())
    # a wrongly ordered pair costs more than a right one
    wrong = bradley_terry_loss(torch.tensor([0.5]), torch.tensor([1.5]))
    assert wrong.item() == pytest.approx(math.log1p(math.exp(1.0)))


def test_bradley_terry_gradient() -> None:
    chosen = torch.tensor([1.0], requires_grad=True)
    rejected = torch.tensor([0.0], requires_grad=True)
    bradley_terry_loss(chosen, rejected).backward()
    # d/d r_chosen of -log sigmoid(d) is -(1 - sigmoid(d)) = -sigmoid(-1) = -0.268941
    assert chosen.grad.item() == pytest.approx(-0.268941, abs=1e-6)
    assert rejected.grad.item() == pytest.approx(0.268941, abs=1e-6)


def test_bradley_terry_is_stable_for_large_margins() -> None:
    loss = bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([200.0]))
    assert loss.item() == pytest.approx(400.0)


def test_pointwise_logistic_matches_hand_computation() -> None:
    # up at 0: -log sigmoid(0) = 0.693147; down at 2: -log(1 - sigmoid(2)) = log(1 + e^2)
    loss = pointwise_logistic_loss(torch.tensor([0.0, 2.0]), torch.tensor([1, 0]))
    assert loss.item() == pytest.approx((math.log(2) + math.log1p(math.exp(2))) / 2)
    assert loss.item() == pytest.approx(1.410038, abs=1e-6)


def test_combined_loss_weights_the_pointwise_term() -> None:
    total = reward_loss(
        torch.tensor([2.0, 0.0]),
        torch.tensor([0.0, 0.0]),
        torch.tensor([0.0, 2.0]),
        torch.tensor([1, 0]),
        pointwise_weight=0.5,
    )
    assert total.item() == pytest.approx(0.410038 + 0.5 * 1.410038, abs=1e-6)
    pairs_only = reward_loss(
        torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([5.0]), torch.tensor([0]), 0.0
    )
    assert pairs_only.item() == pytest.approx(math.log1p(math.exp(-2)))


def test_empty_batches_contribute_zero() -> None:
    empty = torch.zeros(0)
    assert bradley_terry_loss(empty, empty).item() == 0.0
    assert pointwise_logistic_loss(empty, empty).item() == 0.0
    only_labels = reward_loss(empty, empty, torch.tensor([0.0]), torch.tensor([1]), 1.0)
    assert only_labels.item() == pytest.approx(math.log(2))


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError):
        pointwise_logistic_loss(torch.zeros(2), torch.zeros(1))


def test_pairwise_accuracy_counts_ties_half() -> None:
    chosen = torch.tensor([1.0, 0.0, 2.0, 3.0])
    rejected = torch.tensor([0.0, 1.0, 2.0, 1.0])
    assert pairwise_accuracy(chosen, rejected) == pytest.approx(2.5 / 4)
    assert pairwise_accuracy(torch.zeros(0), torch.zeros(0)) is None


def test_auc_by_hand() -> None:
    # positives {0.9, 0.5} vs negatives {0.1, 0.5}: 1 + 1 + 1 + 0.5 (tie) of 4
    scores = torch.tensor([0.9, 0.1, 0.5, 0.5])
    labels = torch.tensor([1, 0, 1, 0])
    assert auc(scores, labels) == pytest.approx(0.875)
    assert auc(scores, torch.ones(4, dtype=torch.long)) is None


def test_accuracy_bounds_are_the_one_sided_wilson_bounds() -> None:
    from scipy.stats import binomtest

    # The one-sided 95 % bound is the lower end of the two-sided 90 % Wilson interval.
    expected = binomtest(60, 100).proportion_ci(confidence_level=0.90, method="wilson")
    lower, upper = accuracy_bounds(0.6, 100, 0.95)
    assert (lower, upper) == pytest.approx((expected.low, expected.high), abs=1e-12)
    assert lower == pytest.approx(0.51781, abs=1e-5)
    assert accuracy_bounds(0.6, 10_000, 0.95)[0] > 0.59  # more pairs, tighter
    assert accuracy_bounds(0.9, 0, 0.95) == (0.0, 1.0)


def test_auc_bounds_use_hanley_mcneil() -> None:
    # AUC 0.8 on 10 positives, 20 negatives: Q1 = 0.8/1.2, Q2 = 2·0.64/1.8,
    # var = (0.16 + 9(Q1 − 0.64) + 19(Q2 − 0.64)) / 200 = 0.0087556, se = 0.093571,
    # lower = 0.8 − 1.644854 · 0.093571.
    lower, upper = auc_bounds(0.8, 10, 20, 0.95)
    assert lower == pytest.approx(0.646089, abs=1e-6)
    assert upper == pytest.approx(0.953911, abs=1e-6)
    assert auc_bounds(0.8, 0, 20, 0.95) == (0.0, 1.0)
