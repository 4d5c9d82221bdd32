"""PPOConfig: the defaults are valid and documented; bad values fail with clear messages."""

from __future__ import annotations

import json
import math
from dataclasses import fields

import pytest

from trainer.ppo.config import PPOConfig
from trainer.ppo.core import AdaptiveKLController, FixedKLController


def test_defaults_are_valid_and_follow_the_papers() -> None:
    config = PPOConfig()
    assert (config.rollout_batch_size, config.mini_batch_size, config.ppo_epochs) == (512, 64, 1)
    assert (config.clip_range, config.value_clip_range) == (0.2, 0.2)
    assert (config.gamma, config.lam) == (1.0, 0.95)
    assert (config.kl_estimator, config.kl_mode, config.init_kl_coef) == ("k1", "fixed", 0.02)
    assert (config.entropy_coef, config.ptx_coef, config.max_grad_norm) == (0.0, 0.0, 1.0)
    assert config.gradient_steps_per_iteration == 8
    json.dumps(config.to_json())


def test_every_field_is_documented() -> None:
    for f in fields(PPOConfig):
        assert len(f.metadata.get("help", "")) > 20, f.name


def test_kl_controller_follows_the_mode() -> None:
    fixed = PPOConfig().kl_controller()
    assert isinstance(fixed, FixedKLController) and fixed.value == 0.02
    adaptive = PPOConfig(kl_mode="adaptive", init_kl_coef=0.1).kl_controller()
    assert isinstance(adaptive, AdaptiveKLController)
    assert (adaptive.value, adaptive.target, adaptive.horizon) == (0.1, 6.0, 10000)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rollout_batch_size": 0}, "rollout_batch_size must be at least 1, got 0"),
        ({"ppo_epochs": 0}, "ppo_epochs must be at least 1"),
        ({"max_new_tokens": -3}, "max_new_tokens must be at least 1"),
        ({"checkpoint_every": 0}, "checkpoint_every must be at least 1"),
        ({"mini_batch_size": 48}, "mini_batch_size must divide rollout_batch_size \\(512\\)"),
        ({"mini_batch_size": 1024}, "mini_batch_size must divide"),
        ({"actor_lr": 0.0}, "actor_lr must be > 0"),
        ({"critic_lr": -1e-5}, "critic_lr must be > 0"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"max_grad_norm": 0.0}, "max_grad_norm must be > 0"),
        ({"clip_range": 0.0}, "clip_range must be in \\(0, 1\\)"),
        ({"clip_range": 1.5}, "clip_range must be in \\(0, 1\\), got 1.5"),
        ({"value_clip_range": -0.2}, "value_clip_range must be > 0"),
        ({"vf_coef": -0.5}, "vf_coef must be >= 0"),
        ({"entropy_coef": -0.01}, "entropy_coef must be >= 0"),
        ({"ptx_coef": -1.0}, "ptx_coef must be >= 0"),
        ({"approx_kl_stop": -0.1}, "approx_kl_stop must be >= 0"),
        ({"init_kl_coef": -0.02}, "init_kl_coef must be >= 0"),
        ({"target_kl": 0.0}, "target_kl must be > 0"),
        ({"kl_horizon": 0}, "kl_horizon must be at least 1"),
        ({"gamma": 1.01}, "gamma must be in \\[0, 1\\]"),
        ({"lam": -0.1}, "lam must be in \\[0, 1\\]"),
        ({"lam": math.nan}, "lam must be in \\[0, 1\\], got nan"),
        ({"reward_clip": 0.0}, "reward_clip must be > 0"),
        ({"lr_warmup_iterations": -1}, "lr_warmup_iterations must be >= 0"),
        ({"critic_warmup_iterations": -1}, "critic_warmup_iterations must be >= 0"),
        ({"kl_estimator": "k2"}, "kl_estimator must be one of \\('k1', 'k3'\\), got 'k2'"),
        ({"kl_mode": "auto"}, "kl_mode must be one of \\('adaptive', 'fixed'\\), got 'auto'"),
    ],
)
def test_bad_values_are_rejected_with_clear_messages(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"PPOConfig.{message}"):
        PPOConfig(**overrides)


def test_valid_non_defaults_are_accepted() -> None:
    config = PPOConfig(
        rollout_batch_size=8,
        mini_batch_size=8,
        kl_estimator="k3",
        kl_mode="adaptive",
        gamma=0.0,
        lam=1.0,
        approx_kl_stop=0.0,
        ptx_coef=27.8,
    )
    assert config.gradient_steps_per_iteration == 1
