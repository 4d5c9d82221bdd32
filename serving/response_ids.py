"""Response ids that prove their origin.

A response id is ``chatcmpl-<nonce><mac>``: 24 hex digits of randomness and the first
16 hex digits of HMAC-SHA256(secret, nonce). Feedback names a response by its id; any
serving replica holding the shared secret can reject a forged or mistyped id at once,
without asking the database whether the id was ever issued.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

PREFIX = "chatcmpl-"
_NONCE_HEX = 24
_MAC_HEX = 16


class ResponseIdSigner:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the response id secret must be at least 16 bytes")
        self._secret = secret

    def _mac(self, nonce: str) -> str:
        return hmac.new(self._secret, nonce.encode(), hashlib.sha256).hexdigest()[:_MAC_HEX]

    def new_id(self) -> str:
        nonce = secrets.token_hex(_NONCE_HEX // 2)
        return f"{PREFIX}{nonce}{self._mac(nonce)}"

    def is_valid(self, response_id: str) -> bool:
        if not isinstance(response_id, str) or not response_id.startswith(PREFIX):
            return False
        body = response_id[len(PREFIX) :]
        # ASCII only: compare_digest refuses other text (and a lone surrogate cannot
        # even be encoded); anything else is simply not an id this service issued.
        if len(body) != _NONCE_HEX + _MAC_HEX or not body.isascii():
            return False
        nonce, mac = body[:_NONCE_HEX], body[_NONCE_HEX:]
        return hmac.compare_digest(mac, self._mac(nonce))


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
