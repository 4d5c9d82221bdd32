"""Tests of :mod:`trainer.rounds.config`."""

from __future__ import annotations

import pytest
import torch

from trainer.rounds.config import RoundConfig


def test_auto_rollouts_use_vllm_with_a_gpu_and_transformers_on_cpu():
    assert RoundConfig().rollout_backend == "auto"
    assert RoundConfig().rollouts == ("vllm" if torch.cuda.is_available() else "hf")
    assert RoundConfig(rollout_backend="vllm").rollouts == "vllm"
    assert RoundConfig(rollout_backend="hf").rollouts == "hf"


def test_round_config_validation_and_fingerprint():
    with pytest.raises(ValueError, match="rollout_backend"):
        RoundConfig(rollout_backend="tgi")
    with pytest.raises(ValueError, match="critic_init"):
        RoundConfig(critic_init="random")
    a, b = RoundConfig(), RoundConfig(progress=False, metrics_port=9)
    assert a.fingerprint() == b.fingerprint()  # how it runs, not what it computes
    assert a.fingerprint() != RoundConfig(iterations=3).fingerprint()
    assert RoundConfig(database_url="postgresql://u:secret@h/db").to_json()["database_url"] is None
