"""User ids stored as keyed hashes, against a real Postgres: no raw id in any table, the
same user keeps one stored id (the canary's clusters and sample-ratio count are unchanged),
erasure by the id the operator types finds the hashed rows (and older raw ones), redelivery
stays dropped, and a process with another key, or none, is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import psycopg
import pytest

from deploy.canary.data import load_observations
from feedback import cli
from feedback.ab_counters import PolicyCounts, policy_counts, recount_policy_counts
from feedback.erasure import erase_user, is_erased
from feedback.ingest.writer import store_events
from feedback.user_ids import PREFIX, KeyMismatch, UserIds, resolve_key
from schemas.events import AnyEvent, PreferenceSubmitted
from tests.fixtures.postgres import make_feedback, make_interaction

KEY = b"test-user-id-key-0123456789abcdef"
KEYED = UserIds(KEY)
REPO = Path(__file__).resolve().parents[3]


def traffic() -> tuple[list[AnyEvent], list[str]]:
    """ada: two answers of v1, both rated up by her, one also by cy; bob: one answer of v2,
    rated down; dan compares ada's answer with bob's; one anonymous answer."""
    a1 = make_interaction(policy="v1", user="ada")
    a2 = make_interaction(policy="v1", user="ada")
    b1 = make_interaction(policy="v2", user="bob")
    anon = make_interaction(policy="v2", user=None)
    events: list[AnyEvent] = [
        a1, a2, b1, anon,
        make_feedback(a1.response_id, "up", user="ada"),
        make_feedback(a2.response_id, "up", user="ada"),
        make_feedback(a1.response_id, "up", user="cy"),
        make_feedback(b1.response_id, "down", user="bob"),
        make_feedback(anon.response_id, "up", user=None),
        PreferenceSubmitted(
            producer="test", preference_id=uuid.uuid4(), user="dan",
            chosen_response_id=a1.response_id, rejected_response_id=b1.response_id,
        ),
    ]  # fmt: skip
    return events, [a1.response_id, a2.response_id]


def user_columns(conn: psycopg.Connection) -> set[str | None]:
    rows = conn.execute(
        "SELECT user_id FROM interactions UNION ALL SELECT user_id FROM feedback_events"
        " UNION ALL SELECT user_key FROM feedback_events UNION ALL SELECT user_id"
        " FROM feedback_current UNION ALL SELECT user_key FROM feedback_current"
        " UNION ALL SELECT user_id FROM preferences"
    ).fetchall()
    return {r[0] for r in rows}


def test_keyed_ids_stored_never_raw_and_one_per_user(conn: psycopg.Connection) -> None:
    events, _ = traffic()
    store_events(conn, events, KEYED)
    stored = user_columns(conn)
    hashed = {KEYED.stored(u) for u in ("ada", "bob", "cy", "dan")}
    assert stored == hashed | {None, ""}  # anonymous stays anonymous
    assert all(s.startswith(PREFIX) and len(s) == len(PREFIX) + 64 for s in hashed if s)
    assert UserIds(b"another-key-of-thirty-two-bytes!").stored("ada") not in stored
    dump = json.dumps(conn.execute("SELECT * FROM interactions").fetchall(), default=str)
    assert '"ada"' not in dump and "'ada'" not in dump


def test_the_canary_sees_the_same_clusters(conn: psycopg.Connection) -> None:
    """Votes per served user and new users per arm, from hashed ids: ada's two answers and
    cy's rating of one are ada's cluster; bob's is his."""
    events, _ = traffic()
    store_events(conn, events, KEYED)
    now = datetime.now(UTC)
    strata = [(0, 0, 0.5, now - timedelta(hours=1))]
    obs = load_observations(conn, "v2", "v1", strata, now, settle_seconds=0)
    clusters = sorted(obs.votes[:, :, 0].tolist())
    assert clusters == [[0.0, 1.0], [0.0, 1.0], [3.0, 0.0]]  # bob, the anonymous answer, ada
    assert np.array_equal(obs.new_users, [[1.0], [1.0]])  # ada on v1, bob on v2


def test_erase_by_typed_id_under_a_key_then_redeliver(conn: psycopg.Connection) -> None:
    events, ada_answers = traffic()
    legacy = make_interaction(user="ada")  # stored before the key was configured: raw
    store_events(conn, [legacy])
    KEYED.check(conn)
    store_events(conn, events, KEYED)
    counts = erase_user(conn, "ada", actor="ops", reason="erasure request", user_ids=KEYED)
    assert counts["interactions"] == 3 and counts["feedback_events"] == 3
    assert KEYED.stored("ada") not in user_columns(conn)
    assert "ada" not in user_columns(conn)
    assert is_erased(conn, "ada", KEYED) and not is_erased(conn, "bob", KEYED)
    tomb = {r[0] for r in conn.execute("SELECT user_hash FROM user_tombstones").fetchall()}
    assert not tomb & {"ada", KEYED.stored("ada")}  # the tombstone keeps neither id

    again = store_events(conn, events, KEYED)
    assert again.erased == 6  # ada's answers and ratings, cy's rating, dan's comparison
    assert conn.execute(
        "SELECT count(*) FROM interactions WHERE response_id = ANY(%s)", (ada_answers,)
    ).fetchone() == (0,)
    live = {v: c for v, c in policy_counts(conn).items() if c != PolicyCounts()}
    assert live == recount_policy_counts(conn) and "v1" not in live


def test_a_process_with_another_key_or_none_is_refused(conn: psycopg.Connection) -> None:
    UserIds().check(conn)  # nothing recorded yet: fine without a key
    # An erasure with a key on a database of raw ids finds the raw rows and records nothing
    # (else the ingestors, keyless, would be refused from then on).
    store_events(conn, [make_interaction(user="eve")])
    assert erase_user(conn, "eve", actor="ops", reason="r", user_ids=KEYED)["interactions"] == 1
    assert conn.execute("SELECT count(*) FROM user_id_keying").fetchone() == (0,)
    UserIds().check(conn)
    KEYED.check(conn)  # the first keyed process records its fingerprint
    KEYED.check(conn)
    store_events(conn, [make_interaction(user="ada")], KEYED)
    with pytest.raises(KeyMismatch, match="ALIGNLOOP_USER_ID_KEY"):
        UserIds().check(conn)
    with pytest.raises(KeyMismatch, match="not the key"):
        UserIds(b"another-key-of-thirty-two-bytes!").check(conn)
    with pytest.raises(KeyMismatch):
        erase_user(conn, "ada", actor="ops", reason="wrong key", user_ids=UserIds())
    assert conn.execute("SELECT count(*) FROM interactions").fetchone() == (1,)
    assert conn.execute("SELECT count(*) FROM user_tombstones").fetchone() == (2,)  # eve's


def test_key_from_the_setting_else_the_state_file(tmp_path: Path) -> None:
    assert resolve_key(None, tmp_path) is None
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "user_id.key").write_text("from-the-file\n")
    assert resolve_key(None, tmp_path) == b"from-the-file"
    assert resolve_key("from-the-setting", tmp_path) == b"from-the-setting"


def test_cli_delete_and_ingest_use_the_configured_key(
    conn: psycopg.Connection,
    migrated_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    events, _ = traffic()
    KEYED.check(conn)
    store_events(conn, events, KEYED)
    monkeypatch.setenv("ALIGNLOOP_STATE_DIR", str(tmp_path))  # no key file there
    monkeypatch.delenv("ALIGNLOOP_USER_ID_KEY", raising=False)
    args = ["delete", "--user", "ada", "--reason", "r", "--database-url", migrated_url]
    assert cli.data_main(args) == 2  # refused: the database is keyed, this process is not
    assert "ALIGNLOOP_USER_ID_KEY" in capsys.readouterr().err
    monkeypatch.setenv("ALIGNLOOP_USER_ID_KEY", KEY.decode())
    assert cli.data_main(args) == 0
    assert json.loads(capsys.readouterr().out)["deleted"]["interactions"] == 2

    # An ingestor with another key does not start (before it ever talks to Kafka).
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGNLOOP_")}
    env.update(ALIGNLOOP_USER_ID_KEY="not-the-key", ALIGNLOOP_STATE_DIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-m", "feedback.cli", "--database-url", migrated_url,
         "--bootstrap", "127.0.0.1:1", "--metrics-port", "0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "not the key" in done.stderr
