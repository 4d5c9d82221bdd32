"""Waiting for events on a topic the whole test session shares."""

from __future__ import annotations

import time

from tests.fixtures.broker import consume_events


def wait_for_events(bootstrap: str, topic: str, key_of, wanted: set[str], timeout: float):
    """Read ``topic`` until an event for every id in ``wanted`` arrived (``key_of(event)``
    names the id an event is about); return those events, duplicates included."""
    deadline = time.monotonic() + timeout
    found = []
    while time.monotonic() < deadline:
        events = consume_events(bootstrap, topic, expected=1, timeout=10)
        found = [e for e in events if key_of(e) in wanted]
        if {key_of(e) for e in found} >= wanted:
            return found
        time.sleep(0.5)
    return found
