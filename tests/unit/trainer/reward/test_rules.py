"""Rule-based reward terms: the registry, binding from config, composition."""

from __future__ import annotations

import pytest
import torch

from trainer.reward.rules import RULES, ComposedReward, build_rules, rule

MSGS = [{"role": "user", "content": "What is 2 plus 2?"}]


def test_length_penalty_counts_words_beyond_the_limit() -> None:
    (penalty,) = build_rules([{"name": "length_penalty", "max_words": 3, "per_word": 0.5}])
    assert penalty(MSGS, "four") == 0.0
    assert penalty(MSGS, "it is four , really") == pytest.approx(-1.0)


def test_regex_format_and_weight() -> None:
    (check,) = build_rules(
        [{"name": "regex_format", "weight": 2.0, "pattern": r"^\d+\.$", "penalty": 1.0}]
    )
    assert check(MSGS, "4.") == 2.0
    assert check(MSGS, "four") == -2.0


def test_unknown_rule_and_bad_parameters_fail_when_built() -> None:
    with pytest.raises(ValueError, match="unknown reward rule"):
        build_rules([{"name": "no_such_rule"}])
    with pytest.raises(ValueError, match="length_penalty"):
        build_rules([{"name": "length_penalty", "max_wrds": 3}])
    with pytest.raises(ValueError, match="regex_format"):
        build_rules([{"name": "regex_format"}])  # pattern is required


class _FixedModel:
    def score(self, conversations, answers) -> torch.Tensor:
        return torch.tensor([1.0] * len(answers))


def test_composed_reward_adds_rules_to_the_model_score() -> None:
    rules = build_rules([{"name": "length_penalty", "max_words": 1, "per_word": 0.25}])
    # a stand-in for RewardModel with only score(), all that ComposedReward calls
    reward = ComposedReward(_FixedModel(), rules)  # type: ignore[arg-type]
    parts = reward.components([MSGS, MSGS], ["four", "it is four"])
    assert parts["model"].tolist() == [1.0, 1.0]
    assert parts["length_penalty"].tolist() == [0.0, -0.5]
    assert reward([MSGS, MSGS], ["four", "it is four"]).tolist() == [1.0, 0.5]


def test_a_new_rule_needs_only_registration() -> None:
    @rule("test_mentions_four")
    def mentions_four(messages, answer, *, bonus: float = 1.0) -> float:
        return bonus if "four" in answer else 0.0

    try:
        (bound,) = build_rules([{"name": "test_mentions_four", "bonus": 3.0}])
        assert bound(MSGS, "four") == 3.0
        with pytest.raises(ValueError, match="already registered"):
            rule("test_mentions_four")(mentions_four)
    finally:
        RULES.pop("test_mentions_four")
