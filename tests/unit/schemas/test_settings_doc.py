"""docs/configuration.md is generated from `Settings` and must not drift from it."""

from pathlib import Path

from schemas.settings import Settings
from schemas.settings_doc import REGENERATE, env_var, settings_markdown

PAGE = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"


def test_configuration_page_is_current():
    assert PAGE.read_text(encoding="utf-8") == settings_markdown(), (
        f"docs/configuration.md differs from schemas/settings.py; regenerate: {REGENERATE}"
    )


def test_a_real_field_appears_with_its_env_var_default_and_description():
    rows = [line for line in settings_markdown().splitlines() if line.startswith("| `")]
    row = next(r for r in rows if r.startswith("| `ALIGNLOOP_INGEST_METRICS_PORT` |"))
    assert "`9102`" in row
    assert "Ingestor /metrics port; 0 = off." in row


def test_every_field_has_one_row():
    text = settings_markdown()
    assert env_var("database_url") == "ALIGNLOOP_DATABASE_URL"
    for name in Settings.model_fields:
        assert text.count(f"| `{env_var(name)}` |") == 1, name
