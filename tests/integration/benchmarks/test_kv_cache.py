"""benchmarks/kv_cache.py on the demo model, a few rows: both caches timed in every round,
drawing the same tokens, with rows ending at their own end-of-sequence tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_both_caches_decode_the_same_tokens_each_round(demo_model_dir):
    command = [
        sys.executable, "-m", "benchmarks.kv_cache", "--model", str(demo_model_dir),
        "--rows", "6", "--new-tokens", "8,24", "--rounds", "2",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    cases = json.loads(done.stdout)["cases"]
    assert set(cases) == {"8_new_tokens", "24_new_tokens"}
    for cap, case in ((8, cases["8_new_tokens"]), (24, cases["24_new_tokens"])):
        assert case["same_tokens"] is True
        assert {side: len(s) for side, s in case["seconds_per_round"].items()} == {
            "transformers_dynamic": 2,
            "alignloop_reserved": 2,
        }
        assert 0 < case["tokens_generated_per_side_per_round"] <= 6 * cap
    # a longer cap lets rows run on: more tokens (the demo model answers in a few dozen)
    assert (
        cases["24_new_tokens"]["tokens_generated_per_side_per_round"]
        > cases["8_new_tokens"]["tokens_generated_per_side_per_round"]
    )
