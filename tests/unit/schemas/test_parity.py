"""The parity table: docs/api.md shows it as it is, and it agrees with the request models."""

from pathlib import Path

import pytest

from schemas import parity
from schemas.chat import ChatCompletionRequest
from schemas.completions import CompletionRequest

PAGE = Path(__file__).resolve().parents[3] / "docs" / "api.md"
MODELS = {"chat": ChatCompletionRequest, "completions": CompletionRequest}


def test_docs_show_the_current_table():
    page = PAGE.read_text(encoding="utf-8")
    assert parity.START in page and parity.END in page
    assert parity.rewrite(page) == page, f"docs/api.md is stale; regenerate: {parity.REGENERATE}"


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_declared_fields_are_exactly_the_accepted_ones(endpoint):
    """A field the request model declares is honoured or ignored in the table; a refused
    one is not declared (so pydantic refuses it); no field is in the table twice."""
    table = parity.TABLES[endpoint]
    names = [p.name for p in table]
    assert len(names) == len(set(names))
    fields = {f.alias or name for name, f in MODELS[endpoint].model_fields.items()}
    accepted = {p.name for p in table if p.support != "refused"}
    assert fields == accepted


def test_refusal_quotes_the_reason():
    assert parity.refusal_message("chat", "functions") == (
        "Unsupported parameter: 'functions' is not supported by this server "
        "(deprecated by OpenAI: use `tools`)."
    )
    assert "'zzz'" in parity.refusal_message("chat", "zzz")
