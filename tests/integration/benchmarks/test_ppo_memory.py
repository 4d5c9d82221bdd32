"""benchmarks/ppo_memory.py on the demo model with tiny settings: every phase is recorded
in the order the trainer runs it, and the census of what a micro-batch keeps for its
backward counts activations, not the model's own weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_the_memory_profile_records_each_phase_and_a_micro_batchs_activations(
    demo_model_dir: Path,
):
    del demo_model_dir  # built (or found cached) before the script needs it
    command = [
        sys.executable, "-m", "benchmarks.ppo_memory", "--model", "demo",
        "--iterations", "1", "--rollout-batch-size", "8", "--mini-batch-size", "4",
        "--micro-batch-size", "2", "--precision", "float32", "--threads", "1",
    ]  # fmt: skip
    done = subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    # One decode of the 8 rollouts, then scoring passes of at most a mini-batch (4 rows)
    # each, then the update: the trainer's order.
    phases = [p["phase"] for p in result["phases"]]
    assert phases[0] == "decode" and phases[-1] == "update", phases
    assert phases.count("decode") == 1 and phases.count("update") == 1
    assert 2 <= phases.count("score") <= 8
    for entry in result["phases"]:
        for side in ("enter", "exit"):
            assert entry[side]["rss"]["VmRSS"] > 0
    census = result["saved_for_backward"]
    assert census["rows"] == 2 and census["tokens"] > 2 * 13
    # Parameters are left out: the backward also keeps the model's weights (float32), and
    # counted in, they alone would exceed this.
    weights_mb = result["config"]["policy_parameters"] * 4 / 2**20
    assert 0 < census["total_mb"] < weights_mb, (census, weights_mb)
    assert result["config"]["micro_batch_size"] == 2
