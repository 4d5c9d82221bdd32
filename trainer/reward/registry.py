"""Reward model versions: files on disk, records in Postgres (table ``reward_models``).

A version is the directory ``state_dir/reward_models/<version>`` plus one row. The directory
is written atomically with a sha256 manifest (:mod:`trainer.common.artifacts`), so a
reader sees a whole version or none, and can check it before trusting it.

Registration happens in one transaction under an advisory lock: allocate the next number,
write the files, insert the row, and (for an accepted version) demote the old current one to
``previous``. Two trainers never get the same number, and a crash before commit leaves at
most an unreferenced directory that the next registration of that number replaces.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import psycopg
from psycopg.types.json import Jsonb

from trainer.common.artifacts import (
    MANIFEST_NAME,
    CorruptedDirectory,
    sha256_file,
    verify_dir,
    write_dir_atomically,
)

if TYPE_CHECKING:  # `alignloop reward list` reads records: it needs no torch
    from trainer.reward.model import RewardModel

REGISTRY_LOCK_KEY = 0x616C_726D  # "alrm": serialises version allocation across trainers
Status = Literal["current", "previous", "rejected"]


# --- the records ------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardVersion:
    """One row of ``reward_models``."""

    version: str
    number: int
    status: Status
    parent_version: str | None
    kind: str
    base_model: str | None
    path: str
    manifest_sha256: str
    watermark: dict[str, int]
    metrics: dict[str, Any]
    parent_metrics: dict[str, Any] | None
    reason: str
    config: dict[str, Any]
    train_stats: dict[str, Any]
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "created_at": self.created_at.isoformat()}


_COLUMNS = (
    "version, number, status, parent_version, kind, base_model, path, manifest_sha256, "
    "watermark, metrics, parent_metrics, reason, config, train_stats, created_at"
)


def versions_root(state_dir: Path) -> Path:
    return Path(state_dir) / "reward_models"


def list_versions(conn: psycopg.Connection) -> list[RewardVersion]:
    """All versions, newest first."""
    rows = conn.execute(f"SELECT {_COLUMNS} FROM reward_models ORDER BY number DESC").fetchall()
    return [RewardVersion(*row) for row in rows]


def get_version(conn: psycopg.Connection, version: str) -> RewardVersion | None:
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM reward_models WHERE version = %s", (version,)
    ).fetchone()
    return RewardVersion(*row) if row else None


def current_version(conn: psycopg.Connection) -> RewardVersion | None:
    """The version PPO should use, or None before the first accepted round."""
    row = conn.execute(f"SELECT {_COLUMNS} FROM reward_models WHERE status = 'current'").fetchone()
    return RewardVersion(*row) if row else None


def register_version(
    conn: psycopg.Connection,
    state_dir: Path,
    model: RewardModel,
    *,
    accepted: bool,
    parent_version: str | None,
    watermark: dict[str, int],
    metrics: dict[str, Any],
    parent_metrics: dict[str, Any] | None,
    reason: str,
    config: dict[str, Any],
    train_stats: dict[str, Any],
) -> RewardVersion:
    """Write ``model`` as the next version and record it: ``current`` if ``accepted`` (the
    old current becomes ``previous``), else ``rejected`` (the current one stays)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (REGISTRY_LOCK_KEY,))
        row = conn.execute("SELECT coalesce(max(number), 0) + 1 FROM reward_models").fetchone()
        assert row is not None
        number = int(row[0])
        version = f"rm-{number:04d}"
        path = versions_root(state_dir) / version
        manifest_sha = write_dir_atomically(path, model.save)
        status: Status = "current" if accepted else "rejected"
        if accepted:
            conn.execute("UPDATE reward_models SET status = 'previous' WHERE status = 'current'")
        card = model.card()
        conn.execute(
            """INSERT INTO reward_models (version, number, status, parent_version, kind,
                   base_model, path, manifest_sha256, watermark, metrics, parent_metrics,
                   reason, config, train_stats)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
            (
                version,
                number,
                status,
                parent_version,
                card["kind"],
                card.get("base_model"),
                str(path.resolve()),
                manifest_sha,
                Jsonb(watermark),
                Jsonb(metrics),
                Jsonb(parent_metrics) if parent_metrics is not None else None,
                reason,
                Jsonb(config),
                Jsonb(train_stats),
            ),
        )
    registered = get_version(conn, version)
    assert registered is not None
    return registered


def verified_path(record: RewardVersion) -> Path:
    """The version's directory after checking its files and manifest against the record."""
    path = Path(record.path)
    verify_dir(path)
    if sha256_file(path / MANIFEST_NAME) != record.manifest_sha256:
        raise CorruptedDirectory(f"{path}: manifest differs from the one registered")
    return path
