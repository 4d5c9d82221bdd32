"""Operators' requests to start a training round now (migration 0008).

The console (or any admin client) calls :func:`request_round`; the training loop calls
:func:`open_request` before it asks its trigger, :func:`take` it, runs a round with the
request's ``trigger`` text, then :func:`link` the round. Taking before running means a loop
killed mid-round resumes that round and never starts a second one for the same request.

A request starts one round at the loop's next poll, whatever the new-rating count and the
timer say, and without waiting for a canary's decision (the operator asked now); it does
not interrupt a running round (the loop resumes that one first).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import psycopg

_ONE_OPEN_INDEX = "round_requests_one_open"
_COLUMNS = "id, requested_by, reason, requested_at, taken_at, round_id"


@dataclass(frozen=True)
class RoundRequest:
    """One row of ``round_requests``."""

    id: int
    requested_by: str
    reason: str
    requested_at: datetime
    taken_at: datetime | None
    round_id: int | None

    @property
    def trigger(self) -> str:
        """The started round's ``trigger`` text."""
        return f"requested by {self.requested_by}: {self.reason}"


class RequestAlreadyOpen(Exception):
    """A request waits already; it is the one the loop will take."""

    def __init__(self, request: RoundRequest) -> None:
        super().__init__(f"round request {request.id} by {request.requested_by} is already waiting")
        self.request = request


def open_request(conn: psycopg.Connection) -> RoundRequest | None:
    """The request waiting to be taken, if any."""
    row = conn.execute(f"SELECT {_COLUMNS} FROM round_requests WHERE taken_at IS NULL").fetchone()
    return RoundRequest(*row) if row else None


def last_request(conn: psycopg.Connection) -> RoundRequest | None:
    """The newest request, open or taken."""
    row = conn.execute(f"SELECT {_COLUMNS} FROM round_requests ORDER BY id DESC LIMIT 1").fetchone()
    return RoundRequest(*row) if row else None


def request_round(conn: psycopg.Connection, *, actor: str, reason: str) -> RoundRequest:
    """Ask for a round. Raises :class:`RequestAlreadyOpen` when one waits already (the
    database's partial unique index decides, so two clicks racing cannot both insert)."""
    if not reason.strip():
        raise ValueError("a round request needs a reason")
    try:
        row = conn.execute(
            f"INSERT INTO round_requests (requested_by, reason) VALUES (%s, %s)"
            f" RETURNING {_COLUMNS}",
            (actor, reason),
        ).fetchone()
    except psycopg.errors.UniqueViolation as exc:
        if exc.diag.constraint_name != _ONE_OPEN_INDEX:
            raise
        existing = open_request(conn)
        assert existing is not None
        raise RequestAlreadyOpen(existing) from exc
    assert row is not None
    return RoundRequest(*row)


def take(conn: psycopg.Connection, request_id: int) -> bool:
    """Mark the request taken; False when it was taken already (by another loop)."""
    cur = conn.execute(
        "UPDATE round_requests SET taken_at = now() WHERE id = %s AND taken_at IS NULL",
        (request_id,),
    )
    return cur.rowcount == 1


def link(conn: psycopg.Connection, request_id: int, round_id: int) -> None:
    """Record the round a taken request ran."""
    conn.execute(
        "UPDATE round_requests SET round_id = %s WHERE id = %s AND taken_at IS NOT NULL",
        (round_id, request_id),
    )
