"""Who may use the admin API, and under what name: named admin tokens, and the limit on
failed attempts.

**Tokens.** An operator presents a bearer token; the token's name is the operator in the
audit log (no header decides it). Two sources, both valid at once:

* ``ALIGNLOOP_ADMIN_TOKEN``: one token, named ``admin`` (:data:`SINGLE_TOKEN_NAME`);
  ``alignloop up`` makes one;
* the token file ``ALIGNLOOP_ADMIN_TOKENS_FILE`` (default
  ``state_dir/secrets/admin_tokens.jsonl``; missing: no named tokens), one JSON object a
  line, the name and the SHA-256 of the token, never the token itself::

      {"name": "alice", "sha256": "9f…", "created_at": "…"}

  made by ``alignloop admin-tokens create alice`` (:func:`main`), which prints the token
  once. The file is re-read when it changes (checked at most once a second), so adding or
  revoking an operator needs no restart; a broken file keeps the last good set.

Every token is at least :data:`MIN_TOKEN_BYTES` bytes: a shorter ``ALIGNLOOP_ADMIN_TOKEN``
is refused when a process starts (:func:`startup_problem`, :class:`AdminTokens`).
Names follow the chat API's key names (:func:`serving.api_keys.check_name`); ``controller``
and ``trainer`` are refused (they mark the loop's own actions in the audit log), and so is
a second token of the same name. Lookup hashes the presented token once and compares it
with every digest in constant time, without stopping at the first match (as
:class:`serving.api_keys.KeyRing` does).

**Failed attempts.** :class:`AuthFailures` counts 401s and 403s per client address in a
sliding window; past the limit that address gets 429 with ``Retry-After`` until the window
has room again (in process memory: per replica, forgotten on restart).
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import math
import os
import secrets
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from deploy.policies.registry import CONTROLLER
from serving.api_keys import check_name, digest

log = logging.getLogger(__name__)

MIN_TOKEN_BYTES = 32
SINGLE_TOKEN_NAME = "admin"
"""The operator name of ``ALIGNLOOP_ADMIN_TOKEN`` in the audit log."""
RESERVED_NAMES = frozenset({CONTROLLER, "trainer"})
TOKEN_FILE = Path("secrets") / "admin_tokens.jsonl"
"""The token file under the state directory, unless ``ALIGNLOOP_ADMIN_TOKENS_FILE`` is set."""
_RELOAD_EVERY_S = 1.0


@dataclass(frozen=True)
class TokenEntry:
    name: str
    sha256: bytes
    created_at: str = ""


def check_token_name(name: str) -> str:
    check_name(name)
    if name in RESERVED_NAMES:
        raise ValueError(f"{name!r} names the loop's own actions in the audit log; pick another")
    return name


def check_token(token: str, what: str = "an admin token") -> str:
    size = len(token.encode("utf-8", "surrogatepass"))
    if size < MIN_TOKEN_BYTES:
        raise ValueError(
            f"{what} is {size} bytes; at least {MIN_TOKEN_BYTES} are required (make one with "
            "`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`, or named ones "
            "with `alignloop admin-tokens create NAME`)"
        )
    return token


# --- the token file ------------------------------------------------------------------------


def read_entries(path: Path) -> list[TokenEntry]:
    """The file's entries (none if it does not exist). A malformed line or a repeated name
    is an error: a file that half-loads would lock out whoever was on the other half."""
    if not path.exists():
        return []
    entries: list[TokenEntry] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            entry = TokenEntry(
                check_token_name(raw["name"]),
                bytes.fromhex(raw["sha256"]),
                str(raw.get("created_at", "")),
            )
            if len(entry.sha256) != 32:
                raise ValueError("sha256 is not 64 hex digits")
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: not an admin token entry ({e})") from None
        if any(e.name == entry.name for e in entries):
            raise ValueError(f"{path}:{n}: a second token named {entry.name!r}")
        entries.append(entry)
    return entries


def _write_entries(path: Path, entries: list[TokenEntry]) -> None:
    """Replace the file atomically (0600): a reader sees the old set or the new one."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        for e in entries:
            line = {"name": e.name, "sha256": e.sha256.hex(), "created_at": e.created_at}
            f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def create_token(path: Path, name: str) -> str:
    """Add a token named ``name`` and return it (the only time it is ever shown)."""
    token = "alad-" + secrets.token_urlsafe(32)
    add_token(path, name, token)
    return token


def add_token(path: Path, name: str, token: str) -> None:
    """Add ``token`` (made elsewhere, e.g. kept in a secret manager) under ``name``."""
    check_token_name(name)
    check_token(token)
    entries = read_entries(path)
    if any(e.name == name for e in entries):
        raise ValueError(f"a token named {name!r} exists; revoke it first or pick another name")
    created = datetime.now(UTC).isoformat(timespec="seconds")
    _write_entries(path, [*entries, TokenEntry(name, digest(token), created)])


def revoke_token(path: Path, name: str) -> bool:
    """Remove the token named ``name``; whether there was one."""
    entries = read_entries(path)
    kept = [e for e in entries if e.name != name]
    if len(kept) != len(entries):
        _write_entries(path, kept)
    return len(kept) != len(entries)


# --- the valid tokens ----------------------------------------------------------------------


class AdminTokens:
    """``ALIGNLOOP_ADMIN_TOKEN`` (named ``admin``) and the token file's named tokens.

    Raises ValueError when the single token is too short, or the file is malformed or
    names ``admin`` while the single token is set (two holders of one name)."""

    def __init__(self, token: SecretStr | str | None = None, file: Path | None = None) -> None:
        secret = token.get_secret_value() if isinstance(token, SecretStr) else token
        self._single = digest(check_token(secret, "ALIGNLOOP_ADMIN_TOKEN")) if secret else None
        self.file = file
        self._lock = threading.Lock()
        self._entries: list[TokenEntry] = []
        self._stamp: tuple[int, int] | None = None
        self._checked = time.monotonic()
        if file is not None:
            self._reload(file)

    def _reload(self, file: Path) -> None:
        try:
            st = file.stat()
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp:
            return
        entries = read_entries(file)
        if self._single is not None and any(e.name == SINGLE_TOKEN_NAME for e in entries):
            raise ValueError(
                f"{file} names a token {SINGLE_TOKEN_NAME!r}, the name of ALIGNLOOP_ADMIN_TOKEN"
            )
        self._entries, self._stamp = entries, stamp

    def _fresh(self) -> list[TokenEntry]:
        now = time.monotonic()
        if self.file is not None and now - self._checked >= _RELOAD_EVERY_S:
            with self._lock:
                self._checked = now
                try:
                    self._reload(self.file)
                except ValueError as exc:  # a hand-broken file: keep the last good set
                    log.warning("admin token file not reloaded: %s", exc)
        return self._entries

    def enabled(self) -> bool:
        """Whether any token is configured (without one, every /admin route is 503)."""
        return self._single is not None or bool(self._fresh())

    def names(self) -> list[str]:
        single = [SINGLE_TOKEN_NAME] if self._single is not None else []
        return single + [e.name for e in self._fresh()]

    def authenticate(self, presented: str) -> str | None:
        """The name of the token presented, or None. Every token is compared."""
        theirs = digest(presented)
        candidates = [(e.name, e.sha256) for e in self._fresh()]
        if self._single is not None:
            candidates.append((SINGLE_TOKEN_NAME, self._single))
        found: str | None = None
        for name, sha in candidates:
            if hmac.compare_digest(theirs, sha) and found is None:
                found = name
        return found


def token_file(settings: Any) -> Path:
    """``ALIGNLOOP_ADMIN_TOKENS_FILE``, else the default under the state directory."""
    return settings.admin_tokens_file or settings.state_dir / TOKEN_FILE


def configured(settings: Any, token: SecretStr | str | None = None) -> AdminTokens:
    """The tokens of the settings (``token``, if given, instead of ``ALIGNLOOP_ADMIN_TOKEN``)."""
    return AdminTokens(settings.admin_token if token is None else token, token_file(settings))


def startup_problem(settings: Any) -> str | None:
    """Why a process serving the admin API must not start (None: it may)."""
    try:
        configured(settings)
    except ValueError as exc:
        return str(exc)
    return None


# --- failed attempts -----------------------------------------------------------------------


class AuthFailures:
    """Failed authentications per client address in a sliding window of ``window_s``:
    :meth:`retry_after` is the seconds until an address that made ``max_failures`` of them
    may try again (None: it may now). ``max_failures`` 0: no limit. At most ``max_clients``
    addresses are remembered (the least recent are forgotten first). Called from the event
    loop only."""

    def __init__(
        self,
        max_failures: int,
        window_s: float,
        *,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_clients = max_clients
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, client: str, now: float) -> deque[float] | None:
        times = self._failures.get(client)
        if times is None:
            return None
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            del self._failures[client]
            return None
        return times

    def retry_after(self, client: str) -> int | None:
        if self.max_failures <= 0:
            return None
        now = self._clock()
        times = self._recent(client, now)
        if times is None or len(times) < self.max_failures:
            return None
        # Room again once all but max_failures - 1 of them have left the window.
        frees_at = times[len(times) - self.max_failures] + self.window_s
        return max(1, math.ceil(frees_at - now))

    def failed(self, client: str) -> None:
        if self.max_failures <= 0:
            return
        now = self._clock()
        times = self._recent(client, now) or deque()
        times.append(now)
        while len(times) > self.max_failures:  # older ones no longer decide anything
            times.popleft()
        self._failures[client] = times
        self._failures.move_to_end(client)
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)


def configured_failures(settings: Any) -> AuthFailures:
    return AuthFailures(settings.admin_auth_max_failures, settings.admin_auth_window_s)


# --- `alignloop admin-tokens` --------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``alignloop admin-tokens``: make, list and revoke named admin tokens.

    alignloop admin-tokens create alice   # prints alice's token, once
    alignloop admin-tokens list
    alignloop admin-tokens revoke alice

    The file is ALIGNLOOP_ADMIN_TOKENS_FILE (default: state_dir/secrets/admin_tokens.jsonl);
    the admin API picks changes up within a second.
    """
    ap = argparse.ArgumentParser(
        prog="alignloop admin-tokens",
        description=main.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--file", type=Path, help="the token file (default: from the settings)")
    sub = ap.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="make a token and print it (shown only this once)")
    create.add_argument("name", help="the operator: 1-64 of letters, digits, - _ . @")
    sub.add_parser("list", help="names and creation times (never the tokens)")
    revoke = sub.add_parser("revoke", help="remove a token: refused within a second")
    revoke.add_argument("name")
    args = ap.parse_args(argv)
    if args.file is None:
        from schemas.settings import Settings

        args.file = token_file(Settings())
    try:
        return _command(args)
    except ValueError as e:
        print(f"alignloop admin-tokens: {e}", file=sys.stderr)
        return 2


def _command(args: argparse.Namespace) -> int:
    if args.command == "create":
        print(create_token(args.file, args.name))
    elif args.command == "list":
        for e in read_entries(args.file):
            print(json.dumps({"name": e.name, "created_at": e.created_at}))
    elif not revoke_token(args.file, args.name):
        print(f"alignloop admin-tokens: no token named {args.name!r}", file=sys.stderr)
        return 1
    return 0
