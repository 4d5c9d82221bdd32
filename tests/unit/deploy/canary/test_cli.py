"""``alignloop canary``'s command line: flags generated from CanaryConfig override the
production or demo values."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from deploy.canary.cli import build_parser, config_from_args
from deploy.canary.stats import (
    CanaryConfig,
)

DEMO = CanaryConfig.demo()


def _args(*argv: str):
    settings = SimpleNamespace(
        database_url=None, admin_port=0, admin_host="127.0.0.1", served_model_name="house-model"
    )
    return build_parser(settings).parse_args(list(argv))


def test_cli_overrides_honour_zero_and_the_test() -> None:
    assert config_from_args(_args()) == CanaryConfig()
    assert config_from_args(_args("--demo")) == DEMO
    cfg = config_from_args(_args("--demo", "--test", "non_inferiority", "--margin", "0"))
    assert (cfg.test, cfg.margin, cfg.threshold) == ("non_inferiority", 0.0, 0.0)
    assert cfg.min_votes_per_arm == DEMO.min_votes_per_arm
    assert config_from_args(_args("--alpha", "0.01")).alpha == 0.01
    with pytest.raises(SystemExit):
        _args("--test", "better")


def test_cli_generates_a_flag_per_config_field_and_names_the_served_model() -> None:
    assert config_from_args(_args("--stages", "[0.1, 0.3, 0.6]")).stages == (0.1, 0.3, 0.6)
    cfg = config_from_args(
        _args("--demo", "--no-guardrails-override-hold", "--min-votes-per-arm", "7")
    )
    assert (cfg.guardrails_override_hold, cfg.min_votes_per_arm) == (False, 7)
    assert cfg.srm_p_value == DEMO.srm_p_value
    assert _args().model_name == "house-model"
    assert _args("--model-name", "other").model_name == "other"
