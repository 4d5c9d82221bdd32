"""`alignloop up` on one GPU: the memory split between serving's engine, the rollout engine
and the trainer (deploy/local/gpu_plan.py), and how the children get their shares."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.local import gpu_plan
from deploy.local.stack import _children, child_envs
from schemas.settings import Settings


def test_the_default_split_by_hand():
    settings = Settings()
    plan = gpu_plan.plan(settings.serving_gpu_share, settings.rollout_gpu_share)
    # 1 - 0.45 - 0.30 = 0.25 left to the trainer.
    assert plan == gpu_plan.GpuPlan(serving=0.45, rollout=0.3, trainer=0.25)
    assert gpu_plan.plan(0.5, 0.4).trainer == pytest.approx(0.1)  # the least it may get


@pytest.mark.parametrize(
    ("serving", "rollout", "message"),
    [
        (0.6, 0.35, "leave the trainer 0.05"),
        (0.92, 0.3, "leave the trainer -0.22"),  # serving's standalone default would not fit
        (0.0, 0.3, "serving engine's GPU share must be in"),
        (0.5, 1.0, "rollout engine's GPU share must be in"),
    ],
)
def test_a_split_that_starves_the_trainer_is_refused(serving, rollout, message):
    with pytest.raises(ValueError, match=message):
        gpu_plan.plan(serving, rollout)


def test_serving_and_the_trainer_get_their_shares(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    settings = Settings(state_dir=tmp_path)
    plan = gpu_plan.plan(0.5, 0.25)
    envs = child_envs(settings, {"X": "1"}, plan)
    assert envs["serving"]["ALIGNLOOP_ENGINE_GPU_MEMORY_UTILIZATION"] == "0.5"
    assert all(env["X"] == "1" for env in envs.values())
    assert not any("ALIGNLOOP_CPUS" in env for env in envs.values())  # cores not split
    assert "ALIGNLOOP_ENGINE_GPU_MEMORY_UTILIZATION" not in envs["trainer"]
    trainer = {c.name: c for c in _children(settings, envs, plan)}["trainer"]
    flag = trainer.argv.index("--vllm-gpu-memory-utilization")
    assert trainer.argv[flag + 1] == "0.25"
    no_gpu = {c.name: c for c in _children(settings, envs)}["trainer"]
    assert "--vllm-gpu-memory-utilization" not in no_gpu.argv
    # Serving's settings read its share from the environment it is given.
    monkeypatch.setenv(*next(iter(gpu_plan.child_settings(plan)[0].items())))
    assert Settings().engine_gpu_memory_utilization == 0.5
