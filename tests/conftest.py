"""Shared fixtures: real broker, real demo model, real serving process."""

import os

# The suite runs several torch processes at once on a few cores (pytest, serving's vLLM
# engine, `alignloop up`'s children). OpenMP workers that spin while they wait starve the
# others: one PPO iteration took 87 s instead of 3.4 s beside a busy process, 3.9 s with
# passive waiting. Set before any test module imports torch; subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

pytest_plugins = [
    "tests.fixtures.broker",
    "tests.fixtures.model",
    "tests.fixtures.server",
    "tests.fixtures.postgres",
    "tests.fixtures.learned_reward",
]
