"""`alignloop up` keeps its state private: the state directory 0700, the secrets in it 0600
(also when an older version left them readable), and everything it and its children
create there private through the umask. Run in a child process: the umask is per process."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[4]

# What `up` does first (deploy.local.stack.main: the settings, the admin token, the user id
# key), then what its children do: serving makes its response id key, a log file, a directory.
SCRIPT = """
import sys
from deploy.local.stack import _settings, admin_token, user_id_key_file
from serving.response_ids import load_or_create_secret

settings = _settings(["--state-dir", sys.argv[1]])
state = settings.state_dir
admin_token(settings, state)
user_id_key_file(settings, state)
load_or_create_secret(state / "secrets" / "response_id.key")
(state / "logs").mkdir(exist_ok=True)
(state / "logs" / "serving.log").write_text("started")
"""


def _up(state: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGNLOOP_")}
    subprocess.run(
        [sys.executable, "-c", SCRIPT, str(state)], cwd=REPO, env=env, check=True, timeout=120
    )


def _modes(state: Path) -> dict[str, int]:
    paths = [state, *sorted(state.rglob("*"))]
    return {str(p.relative_to(state)): stat.S_IMODE(p.stat().st_mode) for p in paths}


OLD_TOKEN = "old-token-" + "o" * 32


EXPECTED = {
    ".": 0o700,
    "admin_token": 0o600,
    "logs": 0o700,
    "logs/serving.log": 0o600,
    "secrets": 0o700,
    "secrets/response_id.key": 0o600,
    "secrets/user_id.key": 0o600,
}


def test_a_new_state_dir_is_private(tmp_path: Path) -> None:
    state = tmp_path / "fresh" / ".alignloop"
    _up(state)
    assert _modes(state) == EXPECTED


def test_an_old_readable_state_dir_is_made_private(tmp_path: Path) -> None:
    state = tmp_path / ".alignloop"
    (state / "secrets").mkdir(parents=True)
    (state / "admin_token").write_text(OLD_TOKEN)
    (state / "secrets" / "response_id.key").write_text("k" * 64)
    (state / "secrets" / "user_id.key").write_text("u" * 64)
    for path, mode in [
        (state, 0o755),
        (state / "secrets", 0o755),
        (state / "admin_token", 0o644),
        (state / "secrets" / "response_id.key", 0o644),
        (state / "secrets" / "user_id.key", 0o644),
    ]:
        path.chmod(mode)
    _up(state)
    assert _modes(state) == EXPECTED
    assert (state / "admin_token").read_text() == OLD_TOKEN  # kept, only tightened
    assert (state / "secrets" / "user_id.key").read_text() == "u" * 64


def _up_refused(state: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("ALIGNLOOP_")}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", "up", "--state-dir", str(state)],
        cwd=REPO, env=full, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_up_refuses_a_short_admin_token_before_starting_anything(tmp_path: Path) -> None:
    state = tmp_path / ".alignloop"
    done = _up_refused(state, ALIGNLOOP_ADMIN_TOKEN="short-token")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "ALIGNLOOP_ADMIN_TOKEN is 11 bytes; at least 32" in done.stdout
    assert not (state / "postgres").exists() and not (state / "logs").exists()
    # A kept token shorter than that (written by hand) is refused too, naming the file.
    (state / "admin_token").write_text("kept-but-short")
    done = _up_refused(state)
    assert done.returncode == 2 and str(state / "admin_token") in done.stdout


def test_base_picks_the_built_in_model_up_builds(tmp_path: Path) -> None:
    """``--base smollm2`` selects the SmolLM2 preset; without it the demo model stays."""
    script = (
        "import sys; from deploy.local.stack import _settings; "
        "print(_settings(sys.argv[1:]).base_preset)"
    )
    chosen = []
    for extra in ([], ["--base", "smollm2"], ["--base", "demo"]):
        out = subprocess.run(
            [sys.executable, "-c", script, "--state-dir", str(tmp_path / "s"), *extra],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        chosen.append(out.stdout.strip())
    assert chosen == ["demo", "smollm2-135m-instruct", "demo"]
