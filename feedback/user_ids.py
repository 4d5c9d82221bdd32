"""How user ids are stored: as serving received them, or as keyed hashes.

Its one job: turn the ``user`` of an event into what the feedback tables keep
(``interactions.user_id``, ``feedback_events.user_id`` / ``user_key``,
``feedback_current``, ``preferences.user_id``), and make sure every process that writes or
erases agrees on it.

With a key (``ALIGNLOOP_USER_ID_KEY``, else the file ``STATE_DIR/secrets/user_id.key`` when
it exists; ``alignloop up`` makes one), a user id is stored as ``uh1:`` + the hex
HMAC-SHA256 of the id under the key. The same user always gets the same stored id, so
everything that groups by user (the canary's clusters and its sample-ratio count, latest
wins per user) works unchanged, and erasure finds a user's rows from the id an operator
types by hashing it the same way. Without the key, a stored id cannot be turned back into
the user id. Events on the wire (Kafka, serving's spool, dead letters) keep the raw id.

Everyone must use the same key: the first keyed process records the key's fingerprint in
``user_id_keying`` (migration 0010), and :meth:`UserIds.check` refuses a process whose key
differs, or that has no key while the database has one (its rows would not match, and an
erasure would silently find nothing). The key cannot be rotated (the raw ids are gone); a
lost key leaves erasure by typed id impossible for the rows it hashed.

Rows stored before a key was configured keep their raw ids; erasure looks for both forms
(:meth:`UserIds.forms`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg

if TYPE_CHECKING:
    from schemas.settings import Settings

PREFIX = "uh1:"
KEY_FILE = Path("secrets") / "user_id.key"


class KeyMismatch(RuntimeError):
    """This process's user id key is not the one the database's rows were stored with."""


@dataclass(frozen=True)
class UserIds:
    """Stored user ids under ``key`` (None: stored as received)."""

    key: bytes | None = None

    def stored(self, user: str | None) -> str | None:
        """What the tables keep for ``user`` (None and '' stay as they are: anonymous)."""
        if not user or self.key is None:
            return user
        digest = hmac.new(self.key, user.encode("utf-8", "surrogatepass"), hashlib.sha256)
        return PREFIX + digest.hexdigest()

    def forms(self, user: str) -> list[str]:
        """Every stored form ``user`` may have: the keyed hash, and the raw id of rows
        stored before the key was configured."""
        hashed = self.stored(user)
        return [user] if hashed == user or hashed is None else [hashed, user]

    @property
    def fingerprint(self) -> str | None:
        if self.key is None:
            return None
        return hmac.new(self.key, b"alignloop user id key", hashlib.sha256).hexdigest()[:16]

    def check(self, conn: psycopg.Connection, *, record: bool = True) -> None:
        """Refuse (:class:`KeyMismatch`) to work on a database keyed differently. With
        ``record`` (writers: the ingestor), the first keyed process records its key's
        fingerprint; without (erasure), a keyed process on a database with no fingerprint
        yet is let through and records nothing (its rows are raw, and erasure looks for
        raw ids too)."""
        mine = self.fingerprint
        if mine is not None and record:
            conn.execute(
                "INSERT INTO user_id_keying (fingerprint) VALUES (%s) ON CONFLICT DO NOTHING",
                (mine,),
            )
        row = conn.execute("SELECT fingerprint FROM user_id_keying").fetchone()
        recorded = row[0] if row else None
        if recorded == mine or (recorded is None and not record):
            return
        if mine is None:
            raise KeyMismatch(
                "this database stores user ids as keyed hashes (key fingerprint "
                f"{recorded}); set ALIGNLOOP_USER_ID_KEY to the same key"
            )
        raise KeyMismatch(
            f"ALIGNLOOP_USER_ID_KEY (fingerprint {mine}) is not the key this database's user "
            f"ids were stored with (fingerprint {recorded})"
        )


def resolve_key(explicit: str | None, state_dir: Path) -> bytes | None:
    """The key: ``explicit`` (the setting), else ``state_dir/secrets/user_id.key`` if it
    exists, else None (ids stored as received)."""
    if explicit:
        return explicit.encode()
    path = state_dir / KEY_FILE
    if path.is_file():
        return path.read_bytes().strip() or None
    return None


def configured(settings: Settings) -> UserIds:
    """How this process stores user ids, from ``ALIGNLOOP_USER_ID_KEY`` or the key file."""
    secret = settings.user_id_key.get_secret_value() if settings.user_id_key else None
    return UserIds(resolve_key(secret, settings.state_dir))


def new_key() -> str:
    """A fresh random key (what ``alignloop up`` keeps in ``STATE_DIR/secrets/user_id.key``)."""
    return secrets.token_hex(32)
