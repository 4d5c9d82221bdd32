"""PPO training rounds in Postgres: the round's lifecycle row and its per-iteration metrics
(tables ``training_rounds`` and ``training_steps``, migration 0006).

A round is started ``running`` (:func:`start_round`), filled in as it learns what it trains
on (:func:`update_round`: reward model, data watermark, parent policy), records one metrics
row per PPO iteration (:func:`record_step`, an upsert, so a resumed round may re-record an
iteration), and ends exactly once in a terminal status (:func:`finish_round`):
``registered``, ``rejected`` (failed an evaluation gate), ``failed`` (an error or not enough
data) or ``aborted`` (NaN/inf, exploding KL). The database allows one running round at
most; a trainer that was killed finds it with :func:`running_round` and resumes it.

The scheduler's input is :func:`feedback.datasets.new_ratings_since`: how much feedback
arrived after a round's ``watermark`` (``feedback.datasets.Watermark``: one ``seq`` per
table, because ratings and preferences are numbered by separate sequences, so no single
integer can say "feedback up to here"). A round's watermark is set when it starts (the
feedback available then) and replaced by the exact data snapshot it trains on, so even a
round that failed before reading data tells the scheduler where to count from.

JSON values are made storable first: jsonb has no NaN or Infinity, so non-finite floats
are stored as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (a diverged round's
last metrics are exactly the ones worth keeping; in SQL ``(metrics ->> 'x')::float8``
reads them back as floats); numpy/torch scalars, dataclasses, paths and datetimes are
converted. Values read back are returned as stored (the strings stay strings).

Every function takes an *autocommit* connection (like ``deploy.policies.registry`` and
``trainer.reward.registry``); each statement is its own transaction.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import PurePath
from typing import Any, Literal, get_args

import psycopg
from psycopg.types.json import Jsonb

from feedback.datasets import Watermark, capture_watermark, watermark_from

RoundStatus = Literal["running", "registered", "rejected", "failed", "aborted"]
TerminalStatus = Literal["registered", "rejected", "failed", "aborted"]
STATUSES: tuple[str, ...] = get_args(RoundStatus)
TERMINAL_STATUSES: tuple[str, ...] = get_args(TerminalStatus)

_ONE_RUNNING_INDEX = "training_rounds_one_running"


class RoundError(Exception):
    """Base of every round-record error."""


class RoundAlreadyRunning(RoundError):
    """:func:`start_round` while another round is running (resume that one instead)."""

    def __init__(self, running: TrainingRound | None) -> None:
        if running is None:  # it finished between the refused insert and our look
            super().__init__("another training round was running")
        else:
            super().__init__(
                f"training round {running.id} is already running (since "
                f"{running.started_at.isoformat()}, trigger: {running.trigger})"
            )
        self.running = running


class UnknownRound(RoundError):
    def __init__(self, round_id: int) -> None:
        super().__init__(f"no training round {round_id}")
        self.round_id = round_id


class RoundFinished(RoundError):
    """A change to a round that already ended (its record is final)."""

    def __init__(self, existing: TrainingRound) -> None:
        super().__init__(
            f"training round {existing.id} already finished as {existing.status}: {existing.reason}"
        )
        self.round = existing


@dataclass(frozen=True)
class TrainingRound:
    """One row of ``training_rounds``."""

    id: int
    status: RoundStatus
    trigger: str
    reason: str | None
    reward_model_version: str | None
    parent_version: str | None
    candidate_version: str | None
    watermark: dict[str, int] | None
    config: dict[str, Any]
    metrics: dict[str, Any]
    started_at: datetime
    finished_at: datetime | None

    @property
    def finished(self) -> bool:
        return self.status != "running"

    def to_json(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
        }


_COLUMNS = (
    "id, status, trigger, reason, reward_model_version, parent_version, candidate_version, "
    "watermark, config, metrics, started_at, finished_at"
)


# --- JSON that jsonb accepts ----------------------------------------------------------------


def storable(value: Any) -> Any:
    """``value`` as plain JSON types, non-finite floats as strings (see the module doc)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, float):  # also numpy.float64, a float subclass
        if math.isfinite(value):
            return float(value)
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, int):
        return int(value)
    if isinstance(value, Mapping):
        return {str(k): storable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [storable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return storable(dataclasses.asdict(value))
    if isinstance(value, enum.Enum):
        return storable(value.value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, PurePath):
        return str(value)
    item = getattr(value, "item", None)  # numpy scalars, one-element torch tensors
    if callable(item):
        try:
            return storable(item())
        except (TypeError, ValueError, RuntimeError):
            pass
    tolist = getattr(value, "tolist", None)  # numpy arrays, tensors
    if callable(tolist):
        return storable(tolist())
    return str(value)


def _jsonb(value: Any) -> Jsonb:
    # allow_nan=False: a non-finite float that slipped through is a bug here, not a row
    # Postgres refuses later with a less helpful message.
    return Jsonb(storable(value), dumps=lambda v: json.dumps(v, allow_nan=False))


def _watermark_dict(watermark: Watermark | Mapping[str, int]) -> dict[str, int]:
    return dataclasses.asdict(watermark_from(watermark))


# --- reads --------------------------------------------------------------------------------


def _one(conn: psycopg.Connection, where: str, params: tuple[Any, ...]) -> TrainingRound | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM training_rounds {where}", params).fetchone()
    return TrainingRound(*row) if row else None


def get_round(conn: psycopg.Connection, round_id: int) -> TrainingRound:
    """The round ``round_id``; raises :class:`UnknownRound`."""
    found = _one(conn, "WHERE id = %s", (round_id,))
    if found is None:
        raise UnknownRound(round_id)
    return found


def running_round(conn: psycopg.Connection) -> TrainingRound | None:
    """The unfinished round (a killed trainer resumes it), or None."""
    return _one(conn, "WHERE status = 'running'", ())


def last_round(conn: psycopg.Connection) -> TrainingRound | None:
    """The newest round by id, whatever its status; None before the first."""
    return _one(conn, "ORDER BY id DESC LIMIT 1", ())


def list_rounds(conn: psycopg.Connection, limit: int = 20) -> list[TrainingRound]:
    """The newest ``limit`` rounds, newest first."""
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM training_rounds ORDER BY id DESC LIMIT %s", (limit,)
    ).fetchall()
    return [TrainingRound(*row) for row in rows]


def steps(conn: psycopg.Connection, round_id: int) -> list[tuple[int, dict[str, Any]]]:
    """``(iteration, metrics)`` of every recorded iteration of the round, in order."""
    rows = conn.execute(
        "SELECT iteration, metrics FROM training_steps WHERE round_id = %s ORDER BY iteration",
        (round_id,),
    ).fetchall()
    return [(int(i), m) for i, m in rows]


# --- writes -------------------------------------------------------------------------------


def start_round(
    conn: psycopg.Connection, *, trigger: str, config: dict[str, Any], parent_version: str | None
) -> TrainingRound:
    """Insert a new ``running`` round. Raises :class:`RoundAlreadyRunning` when one is
    running already (the database's partial unique index decides, so two trainers racing
    here cannot both succeed).

    The round's ``watermark`` starts as the feedback available now, so every round, even
    one that fails before reading any data, marks where the next trigger counts new
    ratings from; ``update_round(watermark=...)`` replaces it with the exact snapshot the
    round trains on."""
    watermark = _jsonb(capture_watermark(conn))
    try:
        row = conn.execute(
            f"""INSERT INTO training_rounds (status, trigger, parent_version, config, watermark)
                VALUES ('running', %s, %s, %s, %s) RETURNING {_COLUMNS}""",
            (trigger, parent_version, _jsonb(config), watermark),
        ).fetchone()
    except psycopg.errors.UniqueViolation as exc:
        if exc.diag.constraint_name != _ONE_RUNNING_INDEX:
            raise
        raise RoundAlreadyRunning(running_round(conn)) from exc
    assert row is not None
    return TrainingRound(*row)


def _refuse_unless_running(conn: psycopg.Connection, round_id: int) -> None:
    """Raise the right error for a write to ``round_id`` that matched no running round."""
    existing = get_round(conn, round_id)  # UnknownRound if absent
    if existing.finished:
        raise RoundFinished(existing)


def update_round(
    conn: psycopg.Connection,
    round_id: int,
    *,
    reward_model_version: str | None = None,
    watermark: Watermark | Mapping[str, int] | None = None,
    parent_version: str | None = None,
) -> None:
    """Set the fields given (not None) on a running round. Raises :class:`UnknownRound`
    or :class:`RoundFinished`; with nothing to set it changes nothing and checks nothing."""
    sets: list[str] = []
    params: list[Any] = []
    if reward_model_version is not None:
        sets.append("reward_model_version = %s")
        params.append(reward_model_version)
    if watermark is not None:
        sets.append("watermark = %s")
        params.append(_jsonb(_watermark_dict(watermark)))
    if parent_version is not None:
        sets.append("parent_version = %s")
        params.append(parent_version)
    if not sets:
        return
    cur = conn.execute(
        f"UPDATE training_rounds SET {', '.join(sets)} WHERE id = %s AND status = 'running'",
        (*params, round_id),
    )
    if cur.rowcount != 1:
        _refuse_unless_running(conn, round_id)


def record_step(
    conn: psycopg.Connection, round_id: int, iteration: int, metrics: dict[str, Any]
) -> None:
    """Store iteration ``iteration``'s metrics, replacing an earlier record of the same
    iteration (a resumed round). Only a running round takes steps: raises
    :class:`UnknownRound` or :class:`RoundFinished` otherwise."""
    cur = conn.execute(
        """INSERT INTO training_steps (round_id, iteration, metrics)
           SELECT id, %s, %s FROM training_rounds WHERE id = %s AND status = 'running'
           ON CONFLICT (round_id, iteration)
           DO UPDATE SET metrics = EXCLUDED.metrics, created_at = now()""",
        (iteration, _jsonb(metrics), round_id),
    )
    if cur.rowcount != 1:
        _refuse_unless_running(conn, round_id)


def finish_round(
    conn: psycopg.Connection,
    round_id: int,
    status: TerminalStatus,
    reason: str,
    *,
    metrics: dict[str, Any] | None = None,
    candidate_version: str | None = None,
) -> TrainingRound:
    """End a running round: its terminal ``status``, the ``reason``, ``finished_at``; the
    given ``metrics`` are merged into the round's (top-level keys replaced). ``registered``
    needs ``candidate_version``. Raises ``ValueError`` for a non-terminal status,
    :class:`UnknownRound`, or :class:`RoundFinished` (a round ends once)."""
    if status not in TERMINAL_STATUSES:
        raise ValueError(
            f"a round finishes as one of {', '.join(TERMINAL_STATUSES)}, not {status!r}"
        )
    if status == "registered" and candidate_version is None:
        raise ValueError("a registered round needs its candidate_version")
    row = conn.execute(
        f"""UPDATE training_rounds
            SET status = %s, reason = %s, finished_at = now(),
                metrics = metrics || %s,
                candidate_version = coalesce(%s, candidate_version)
            WHERE id = %s AND status = 'running'
            RETURNING {_COLUMNS}""",
        (status, reason, _jsonb(metrics or {}), candidate_version, round_id),
    ).fetchone()
    if row is None:
        _refuse_unless_running(conn, round_id)
        raise AssertionError("unreachable: the round is running but was not updated")
    return TrainingRound(*row)


# --- what the scheduler reads ---------------------------------------------------------------
