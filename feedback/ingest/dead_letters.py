"""Dead letters: a consumed message the ingestor could not store, and why.

Its one job: describe a rejected message so that it can be produced, unchanged, to the
dead-letter topic with enough context to find and replay it.

1. :class:`Message`: what the consumer keeps of every record it polls (topic, partition,
   offset, key, value), so a rejection can point back to its source;
2. :func:`rejection_reason`: an exception (pydantic validation, bad JSON, Postgres
   refusing a value) → a short, header-sized text (at most 1000 characters; for a
   validation error, the first five failing fields);
3. :class:`DeadLetter`: the message, its ``kind`` (``invalid``: failed parsing or
   validation; ``db_rejected``: valid, but Postgres refused it) and the reason;
   :meth:`DeadLetter.headers` is its record on the dead-letter topic (the value and key
   are the original message's).

Producing them (flushed and acknowledged before the batch's offsets are committed, retried
until the broker takes them) is the consumer's step: :mod:`feedback.ingest.consumer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import ValidationError

MAX_REASON_CHARS = 1000


@dataclass(frozen=True)
class Message:
    """What the ingestor keeps of a consumed record."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True)
class DeadLetter:
    message: Message
    kind: Literal["invalid", "db_rejected"]
    """invalid: failed parsing/validation; db_rejected: Postgres refused it."""
    reason: str

    def headers(self) -> list[tuple[str, bytes]]:
        """The Kafka headers of its dead-letter record: why, and where it came from."""
        m = self.message
        return [
            ("reason", self.reason.encode()),
            ("kind", self.kind.encode()),
            ("source_topic", m.topic.encode()),
            ("source_partition", str(m.partition).encode()),
            ("source_offset", str(m.offset).encode()),
        ]


def rejection_reason(exc: Exception) -> str:
    """A short, header-sized description of why a message was rejected."""
    if isinstance(exc, ValidationError):
        errors = exc.errors(include_url=False, include_input=False)
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors[:5]]
        return f"validation failed: {'; '.join(parts)}"[:MAX_REASON_CHARS]
    return f"{type(exc).__name__}: {exc}"[:MAX_REASON_CHARS]
