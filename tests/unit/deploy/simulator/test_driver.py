"""The simulator's configuration: --until parsing, where the admin token comes from, and
configurations that must fail before anything is sent."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import pytest

from deploy.simulator import SimConfig, SimulationError, Until, run
from deploy.simulator.cli import add_arguments, config_from_args, main
from deploy.simulator.driver import resolve_admin_token


@pytest.mark.parametrize(
    ("text", "event", "count"),
    [
        ("candidate", "candidate", 1),
        ("canary", "canary", 1),
        ("promotion", "promotion", 1),
        ("rollback", "rollback", 1),
        ("3-promotions", "promotion", 3),
        ("1-promotion", "promotion", 1),
    ],
)
def test_until_parses(text: str, event: str, count: int) -> None:
    until = Until.parse(text)
    assert (until.event, until.count) == (event, count)
    assert Until.parse(str(until)) == until


@pytest.mark.parametrize("text", ["", "promoted", "0-promotions", "-1-promotions", "2-canaries"])
def test_until_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="expected candidate, canary, promotion, rollback or"):
        Until.parse(text)


def test_admin_token_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ALIGNLOOP_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("ALIGNLOOP_STATE_DIR", raising=False)
    assert resolve_admin_token(None, str(tmp_path)) is None
    (tmp_path / "admin_token").write_text("from-file\n")
    assert resolve_admin_token(None, str(tmp_path)) == "from-file"
    monkeypatch.setenv("ALIGNLOOP_STATE_DIR", str(tmp_path))
    assert resolve_admin_token(None, None) == "from-file"
    monkeypatch.setenv("ALIGNLOOP_ADMIN_TOKEN", "from-env")
    assert resolve_admin_token(None, str(tmp_path)) == "from-env"
    assert resolve_admin_token("given", str(tmp_path)) == "given"


@pytest.mark.parametrize(
    "bad", [{"minutes": 0}, {"rate": -1.0}, {"concurrency": 0}, {"max_tokens": 0}]
)
def test_config_validation(bad: dict) -> None:
    with pytest.raises(SimulationError):
        SimConfig(**bad)


def test_until_without_admin_fails_before_sending(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ALIGNLOOP_ADMIN_TOKEN", raising=False)
    # nothing listens on port 9 (discard): a request would be an error, not a refusal
    config = SimConfig(base_url="http://127.0.0.1:9", admin_url=None, until=Until("promotion"))
    with pytest.raises(SimulationError, match="needs the admin API: no admin URL given"):
        asyncio.run(run(config, out=None))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"preference": "polite"}, "unknown preference 'polite'"),
        ({"prompts_file": "/nonexistent/prompts.jsonl"}, "cannot read it"),
    ],
)
def test_bad_preference_or_prompts_fail_before_sending(overrides: dict, message: str) -> None:
    config = SimConfig(base_url="http://127.0.0.1:9", admin_url=None, **overrides)
    with pytest.raises(SimulationError, match=message):
        asyncio.run(run(config, out=None))


def test_flags_make_the_config() -> None:
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    args = ap.parse_args(
        ["--base-url", "http://h:1", "--users", "7", "--rate-share", "0.25", "--noise", "0.2",
         "--preference", "honest", "--until", "2-promotions", "--admin-url", "", "--seed", "5",
         "--minutes", "1.5"]
    )  # fmt: skip
    config = config_from_args(args)
    assert config.base_url == "http://h:1" and config.admin_url is None
    assert config.population.users == 7 and config.population.rate_share == 0.25
    assert config.population.noise == 0.2 and config.population.seed == 5
    assert config.preference == "honest" and config.until == Until("promotion", 2)
    assert config.minutes == 1.5
    described = config.describe()
    assert described["until"] == "2-promotions" and described["admin_token"] is None


def test_cli_exit_status_two_on_bad_setup(capsys: pytest.CaptureFixture) -> None:
    code = main(["--base-url", "http://127.0.0.1:9", "--admin-url", "", "--until", "canary"])
    assert code == 2
    assert "needs the admin API" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["--until", "sometime"])
    assert info.value.code == 2
