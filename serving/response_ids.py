"""Response ids that say who may rate them.

A response id is ``chatcmpl-`` + 40 hex digits::

    nonce (14)  n (2)  issued (8)  mac (16)

``nonce`` is random, ``n`` the number of choices the answer has, ``issued`` the unix time
it was made, and ``mac`` the first 16 hex digits of HMAC-SHA256(secret, nonce n issued
principal user): the id is bound to the API key's name (the principal) and to the end user
the product named when it asked (none is bound as none). Feedback names a response by its
id, so any replica holding the secret can check at once, without a database lookup, that
the id was issued, to this caller, for this user, with this many choices, and not too long
ago. To anyone else the id is simply unknown (404): a vote belongs to the one served.

Several secrets may be valid at once (the first signs, all verify), so the secret rotates
without turning feedback on older answers into 404s; the id stays the same length
whichever secret made it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "chatcmpl-"
_NONCE_HEX = 14
_N_HEX = 2
_TIME_HEX = 8
_MAC_HEX = 16
_BODY_HEX = _NONCE_HEX + _N_HEX + _TIME_HEX + _MAC_HEX
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class IssuedResponse:
    """What a verified id says about its answer."""

    n: int
    issued_at: int


class ResponseIdSigner:
    def __init__(self, *secrets_: bytes) -> None:
        if not secrets_ or any(len(s) < 16 for s in secrets_):
            raise ValueError("a response id secret must be at least 16 bytes")
        self._secrets = secrets_

    @staticmethod
    def _mac(secret: bytes, head: str, principal: str, user: str | None) -> str:
        # NUL cannot occur in a principal or a user id (both are refused with NUL), so the
        # three fields cannot be re-split into another triple with the same MAC input.
        message = "\0".join((head, principal, "" if user is None else user)).encode(
            "utf-8", "surrogatepass"
        )
        return hmac.new(secret, message, hashlib.sha256).hexdigest()[:_MAC_HEX]

    def new_id(self, principal: str, user: str | None, n: int, now: float | None = None) -> str:
        if not 1 <= n < 16**_N_HEX:
            raise ValueError(f"n must be between 1 and {16**_N_HEX - 1}")
        issued = int(time.time() if now is None else now)
        head = f"{secrets.token_hex(_NONCE_HEX // 2)}{n:0{_N_HEX}x}{issued:0{_TIME_HEX}x}"
        return f"{PREFIX}{head}{self._mac(self._secrets[0], head, principal, user)}"

    def verify(
        self, response_id: object, principal: str, user: str | None
    ) -> IssuedResponse | None:
        """What the id says, if this service issued it to ``principal`` for ``user``;
        else None (forged, mistyped, or someone else's)."""
        if not isinstance(response_id, str) or not response_id.startswith(PREFIX):
            return None
        body = response_id[len(PREFIX) :]
        # Lower-case hex only: compare_digest refuses other text, and a lone surrogate
        # cannot even be encoded; anything else is simply not an id this service issued.
        if len(body) != _BODY_HEX or not set(body) <= _HEX:
            return None
        head, mac = body[:-_MAC_HEX], body[-_MAC_HEX:]
        ok = False
        for secret in self._secrets:  # every secret, match or not: no timing by position
            ok |= hmac.compare_digest(mac, self._mac(secret, head, principal, user))
        if not ok:
            return None
        n = int(head[_NONCE_HEX : _NONCE_HEX + _N_HEX], 16)
        issued = int(head[_NONCE_HEX + _N_HEX :], 16)
        return IssuedResponse(n=n, issued_at=issued)


def parse_secrets(text: str) -> list[bytes]:
    """``ALIGNLOOP_RESPONSE_ID_SECRET``: one secret, or several comma-separated (the first
    signs new ids, all verify)."""
    return [part.strip().encode() for part in text.split(",") if part.strip()]


def load_or_create_secret(path: Path) -> bytes:
    """The embedded default: a random key made once and kept (mode 0600) in the state dir,
    so every replica started from the same state dir signs and verifies alike."""
    if path.exists():
        return path.read_bytes().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32).encode()
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)  # atomic and exclusive: of two racing replicas, one key wins
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_bytes().strip()
