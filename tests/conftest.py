"""Shared fixtures: real broker, real demo model, real serving process."""

pytest_plugins = [
    "tests.fixtures.broker",
    "tests.fixtures.model",
    "tests.fixtures.server",
    "tests.fixtures.postgres",
    "tests.fixtures.learned_reward",
]
