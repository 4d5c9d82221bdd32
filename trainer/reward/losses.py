"""The reward model's losses: pure functions of reward tensors, no model, no data loading.

* Pairs (explicit A-vs-B preferences, and an up-rated vs a down-rated answer to one prompt)
  train with the Bradley-Terry loss ``-log sigmoid(r_chosen - r_rejected)``: only the
  difference of two rewards is learned, which is what PPO's advantage needs.
* Thumbs up/down on single answers train with a logistic loss on the reward itself
  (``up`` = 1), weighted: it anchors the reward's zero (up-rated answers positive) and uses
  the ratings that never form a pair (a prompt answered once).

An empty batch contributes 0 (with a gradient path), so a round with no pairs or no labels
needs no special casing in the loop.

The held-out metrics (pairwise accuracy, thumbs AUC) and their one-sided lower confidence
bounds, which the version gate compares with its bars, live here too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Mean of ``-log sigmoid(r_chosen - r_rejected)`` (``softplus(-(diff))``, stable)."""
    if r_chosen.shape != r_rejected.shape:
        raise ValueError(f"shapes differ: {tuple(r_chosen.shape)} vs {tuple(r_rejected.shape)}")
    if r_chosen.numel() == 0:
        return r_chosen.sum() * 0.0
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def pointwise_logistic_loss(rewards: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of ``sigmoid(reward)`` against labels (1 up, 0 down)."""
    if rewards.shape != labels.shape:
        raise ValueError(f"shapes differ: {tuple(rewards.shape)} vs {tuple(labels.shape)}")
    if rewards.numel() == 0:
        return rewards.sum() * 0.0
    return F.binary_cross_entropy_with_logits(rewards, labels.to(rewards.dtype))


def reward_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    r_labeled: torch.Tensor,
    labels: torch.Tensor,
    pointwise_weight: float,
) -> torch.Tensor:
    """The training objective: Bradley-Terry on pairs + ``pointwise_weight`` x logistic."""
    pairwise = bradley_terry_loss(r_chosen, r_rejected)
    if pointwise_weight == 0:
        return pairwise
    return pairwise + pointwise_weight * pointwise_logistic_loss(r_labeled, labels)


def pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float | None:
    """Share of pairs the rewards order correctly (a tie counts half); None with no pairs."""
    if r_chosen.numel() == 0:
        return None
    diff = r_chosen - r_rejected
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float | None:
    """ROC AUC of scores for labels (1 positive): P(score of a positive > a negative), ties
    half (Mann-Whitney). None unless both classes occur."""
    positive = scores[labels == 1]
    negative = scores[labels == 0]
    if positive.numel() == 0 or negative.numel() == 0:
        return None
    diff = positive[:, None] - negative[None, :]
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


def _z(confidence: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(confidence)


def accuracy_bounds(accuracy: float, n: int, confidence: float) -> tuple[float, float]:
    """One-sided Wilson confidence bounds (lower, upper), each at ``confidence``, of a share
    ``accuracy`` over ``n`` trials. With noisy labels a reward model's held-out accuracy tops
    out well below 1, so "better than chance" is a question of evidence, not of a fixed bar.
    (0, 1) for ``n = 0``."""
    if n <= 0:
        return 0.0, 1.0
    z = _z(confidence)
    centre = accuracy + z * z / (2 * n)
    spread = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    return (centre - spread) / scale, (centre + spread) / scale


def auc_bounds(
    value: float, n_positive: int, n_negative: int, confidence: float
) -> tuple[float, float]:
    """One-sided confidence bounds (lower, upper) of a ROC AUC from ``n_positive`` and
    ``n_negative`` examples, with the Hanley & McNeil (1982) standard error. (0, 1) when a
    class is empty."""
    if n_positive <= 0 or n_negative <= 0:
        return 0.0, 1.0
    q1 = value / (2 - value)
    q2 = 2 * value * value / (1 + value)
    variance = (
        value * (1 - value)
        + (n_positive - 1) * (q1 - value * value)
        + (n_negative - 1) * (q2 - value * value)
    ) / (n_positive * n_negative)
    radius = _z(confidence) * math.sqrt(max(variance, 0.0))
    return value - radius, value + radius
