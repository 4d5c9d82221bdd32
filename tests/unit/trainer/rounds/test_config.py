"""Tests of :mod:`trainer.rounds.config`."""

from __future__ import annotations

import subprocess
import sys

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


def test_a_round_config_is_data_its_module_imports_no_training_stack():
    """``alignloop train ... --help`` and a second trainer's refusal parse this config
    before anything trains: importing torch, transformers and peft for it cost 8 s of a
    14-second `--help` on a 2-core CPU."""
    probe = (
        "import sys, trainer.rounds.config, trainer.rounds.trigger; "
        "print(sorted({'torch', 'transformers', 'peft', 'vllm'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
