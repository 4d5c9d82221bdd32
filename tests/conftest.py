"""Shared fixtures: real broker, real demo model, real serving process."""

import os
import shutil
import tempfile

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
# A developer's own `./dev up` keeps its state under ./.alignloop, the default state
# directory, secrets included: with its user id key there, a CLI a test runs would store
# and erase users under that key (the README's two commands, one after the other, failed
# two erasure tests so). The suite reads no one's state: a test that wants a state
# directory names its own, the rest share an empty one, removed afterwards.
_STATE_DIR = tempfile.mkdtemp(prefix="alignloop-test-state-")
os.environ["ALIGNLOOP_STATE_DIR"] = _STATE_DIR
os.environ.pop("ALIGNLOOP_USER_ID_KEY", None)

pytest_plugins = [
    "tests.fixtures.broker",
    "tests.fixtures.kafka_faults",
    "tests.fixtures.model",
    "tests.fixtures.server",
    "tests.fixtures.postgres",
    "tests.fixtures.learned_reward",
]


def pytest_configure(config) -> None:
    # Registered here, beside the suite's other shared setup (pyproject holds `slow`).
    config.addinivalue_line(
        "markers", "gpu: needs a CUDA GPU (skipped without one; benchmarks/gpu_check.py runs them)"
    )


def pytest_unconfigure(config) -> None:
    shutil.rmtree(_STATE_DIR, ignore_errors=True)


def pytest_itemcollected(item) -> None:
    """A test that needs the demo model is ``slow``: the model's fixture builds it where it
    is not cached (4 minutes on a slow CPU), and the test runs it. Marked here, before
    ``-m`` selects, so no module can forget it."""
    if "demo_model_dir" in item.fixturenames:
        item.add_marker("slow")


def pytest_collection_modifyitems(config, items) -> None:
    """``gpu`` tests skip on a machine where torch sees no CUDA GPU."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return  # torch is not imported for a run without any
    import pytest
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in gpu_items:
        item.add_marker(skip)
