"""Every table the migrations create has a grant decision in schemas/db_roles.py, and every
decision names a real table with valid privileges: a migration that adds a table without
deciding who may touch it fails here (the grants are checked against a real server in
tests/integration/feedback/test_db_roles.py)."""

from __future__ import annotations

import re

import pytest

from deploy.ops import db_cli
from feedback.db import load_migrations
from schemas import db_roles

_CREATE_TABLE = re.compile(r"^\s*CREATE TABLE (?:IF NOT EXISTS )?([a-z_][a-z0-9_]*)", re.M | re.I)


def _created_tables() -> set[str]:
    tables = {"schema_migrations"}  # feedback.db.migrate creates it before the files
    for migration in load_migrations():
        tables |= set(_CREATE_TABLE.findall(migration.sql))
    return tables


def test_every_table_has_a_grant_decision_and_every_decision_a_table() -> None:
    created = _created_tables()
    assert created - set(db_roles.GRANTS) == set(), "add these tables to schemas/db_roles.py"
    assert set(db_roles.GRANTS) - created == set(), "no migration creates these tables"


@pytest.mark.parametrize("table", sorted(db_roles.GRANTS))
def test_every_decision_is_valid_sql_privileges(table: str) -> None:
    assert set(db_roles.GRANTS[table]) <= set(db_roles.COMPONENTS)
    for component in db_roles.COMPONENTS:
        db_roles.privileges(table, component)  # raises on anything but a known privilege


def test_privileges_parse_column_lists_and_refuse_anything_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(db_roles.GRANTS, "t", {"trainer": "SELECT, UPDATE (a, b), INSERT"})
    assert db_roles.privileges("t", "trainer") == ("SELECT", "UPDATE (a, b)", "INSERT")
    assert db_roles.privileges("t", "serving") == ()
    for bad in ("ALL", "SELECT; DROP TABLE t", "TRUNCATE", "UPDATE (a); x"):
        monkeypatch.setitem(db_roles.GRANTS, "t", {"trainer": bad})
        with pytest.raises(ValueError, match="unknown privileges"):
            db_roles.privileges("t", "trainer")


def test_serving_reads_only_the_registry_and_nobody_writes_the_schema_record() -> None:
    serving = {t for t in db_roles.GRANTS if db_roles.privileges(t, "serving")}
    assert serving == {"schema_migrations", "policy_routing", "policy_versions"}
    assert all(db_roles.privileges(t, "serving") == ("SELECT",) for t in serving)
    for component in db_roles.COMPONENTS:
        assert db_roles.privileges("schema_migrations", component) == ("SELECT",)
        assert db_roles.privileges("db_roles", component) == ()


def test_roles_show_prints_one_line_per_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert db_cli.main(["roles", "--show"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(db_roles.GRANTS)
    assert any(line.startswith("db_roles") and "(owner only)" in line for line in lines)
    routing = next(line for line in lines if line.startswith("policy_routing"))
    assert "serving: SELECT;" in routing and "trainer: SELECT, UPDATE (updated_at)" in routing
    assert set(db_roles.PROCESSES) == set(db_roles.COMPONENTS)
