"""The ``PolicyCandidate`` event: its wire form, its key, and what validation refuses; and
``prompt_hash``, the identity of a logged conversation."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from pydantic import ValidationError

from schemas.chat import Role
from schemas.events import LoggedMessage, PolicyCandidate, parse_event, prompt_hash


def candidate(**overrides: object) -> PolicyCandidate:
    fields: dict[str, Any] = {
        "producer": "trainer@test",
        "version": "ppo-0003",
        "adapter_uri": "/state/policies/ppo-0003",
        "checksum": "ab" * 32,
        "parent_version": "ppo-0002",
        "reward_model_version": "rm-0004",
        "training_round": 7,
        "metrics": {"win_rate": 0.61, "kl": 3.2, "per_prompt": [0.5, 0.7]},
    }
    fields.update(overrides)
    return PolicyCandidate(**fields)


def test_round_trips_through_parse_event() -> None:
    event = candidate()
    parsed = parse_event(event.to_bytes())
    assert isinstance(parsed, PolicyCandidate)
    assert parsed == event
    assert parsed.event_type == "policy.candidate"
    assert json.loads(event.to_bytes())["event_type"] == "policy.candidate"


def test_key_is_the_version() -> None:
    assert candidate().key() == b"ppo-0003"


def test_first_candidate_has_no_parent_or_reward_model() -> None:
    event = candidate(parent_version=None, reward_model_version=None)
    assert parse_event(event.to_bytes()) == event


def test_non_finite_metrics_are_sent_as_null() -> None:
    event = candidate(metrics={"kl": math.nan, "loss": [1.0, math.inf]})
    wire = json.loads(event.to_bytes())  # strict JSON: no NaN token
    assert wire["metrics"] == {"kl": None, "loss": [1.0, None]}
    parsed = parse_event(event.to_bytes())
    assert isinstance(parsed, PolicyCandidate)
    assert parsed.metrics == {"kl": None, "loss": [1.0, None]}


@pytest.mark.parametrize("missing", ["version", "adapter_uri", "checksum", "training_round"])
def test_required_fields(missing: str) -> None:
    wire = json.loads(candidate().to_bytes())
    del wire[missing]
    with pytest.raises(ValidationError, match=missing):
        parse_event(json.dumps(wire))


def test_unknown_fields_are_refused() -> None:
    wire = json.loads(candidate().to_bytes())
    wire["state"] = "stable"
    with pytest.raises(ValidationError, match="state"):
        parse_event(json.dumps(wire))


def _msgs(*pairs: tuple[Role, str]) -> list[LoggedMessage]:
    return [LoggedMessage(role=r, content=c) for r, c in pairs]


def test_prompt_hash_identifies_the_whole_conversation() -> None:
    one = prompt_hash(_msgs(("user", "hi")))
    assert one == prompt_hash(_msgs(("user", "hi")))
    assert one != prompt_hash(_msgs(("system", "hi")))
    assert one != prompt_hash(_msgs(("system", "be brief"), ("user", "hi")))
    # no ambiguity from concatenation: ["ab", "c"] vs ["a", "bc"]
    assert prompt_hash(_msgs(("user", "ab"), ("user", "c"))) != prompt_hash(
        _msgs(("user", "a"), ("user", "bc"))
    )
