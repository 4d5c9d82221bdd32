"""Quarantine: one fsync'd JSON line per refused event, 0600, bounded."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

from serving.quarantine import Quarantine


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lines_are_json_with_the_event_and_the_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "q" / "quarantine.jsonl"
    q = Quarantine(path, max_bytes=100_000)
    assert q.write(topic="t", reason="too_large", detail="d", key=b"k1", value=b'{"a": 1}')
    assert q.write(
        topic="t", reason="serialization", detail="e", key=None, value=None, event_id="id-2"
    )
    assert q.write(topic="t", reason="invalid_record", detail="f", key=b"\xff", value=b"\xfe")
    q.close()
    first, second, third = lines(path)
    assert (first["reason"], first["key"], first["value"], first["size"]) == (
        "too_large",
        "k1",
        '{"a": 1}',
        len(b'{"a": 1}') + 2,
    )
    assert (second["value"], second["key"], second["event_id"]) == (None, None, "id-2")
    assert third["key"] == "base64:" + base64.b64encode(b"\xff").decode()
    assert base64.b64decode(third["value_base64"]) == b"\xfe"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_an_existing_wider_file_is_tightened_and_appended_to(tmp_path: Path) -> None:
    path = tmp_path / "quarantine.jsonl"
    path.write_text('{"old": true}\n')
    os.chmod(path, 0o644)
    q = Quarantine(path, max_bytes=100_000)
    assert q.size == len('{"old": true}\n')
    assert q.write(topic="t", reason="too_large", detail="d", key=None, value=b"v")
    q.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [next(iter(line)) for line in lines(path)] == ["old", "quarantined_at"]


def test_bound_refuses_a_line_that_would_not_fit(tmp_path: Path) -> None:
    path = tmp_path / "quarantine.jsonl"
    q = Quarantine(path, max_bytes=600)
    assert q.write(topic="t", reason="too_large", detail="d", key=None, value=b"x" * 100)
    size = q.size
    assert not q.write(topic="t", reason="too_large", detail="d", key=None, value=b"x" * 500)
    assert q.size == size == path.stat().st_size  # nothing of it written
    assert len(lines(path)) == 1
    q.close()
