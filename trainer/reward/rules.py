"""Rule-based reward terms and the composed reward PPO optimises.

The reward PPO sees is ``reward_model.score(...) + sum(weight_i * rule_i(...))`` over the
rules named in the configuration (``RewardConfig.rules``), e.g.::

    [{"name": "length_penalty", "weight": 1.0, "max_words": 30},
     {"name": "regex_format", "weight": 0.5, "pattern": "^[A-Z]"}]

A rule is a small named function ``(messages, answer, **params) -> float`` registered with
:func:`rule`; adding one is writing such a function here (or in any imported module) — the
trainer looks rules up by name and never changes. Unknown names and bad parameters fail
when the rules are built, before any training.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from trainer.reward.model import Messages, RewardModel

RuleFunction = Callable[..., float]
RULES: dict[str, RuleFunction] = {}
"""Registered rules by name."""


def rule(name: str) -> Callable[[RuleFunction], RuleFunction]:
    """Register ``fn`` as the rule ``name`` (a decorator)."""

    def register(fn: RuleFunction) -> RuleFunction:
        if name in RULES:
            raise ValueError(f"reward rule {name!r} is already registered")
        RULES[name] = fn
        return fn

    return register


@rule("length_penalty")
def length_penalty(
    messages: Messages, answer: str, *, max_words: int = 40, per_word: float = 0.05
) -> float:
    """``-per_word`` for every word beyond ``max_words``: discourages padding that a reward
    model trained on short-answer feedback has never seen and may score arbitrarily."""
    return -per_word * max(0, len(answer.split()) - max_words)


@rule("regex_format")
def regex_format(
    messages: Messages, answer: str, *, pattern: str, bonus: float = 1.0, penalty: float = 0.0
) -> float:
    """``bonus`` if the answer matches ``pattern`` (``re.search``), else ``-penalty``: a
    format requirement (a JSON object, a closing citation) checked exactly."""
    return bonus if re.search(pattern, answer) else -penalty


@rule("empty_answer")
def empty_answer(messages: Messages, answer: str, *, penalty: float = 1.0) -> float:
    """``-penalty`` for an empty or whitespace-only answer."""
    return -penalty if not answer.strip() else 0.0


@dataclass(frozen=True)
class BoundRule:
    """A registered rule with its weight and parameters from the configuration."""

    name: str
    weight: float
    params: dict[str, Any] = field(default_factory=dict)

    def __call__(self, messages: Messages, answer: str) -> float:
        return self.weight * RULES[self.name](messages, answer, **self.params)


def build_rules(specs: Sequence[dict[str, Any]]) -> list[BoundRule]:
    """Bind configured rule specs (``name``, optional ``weight``, the rule's parameters);
    raises ``ValueError`` for an unknown rule or a parameter it does not take."""
    bound = []
    for spec in specs:
        params = dict(spec)
        name = params.pop("name", None)
        weight = float(params.pop("weight", 1.0))
        if name not in RULES:
            raise ValueError(f"unknown reward rule {name!r}; known: {sorted(RULES)}")
        try:
            inspect.signature(RULES[name]).bind(None, "", **params)
        except TypeError as exc:
            raise ValueError(f"reward rule {name!r}: {exc}") from exc
        bound.append(BoundRule(name, weight, params))
    return bound


class ComposedReward:
    """Reward model score plus weighted rules: what PPO calls per batch of rollouts."""

    def __init__(self, model: RewardModel, rules: Sequence[BoundRule] = ()) -> None:
        self.model = model
        self.rules = list(rules)

    def __call__(self, conversations: Sequence[Messages], answers: Sequence[str]) -> torch.Tensor:
        return self.components(conversations, answers)["total"]

    def components(
        self, conversations: Sequence[Messages], answers: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """Each term separately (``model``, one per rule name; a repeated name gets ``#i``)
        and their ``total``, so PPO can log what drove the reward."""
        parts = {"model": self.model.score(conversations, answers)}
        for i, bound in enumerate(self.rules):
            values = [bound(m, a) for m, a in zip(conversations, answers, strict=True)]
            key = bound.name if bound.name not in parts else f"{bound.name}#{i}"
            parts[key] = torch.tensor(values, dtype=torch.float32)
        parts["total"] = torch.stack(list(parts.values())).sum(dim=0)
        return parts
