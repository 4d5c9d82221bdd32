"""Pure parts of the feedback package: prompt identity, held-out split, migration files,
dead-letter reasons."""

from __future__ import annotations

import hashlib

import pytest
from pydantic import ValidationError

from feedback.datasets import is_heldout
from feedback.db import load_migrations
from feedback.ingestor import _reason, prompt_hash
from schemas.events import LoggedMessage, parse_event


def _msgs(*pairs: tuple[str, str]) -> list[LoggedMessage]:
    return [LoggedMessage(role=r, content=c) for r, c in pairs]  # type: ignore[arg-type]


def test_prompt_hash_identifies_the_whole_conversation() -> None:
    one = prompt_hash(_msgs(("user", "hi")))
    assert one == prompt_hash(_msgs(("user", "hi")))
    assert one != prompt_hash(_msgs(("system", "hi")))
    assert one != prompt_hash(_msgs(("system", "be brief"), ("user", "hi")))
    # no ambiguity from concatenation: ["ab", "c"] vs ["a", "bc"]
    assert prompt_hash(_msgs(("user", "ab"), ("user", "c"))) != prompt_hash(
        _msgs(("user", "a"), ("user", "bc"))
    )


def test_heldout_split_is_stable_and_roughly_the_requested_fraction() -> None:
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(4000)]
    held = [h for h in hashes if is_heldout(h, 0.2)]
    assert 0.17 < len(held) / len(hashes) < 0.23
    assert held == [h for h in hashes if is_heldout(h, 0.2)]
    assert set(held) <= {h for h in hashes if is_heldout(h, 0.5)}  # growing never reshuffles
    assert not any(is_heldout(h, 0.0) for h in hashes)


def test_migrations_are_numbered_and_ordered() -> None:
    migrations = load_migrations()
    versions = [m.version for m in migrations]
    assert versions == sorted(versions) and versions[0] == 1
    assert "CREATE TABLE policy_stats" in migrations[0].sql


def test_dead_letter_reason_names_the_failing_field() -> None:
    with pytest.raises(ValidationError) as info:
        parse_event(b'{"event_type": "feedback.submitted", "schema_version": 2}')
    reason = _reason(info.value)
    assert reason.startswith("validation failed:")
    assert "schema_version" in reason
    assert len(_reason(ValueError("x" * 5000))) <= 1000
