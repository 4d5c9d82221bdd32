"""Tests of :mod:`trainer.reward.cli`."""

from __future__ import annotations

from pathlib import Path

from trainer.reward.cli import config_from_args


def test_cli_flags_come_from_the_config(tmp_path: Path) -> None:
    config = config_from_args(
        [
            "--database-url",
            "postgresql://x/y",
            "--state-dir",
            str(tmp_path),
            "--base-model",
            str(tmp_path / "base"),
            "--steps",
            "7",
            "--lr",
            "0.01",
            "--no-warm-start",
            "--rules",
            '[{"name": "length_penalty"}]',
        ]
    )
    assert config.steps == 7 and config.lr == 0.01 and config.warm_start is False
    assert config.rules == [{"name": "length_penalty"}]
    assert config.base_model == (tmp_path / "base").resolve()
