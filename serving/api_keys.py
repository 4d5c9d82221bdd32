"""Named API keys with scopes: who a caller is (the principal) and what it may do.

A key is ``al-`` + 43 url-safe characters (256 random bits). The key file holds, one JSON
object per line, its name, the SHA-256 of the key (never the key itself), its scopes and
when it was made::

    {"name": "web-app", "sha256": "9f…", "scopes": ["chat", "feedback"], "created_at": "…"}

The name is the principal: it is carried on every event and row the key causes, and it is
what a vote is bound to (`serving.response_ids`). Several keys may be valid at once, so a
key is rotated by creating the new one, moving the product over, then revoking the old.

Lookup hashes the presented key once and compares the digest with every stored digest in
constant time, without stopping at the first match (as vLLM's ``--api-key`` check does),
so timing says nothing about which key, or how much of one, was right. The file is re-read
when it changes (checked at most once a second), so creating or revoking a key needs no
restart of the replicas that share it.

Scopes:

* ``chat``: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``;
* ``feedback``: ``/v1/feedback`` and pairwise ``/v1/preferences`` over served answers;
* ``annotate``: text preferences (``chosen``/``rejected`` written by the caller), which the
  trainer learns from as given;
* ``pin``: ask for a policy version by name, and see which version answered (the
  ``policy_version`` field and the ``X-Alignloop-Policy`` header).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, get_args

Scope = Literal["chat", "feedback", "annotate", "pin"]
SCOPES: tuple[Scope, ...] = get_args(Scope)
KEY_PREFIX = "al-"
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.@")
_RELOAD_EVERY_S = 1.0


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the key's name and what it may do."""

    name: str
    scopes: frozenset[str]

    def may(self, scope: Scope) -> bool:
        return scope in self.scopes


ANONYMOUS = Principal("anonymous", frozenset(SCOPES))
"""Every caller under ``ALIGNLOOP_INSECURE_NO_AUTH`` (development on loopback only)."""


@dataclass(frozen=True)
class KeyEntry:
    name: str
    sha256: bytes
    scopes: frozenset[str]
    created_at: str


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def check_name(name: str) -> str:
    if not name or len(name) > 64 or not set(name) <= _NAME_CHARS:
        raise ValueError(f"a key name is 1 to 64 of letters, digits and - _ . @ (got {name!r})")
    return name


def check_scopes(scopes: list[str] | tuple[str, ...]) -> frozenset[str]:
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise ValueError(f"scopes are some of {', '.join(SCOPES)} (got {', '.join(scopes)})")
    return frozenset(scopes)


def read_entries(path: Path) -> list[KeyEntry]:
    """The key file's entries (none if it does not exist). A malformed line is an error:
    a key file that half-loads would lock out whoever was on the other half."""
    if not path.exists():
        return []
    entries = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            entries.append(
                KeyEntry(
                    name=check_name(raw["name"]),
                    sha256=bytes.fromhex(raw["sha256"]),
                    scopes=check_scopes(list(raw["scopes"])),
                    created_at=str(raw.get("created_at", "")),
                )
            )
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: not a key entry ({e})") from None
    return entries


def _write_entries(path: Path, entries: list[KeyEntry]) -> None:
    """Replace the file atomically (0600): a reader sees the old set or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        for e in entries:
            line = {
                "name": e.name,
                "sha256": e.sha256.hex(),
                "scopes": sorted(e.scopes),
                "created_at": e.created_at,
            }
            f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def create_key(path: Path, name: str, scopes: list[str] | tuple[str, ...]) -> str:
    """Add a key named ``name`` and return it (the only time it is ever shown)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    add_key(path, name, key, scopes)
    return key


def add_key(path: Path, name: str, key: str, scopes: list[str] | tuple[str, ...]) -> None:
    """Add ``key`` (made elsewhere, e.g. kept in a secret manager) under ``name``."""
    check_name(name)
    wanted = check_scopes(scopes)
    if len(key) < 32:
        raise ValueError("an API key must be at least 32 characters")
    entries = read_entries(path)
    if any(e.name == name for e in entries):
        raise ValueError(f"a key named {name!r} exists; revoke it first or pick another name")
    created = datetime.now(UTC).isoformat(timespec="seconds")
    _write_entries(path, [*entries, KeyEntry(name, digest(key), wanted, created)])


def revoke_key(path: Path, name: str) -> bool:
    """Remove every key named ``name``; whether there was one."""
    entries = read_entries(path)
    kept = [e for e in entries if e.name != name]
    if len(kept) != len(entries):
        _write_entries(path, kept)
    return len(kept) != len(entries)


class KeyRing:
    """The valid keys, from the key file, re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._entries: list[KeyEntry] = []
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._reload()

    def _reload(self) -> None:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            self._entries = read_entries(self.path)
            self._stamp = stamp

    def _fresh(self) -> list[KeyEntry]:
        now = time.monotonic()
        if now - self._checked >= _RELOAD_EVERY_S:
            with self._lock:
                self._checked = now
                # A hand-broken file: keep the last good set until it is fixed.
                with contextlib.suppress(ValueError):
                    self._reload()
        return self._entries

    def __len__(self) -> int:
        return len(self._fresh())

    def authenticate(self, key: str) -> Principal | None:
        """The principal whose key this is, or None. Every entry is compared."""
        presented = digest(key)
        found: KeyEntry | None = None
        for entry in self._fresh():
            if hmac.compare_digest(presented, entry.sha256) and found is None:
                found = entry
        return None if found is None else Principal(found.name, found.scopes)
