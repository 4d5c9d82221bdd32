"""benchmarks/gpu_check.py's dry run: the GPU check's own path (tests, model, PPO
iterations, JSON) on the CPU with the demo model and tiny settings, so the script a GPU
machine runs is known to work before one is at hand."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_the_gpu_check_dry_run_prints_its_json(demo_model_dir: Path):
    del demo_model_dir  # built (or found cached) before the script needs it
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["ok"] is True and result["dry_run"] is True
    assert result["model"] == "demo"
    assert result["environment"]["torch"] and result["environment"]["python"]
    # The GPU tests were collected and skip here (no CUDA): none failed.
    tests = result["tests"]
    assert tests["failed"] == 0 and tests["skipped"] >= 1, tests
    ppo = result["ppo"]
    assert ppo["trainer_device"] == "cpu" and ppo["episodes"] == 16
    assert ppo["episodes_per_s"] > 0 and ppo["rollout_tokens_per_s"] > 0
    assert ppo["seconds_per_iteration"] > 0
    for key in ("reward_start", "reward_end", "final_kl"):
        assert math.isfinite(ppo[key]), ppo
    assert set(result["stages_s"]) >= {"environment", "tests", "model", "ppo", "total"}
