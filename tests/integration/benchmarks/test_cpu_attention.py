"""benchmarks/cpu_attention.py on tiny shapes: every case timed for both sides in every
round, and alignloop's output the float32 attention of the inputs, where sdpa's rounds to
bfloat16 under autocast."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_both_sides_timed_each_round_and_alignloops_output_is_float32_attention(precision):
    command = [
        sys.executable, "-m", "benchmarks.cpu_attention", "--precision", precision,
        "--rows", "4", "--micro-rows", "2", "--length", "9", "--rounds", "2", "--repeats", "1",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    cases = json.loads(done.stdout)["cases"]
    assert set(cases) == {"decode", "prefill", "train"}
    assert cases["decode"]["shape"] == {"rows": 4, "query_tokens": 1, "key_tokens": 9}
    for case in cases.values():
        assert {side: len(ms) for side, ms in case["ms_per_round"].items()} == {
            "transformers_sdpa": 2,
            "alignloop": 2,
        }
        error = case["max_abs_error_vs_float32"]
        assert error["alignloop"] < 1e-5
        if precision == "bfloat16":
            assert error["transformers_sdpa"] > 1e-3
