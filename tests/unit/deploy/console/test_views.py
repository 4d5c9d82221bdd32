"""The console's pure pieces against hand-computed cases."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from deploy.console.views import curves, per_stage, routed_share, thin, wilson_interval
from deploy.policies.registry import AuditEntry, Routing


def test_wilson_interval_by_hand() -> None:
    # 8 ups of 10: p = 0.8, z = 1.96: centre 0.99208 / 1.38416, half-width
    # 1.96 * sqrt(0.016 + 0.009604) / 1.38416 (the textbook 0.4902 .. 0.9433).
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.490156, abs=1e-6) and hi == pytest.approx(0.943320, abs=1e-6)
    # No up at all: the interval starts at 0 and still has width (unlike p ± z·se = 0 ± 0).
    lo, hi = wilson_interval(0, 5)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.434492, abs=1e-6)
    assert wilson_interval(0, 0) is None


def test_thin_keeps_ends_and_spacing() -> None:
    assert thin(list(range(5)), limit=10) == [0, 1, 2, 3, 4]
    assert thin(list(range(10)), limit=4) == [0, 3, 6, 9]
    assert thin(list(range(101)), limit=3) == [0, 50, 100]


def _routing(canary: str | None, weight: float) -> Routing:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    return Routing(
        "s", canary, weight, 0 if canary else None, now if canary else None, None,
        False, None, None, 1, now,
    )  # fmt: skip


def test_routed_share() -> None:
    r = _routing("c", 0.25)
    assert (routed_share(r, "c"), routed_share(r, "s"), routed_share(r, "x")) == (0.25, 0.75, 0.0)
    assert routed_share(_routing(None, 0.0), "s") == 1.0


def _decision(stage: int, stable: int, canary: int, new_users=None, weights=None) -> AuditEntry:
    stats = {"stage": stage, "votes": {"stable": stable, "canary": canary}}
    if new_users is not None:
        stats |= {"srm_new_users": new_users, "strata_weights": weights}
    at = datetime(2026, 1, 1, tzinfo=UTC)
    return AuditEntry(1, at, "controller", "decision:continue", "c", None, None, "", stats, 1)


def test_per_stage_votes_are_differences_of_cumulative_counts() -> None:
    decisions = [
        _decision(0, 10, 2),
        _decision(0, 40, 9),  # stage 0 ends with 40 / 9
        _decision(1, 70, 30),
        _decision(1, 100, 61, {"stable": [20, 5], "canary": [3, 12]}, [0.1, 0.5]),
    ]
    assert per_stage(decisions) == [
        {
            "stage": 0,
            "weight": 0.1,
            "votes": {"stable": 40, "canary": 9},
            "new_users": {"stable": 20, "canary": 3},
        },
        {
            "stage": 1,
            "weight": 0.5,
            "votes": {"stable": 60, "canary": 52},
            "new_users": {"stable": 5, "canary": 12},
        },
    ]
    assert per_stage([]) == []


def test_curves_align_iterations_and_leave_gaps() -> None:
    steps = [(0, {"reward_raw": 0.1, "kl_ref": 0.0}), (1, {"reward_raw": 0.3})]
    c = curves(steps)
    assert c["iteration"] == [0, 1]
    assert c["reward_raw"] == [0.1, 0.3]
    assert c["kl_ref"] == [0.0, None]
    assert c["entropy"] == [None, None]
