import json
import time
from pathlib import Path

import pytest

from schemas.settings import Settings
from serving.api_keys import (
    KEY_PREFIX,
    KeyRing,
    Principal,
    add_key,
    create_key,
    read_entries,
    revoke_key,
)
from serving.keys_cli import main as keys_main
from serving.server import _auth_problem


def test_a_created_key_authenticates_as_its_name_with_its_scopes(tmp_path: Path):
    path = tmp_path / "keys.jsonl"
    web = create_key(path, "web", ["chat", "feedback"])
    ops = create_key(path, "ops", ["chat", "pin"])
    ring = KeyRing(path)
    assert web.startswith(KEY_PREFIX) and len(web) > 40
    assert ring.authenticate(web) == Principal("web", frozenset({"chat", "feedback"}))
    assert ring.authenticate(ops) == Principal("ops", frozenset({"chat", "pin"}))
    assert ring.authenticate(web[:-1]) is None
    assert ring.authenticate("") is None


def test_the_file_keeps_hashes_only_and_is_private(tmp_path: Path):
    path = tmp_path / "keys.jsonl"
    key = create_key(path, "web", ["chat"])
    text = path.read_text()
    assert key not in text and key[len(KEY_PREFIX) :] not in text
    assert path.stat().st_mode & 0o777 == 0o600
    [line] = text.splitlines()
    assert set(json.loads(line)) == {"name", "sha256", "scopes", "created_at"}


@pytest.mark.parametrize(
    ("name", "scopes"),
    [("", ["chat"]), ("has space", ["chat"]), ("x" * 65, ["chat"]), ("web", []),
     ("web", ["chat", "admin"])],
)  # fmt: skip
def test_bad_names_and_scopes_are_refused(tmp_path: Path, name, scopes):
    with pytest.raises(ValueError):
        create_key(tmp_path / "keys.jsonl", name, scopes)


def test_names_are_unique_and_short_keys_refused(tmp_path: Path):
    path = tmp_path / "keys.jsonl"
    create_key(path, "web", ["chat"])
    with pytest.raises(ValueError, match="exists"):
        create_key(path, "web", ["chat"])
    with pytest.raises(ValueError, match="32"):
        add_key(path, "short", "al-too-short", ["chat"])


def test_rotation_then_revocation_is_seen_without_a_restart(tmp_path: Path):
    path = tmp_path / "keys.jsonl"
    old = create_key(path, "web-2026", ["chat"])
    ring = KeyRing(path)
    new = create_key(path, "web-2027", ["chat"])
    time.sleep(1.1)  # the ring looks at the file at most once a second
    assert ring.authenticate(old) is not None and ring.authenticate(new) is not None
    assert revoke_key(path, "web-2026") and not revoke_key(path, "web-2026")
    time.sleep(1.1)
    assert ring.authenticate(old) is None
    assert ring.authenticate(new) == Principal("web-2027", frozenset({"chat"}))


def test_a_broken_file_is_an_error_at_start_and_ignored_later(tmp_path: Path):
    path = tmp_path / "keys.jsonl"
    key = create_key(path, "web", ["chat"])
    ring = KeyRing(path)
    path.write_text(path.read_text() + "{not json\n")
    time.sleep(1.1)
    assert ring.authenticate(key) is not None  # the last good set stays
    with pytest.raises(ValueError, match=r"keys\.jsonl:2"):
        KeyRing(path)


def test_cli_creates_lists_and_revokes(tmp_path: Path, capsys):
    path = tmp_path / "keys.jsonl"
    assert keys_main(["--file", str(path), "create", "web", "--scopes", "chat,annotate"]) == 0
    key = capsys.readouterr().out.strip()
    assert KeyRing(path).authenticate(key) == Principal("web", frozenset({"chat", "annotate"}))
    assert keys_main(["--file", str(path), "list"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["name"] == "web" and key not in json.dumps(listed)
    assert keys_main(["--file", str(path), "create", "x", "--scopes", "root"]) == 2
    assert keys_main(["--file", str(path), "revoke", "web"]) == 0
    assert read_entries(path) == []
    assert keys_main(["--file", str(path), "revoke", "web"]) == 1


def test_serving_refuses_to_start_open_by_accident(tmp_path: Path):
    keys = tmp_path / "keys.jsonl"
    settings = Settings(state_dir=tmp_path, api_keys_file=keys)
    assert "no API key" in (_auth_problem(settings, "127.0.0.1") or "")
    create_key(keys, "web", ["chat"])
    assert _auth_problem(settings, "0.0.0.0") is None
    insecure = Settings(state_dir=tmp_path, insecure_no_auth=True)
    assert _auth_problem(insecure, "127.0.0.1") is None
    assert _auth_problem(insecure, "::1") is None
    assert "loopback" in (_auth_problem(insecure, "0.0.0.0") or "")
    assert "loopback" in (_auth_problem(insecure, "10.0.0.5") or "")
