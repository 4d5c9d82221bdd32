"""`alignloop up`'s state directory stays private with the embedded Postgres running in it:
the directory 0700 (0711 as root, where Postgres runs as pgserver's own user and must pass
through to its data), no file in it readable by others, and Postgres works under the
umask `up` sets."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[4]

# `up`'s first steps (deploy.local.stack.main): settings and state directory, then the
# embedded Postgres (a Kafka bootstrap is given so that no broker is started).
SCRIPT = """
import sys
import psycopg
from deploy.local import stack

settings = stack._settings(["--state-dir", sys.argv[1]])
infra = stack._Infrastructure("", "127.0.0.1:1")
try:
    stack._start_infrastructure(settings, infra)
    with psycopg.connect(infra.database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (41), (1)")
        print(conn.execute("SELECT sum(x) FROM t").fetchone()[0])
    (settings.state_dir / "logs").mkdir(exist_ok=True)
    (settings.state_dir / "logs" / "ingestor.log").write_text("up")
finally:
    infra.stop()
"""


@pytest.fixture
def state() -> Iterator[Path]:
    # Not under pytest's tmp_path: as root, pgserver runs Postgres as its own user, and
    # pytest keeps its temp root private to root (see tests/fixtures/postgres.py).
    root = Path(tempfile.mkdtemp(prefix="alignloop-state-"))
    try:
        yield root / ".alignloop"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_state_dir_private_with_embedded_postgres(state: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGNLOOP_")}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(state)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "42"
    expected = 0o711 if os.geteuid() == 0 else 0o700
    assert stat.S_IMODE(state.stat().st_mode) == expected
    readable = [
        f"{p.relative_to(state)} {oct(stat.S_IMODE(p.stat().st_mode))}"
        for p in state.rglob("*")
        if not p.is_socket() and not p.is_symlink() and p.stat().st_mode & 0o077
    ]
    assert readable == []
    assert stat.S_IMODE((state / "logs" / "ingestor.log").stat().st_mode) == 0o600
