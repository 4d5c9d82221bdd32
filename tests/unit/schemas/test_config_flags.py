"""Tests of :mod:`schemas.config_flags`."""

from __future__ import annotations

import argparse

import pytest

from schemas.config_flags import add_config_flags, config_from_namespace
from trainer.rounds.config import RoundConfig


def test_flags_cover_nested_ppo_config():
    parser = argparse.ArgumentParser()
    add_config_flags(parser, RoundConfig)
    values = vars(
        parser.parse_args(
            [
                "--iterations",
                "3",
                "--rollout-batch-size",
                "32",
                "--mini-batch-size",
                "8",
                "--no-whiten-advantages",
                "--rules",
                '[{"name": "empty_answer"}]',
            ]
        )
    )
    config = config_from_namespace(RoundConfig, values)
    assert config.iterations == 3
    assert config.ppo.rollout_batch_size == 32 and config.ppo.mini_batch_size == 8
    assert config.ppo.whiten_advantages is False
    assert config.rules == [{"name": "empty_answer"}]
    with pytest.raises(ValueError, match="mini_batch_size"):
        config_from_namespace(RoundConfig, {**values, "mini_batch_size": 7})


@pytest.mark.parametrize("overrides_only", [False, True])
def test_help_renders_a_literal_percent_sign(overrides_only: bool) -> None:
    """argparse %-formats help text; a field's "within 1 % of" must print, not raise."""
    parser = argparse.ArgumentParser()
    add_config_flags(parser, RoundConfig, overrides_only=overrides_only)
    text = " ".join(parser.format_help().split())
    assert "within 1 % of exact" in text
    assert "--activation-checkpointing" in text
