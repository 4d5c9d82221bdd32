"""The migration files as :mod:`feedback.db` loads them (no database needed)."""

from __future__ import annotations

from feedback.db import load_migrations


def test_migrations_are_numbered_and_ordered() -> None:
    migrations = load_migrations()
    versions = [m.version for m in migrations]
    assert versions == sorted(versions) and versions[0] == 1
    assert "CREATE TABLE policy_stats" in migrations[0].sql
