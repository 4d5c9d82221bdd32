"""Where the event publisher puts events Kafka will never take.

An event is quarantined when retrying it cannot help: it is larger than
``max_event_bytes``, it cannot be serialised, or the broker (or the Kafka client) refused
that one record for good (message too large, invalid record). Such an event is not an
outage: it is written here, counted, logged, and delivery goes on with the next event.

The quarantine is one JSON-lines file, created 0600 (events hold prompts, answers and user
ids), appended to and fsync'd line by line. Each line::

    {"quarantined_at": "2025-...Z", "topic": "alignloop.feedback", "reason": "too_large",
     "detail": "...", "key": "chatcmpl-...", "size": 912345,
     "event_type": "feedback_submitted", "event_id": "...", "value": "{...the event...}"}

``value`` is the serialised event as text (``value_base64`` instead when it is not UTF-8;
``null`` when it could not be serialised). The file is bounded by ``max_bytes``: beyond it a
quarantined event is still counted and logged, but its line is not written. Nothing reads
the file back automatically: an operator inspects it, re-publishes what should be kept
(after fixing the cause) and deletes it. Erasure (`alignloop data delete`) does not reach it.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from schemas.durable import fsync_dir


class Quarantine:
    """Append-only, bounded, fsync'd JSON-lines file of refused events. Thread-safe."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._size = self.path.stat().st_size if self.path.exists() else 0

    @property
    def size(self) -> int:
        """Size of the quarantine file in bytes."""
        return self._size

    def write(
        self,
        *,
        topic: str,
        reason: str,
        detail: str,
        key: bytes | None,
        value: bytes | None,
        event_type: str | None = None,
        event_id: str | None = None,
    ) -> bool:
        """Append one line and fsync it. False (nothing written) if it would take the file
        beyond ``max_bytes``; an OSError (disk full, ...) propagates."""
        entry: dict[str, Any] = {
            "quarantined_at": datetime.now(UTC).isoformat(),
            "topic": topic,
            "reason": reason,
            "detail": detail,
            "key": _text(key),
            "size": None if value is None else len(value) + len(key or b""),
            "event_type": event_type,
            "event_id": event_id,
        }
        if value is None:
            entry["value"] = None
        else:
            try:
                entry["value"] = value.decode()
            except UnicodeDecodeError:
                entry["value_base64"] = base64.b64encode(value).decode()
        line = (json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        with self._lock:
            if self._size + len(line) > self.max_bytes:
                return False
            fd = self._open()
            written = 0
            while written < len(line):
                written += os.write(fd, line[written:])
            os.fsync(fd)
            self._size += len(line)
        return True

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.fchmod(fd, 0o600)  # an older file, or a umask that widened it
            if created:
                fsync_dir(self.path.parent)
            self._size = os.fstat(fd).st_size
            self._fd = fd
        return self._fd


def _text(key: bytes | None) -> str | None:
    if key is None:
        return None
    try:
        return key.decode()
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(key).decode()
