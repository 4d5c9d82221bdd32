"""Held-out evaluation of a reward model and the gate a new version must pass.

:func:`evaluate`: pairwise accuracy, thumbs AUC, reward mean/std per label. :func:`gate`:
accepted only if the metrics are shown better than chance and not shown below the
configured bars (one-sided confidence bounds, :mod:`trainer.reward.losses`), and the
candidate does not trail the current version on the same data by more than the tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from feedback.datasets import PointwiseLabel, PreferencePair
from trainer.reward.config import RewardConfig
from trainer.reward.losses import (
    accuracy_bounds,
    auc,
    auc_bounds,
    pairwise_accuracy,
)
from trainer.reward.model import (
    RewardModel,
)


def _stats(values: torch.Tensor) -> dict[str, float | int | None]:
    if values.numel() == 0:
        return {"n": 0, "mean": None, "std": None}
    std = float(values.std()) if values.numel() > 1 else 0.0
    return {"n": values.numel(), "mean": round(float(values.mean()), 4), "std": round(std, 4)}


def evaluate(
    model: RewardModel, pairs: Sequence[PreferencePair], labels: Sequence[PointwiseLabel]
) -> dict[str, Any]:
    """Held-out metrics: pairwise accuracy, thumbs AUC, reward mean/std per label."""
    model.train(False)
    r_chosen = model.score([p.messages for p in pairs], [p.chosen for p in pairs])
    r_rejected = model.score([p.messages for p in pairs], [p.rejected for p in pairs])
    r_labeled = model.score([x.messages for x in labels], [x.answer for x in labels])
    y = torch.tensor([1 if x.label == "up" else 0 for x in labels], dtype=torch.long)
    accuracy = pairwise_accuracy(r_chosen, r_rejected)
    thumbs_auc = auc(r_labeled, y)
    return {
        "pairwise_accuracy": None if accuracy is None else round(accuracy, 4),
        "n_pairs": len(pairs),
        "auc": None if thumbs_auc is None else round(thumbs_auc, 4),
        "n_labels": len(labels),
        "n_up": int(y.sum()),
        "reward": {
            "up": _stats(r_labeled[y == 1]),
            "down": _stats(r_labeled[y == 0]),
            "chosen": _stats(r_chosen),
            "rejected": _stats(r_rejected),
        },
    }


def gate(
    metrics: dict[str, Any],
    parent_metrics: dict[str, Any] | None,
    config: RewardConfig,
    parent_version: str | None = None,
) -> tuple[bool, str]:
    """Accept or reject a candidate; the reason is recorded either way.

    Live labels are noisy and a round's held-out sample can be small, so each held-out
    metric is judged with its confidence bounds (:func:`_bounds`): the version is accepted
    when at least one metric is shown better than chance (lower bound > 0.5), no metric is
    shown below its bar (upper bound < bar), and it does not trail the current version on
    the same held-out data by more than the tolerance."""
    bounds = _bounds(metrics, config.gate_confidence)
    if not bounds:
        return False, "no held-out pairs and no two-sided thumbs: nothing to evaluate on"
    problems = []
    bars = {"pairwise_accuracy": config.min_pairwise_accuracy, "auc": config.min_auc}
    for name, (_, upper) in bounds.items():
        if upper < bars[name]:
            problems.append(
                f"held-out {_LABEL[name]} {metrics[name]:.4f} < bar {bars[name]} "
                f"(upper bound {upper:.4f})"
            )
    if not problems and all(lower <= 0.5 for lower, _ in bounds.values()):
        problems.append(
            "not shown better than chance: "
            + ", ".join(
                f"{_LABEL[name]} {metrics[name]:.4f} on {_sample(metrics, name)} "
                f"({config.gate_confidence:.0%} lower bound {lower:.4f} <= 0.5)"
                for name, (lower, _) in bounds.items()
            )
        )
    if parent_metrics is not None:
        for name in ("pairwise_accuracy", "auc"):
            new, old = metrics.get(name), parent_metrics.get(name)
            if new is not None and old is not None and new < old - config.regression_tolerance:
                problems.append(
                    f"held-out {name} {new:.4f} is worse than {parent_version}'s {old:.4f} on "
                    f"the same data by more than {config.regression_tolerance}"
                )
    if problems:
        return False, "; ".join(problems)
    summary = ", ".join(
        f"{name} {metrics[name]:.4f} on {_sample(metrics, name)} (lower bound {lower:.4f})"
        for name, (lower, _) in bounds.items()
    )
    against = f" (current was {parent_version})" if parent_version else ""
    return True, f"passed the gate: {summary}{against}"


_LABEL = {"pairwise_accuracy": "pairwise accuracy", "auc": "thumbs AUC"}


def _sample(metrics: dict[str, Any], name: str) -> str:
    if name == "pairwise_accuracy":
        return f"{metrics.get('n_pairs', '?')} pairs"
    return f"{metrics.get('n_labels', '?')} labels"


def _bounds(metrics: dict[str, Any], confidence: float) -> dict[str, tuple[float, float]]:
    """(lower, upper) confidence bounds of each held-out metric that was measured. Metrics
    recorded without their sample sizes (older versions) count as exact."""
    bounds = {}
    accuracy, thumbs_auc = metrics.get("pairwise_accuracy"), metrics.get("auc")
    if accuracy is not None:
        bounds["pairwise_accuracy"] = (
            accuracy_bounds(accuracy, metrics["n_pairs"], confidence)
            if "n_pairs" in metrics
            else (accuracy, accuracy)
        )
    if thumbs_auc is not None:
        n_up = metrics.get("n_up")
        bounds["auc"] = (
            auc_bounds(thumbs_auc, n_up, metrics["n_labels"] - n_up, confidence)
            if n_up is not None
            else (thumbs_auc, thumbs_auc)
        )
    return bounds
