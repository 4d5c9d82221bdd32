"""Shared fixtures: real broker, real demo model, real serving process."""

import os

# The suite runs several torch processes at once on a few cores (pytest, serving's vLLM
# engine, `alignloop up`'s children). OpenMP workers that spin while they wait starve the
# others: beside a busy process one PPO iteration took many times as long as with passive
# waiting (measured: docs/benchmarks.md, "Figures quoted in code"). Set before any test
# module imports torch; subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The canary controller's metrics port (ALIGNLOOP_CONTROLLER_METRICS_PORT, 9105) is opened
# by every operators' server the tests start (deploy.ops.admin_api.serve_in_thread) and by
# every controller process: fixed, it would collide between tests and with a developer's
# `alignloop up`. Off for the suite; the tests of that port (and `running_stack`) pick a
# free one.
os.environ.setdefault("ALIGNLOOP_CONTROLLER_METRICS_PORT", "0")

pytest_plugins = [
    "tests.fixtures.broker",
    "tests.fixtures.kafka_faults",
    "tests.fixtures.model",
    "tests.fixtures.server",
    "tests.fixtures.postgres",
    "tests.fixtures.learned_reward",
]
