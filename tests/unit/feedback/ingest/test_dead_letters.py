"""Dead letters: the reason recorded for a message the ingestor could not store."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from feedback.ingest.dead_letters import rejection_reason
from schemas.events import parse_event


def test_dead_letter_reason_names_the_failing_field() -> None:
    with pytest.raises(ValidationError) as info:
        parse_event(b'{"event_type": "feedback.submitted", "schema_version": 2}')
    reason = rejection_reason(info.value)
    assert reason.startswith("validation failed:")
    assert "schema_version" in reason
    assert len(rejection_reason(ValueError("x" * 5000))) <= 1000
