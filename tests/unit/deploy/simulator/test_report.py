"""The simulator's report: Wilson intervals (checked against hand computation), per-minute
windows per version, and the summary's times, counts, rates and KL."""

from __future__ import annotations

import json
import math

import pytest

from deploy.simulator.report import (
    Recorder,
    RegistryEvent,
    RegistryFacts,
    build_summary,
    format_window,
    wilson,
    window_stats,
)


def test_wilson_by_hand() -> None:
    # 8 of 10, z = 1.96: z^2 = 3.8416; denominator 1 + 0.38416 = 1.38416;
    # centre (0.8 + 0.19208) / 1.38416 = 0.716738;
    # half 1.96 * sqrt(0.016 + 0.009604) / 1.38416 = 1.96 * 0.160012 / 1.38416 = 0.226581
    lo, hi = wilson(8, 10, z=1.96)
    assert lo == pytest.approx(0.490157, abs=1e-5)
    assert hi == pytest.approx(0.943319, abs=1e-5)


def test_wilson_edges() -> None:
    assert wilson(0, 0) is None
    lo, hi = wilson(0, 5, z=1.96)
    # p = 0: centre = half = (z^2 / 10) / (1 + z^2 / 5) = 0.38416 / 1.76832 = 0.217246
    assert lo == 0.0 and hi == pytest.approx(2 * 0.217246, abs=1e-5)
    lo, hi = wilson(5, 5, z=1.96)
    assert hi == 1.0 and lo == pytest.approx(1 - 2 * 0.217246, abs=1e-5)
    lo, hi = wilson(500, 1000)
    assert lo < 0.5 < hi and hi - lo < 0.07
    with pytest.raises(ValueError):
        wilson(6, 5)


def recorder_with(rows: list[tuple[float, str, int, str | None]]) -> Recorder:
    rec = Recorder()
    for t, version, words, rating in rows:
        obs = rec.served(t, version, words)
        if rating is not None:
            rec.rated(obs, rating, t + 0.1)
    return rec


def test_windows_per_version() -> None:
    rec = recorder_with(
        [
            (1.0, "base", 10, "up"),
            (2.0, "base", 20, "down"),
            (3.0, "base", 30, None),
            (59.9, "ppo-0001", 4, "up"),
            (60.0, "base", 8, "up"),  # the next minute
        ]
    )
    first = window_stats(rec.observations, 0, 60)
    assert set(first) == {"base", "ppo-0001"}
    base = first["base"]
    assert (base.served, base.rated, base.ups) == (3, 2, 1)
    assert base.up_rate == 0.5 and base.mean_words == 20.0
    assert base.interval == wilson(1, 2)
    second = window_stats(rec.observations, 60, 120)
    assert set(second) == {"base"} and second["base"].served == 1
    rows = format_window(1, first, {"base": "stable", "ppo-0001": "canary 5%"})
    assert len(rows) == 2
    assert rows[0].split()[:5] == ["1", "base", "3", "2", "0.500"]
    assert rows[0].endswith("stable") and rows[1].endswith("canary 5%")
    assert format_window(2, {}, None)[0].split()[1:3] == ["(no", "traffic)"]
    assert format_window(1, first, None)[0].endswith("?")  # registry not tracked


def test_summary_with_registry() -> None:
    rec = recorder_with(
        [(5.0, "base", 12, None)]
        + [(10.0 + i, "base", 12, "up" if i < 3 else "down") for i in range(10)]
        + [(200.0 + i, "ppo-0002", 5, "up" if i < 9 else "down") for i in range(10)]
    )
    rec.error("chat:http_503")
    rec.error("chat:http_503")
    rec.turns = 21
    facts = RegistryFacts(
        tracked=True,
        events=[
            RegistryEvent(100.0, "candidate", "ppo-0001"),
            RegistryEvent(120.0, "canary", "ppo-0001"),
            RegistryEvent(150.0, "rollback", "ppo-0001"),
            RegistryEvent(160.0, "candidate", "ppo-0002"),
            RegistryEvent(170.0, "canary", "ppo-0002"),
            RegistryEvent(250.0, "promotion", "ppo-0002"),
        ],
        final_stable="ppo-0002",
        states={"base": "retired", "ppo-0001": "rolled_back", "ppo-0002": "stable"},
        kl_to_reference={"base": None, "ppo-0001": 0.4, "ppo-0002": 0.031},
    )
    s = build_summary(rec, facts, started_at="2025-01-01T00:00:00+00:00", duration_s=300.0,
                      stopped_by="until promotion")  # fmt: skip
    # the first accepted rating was at 10.1 s: times count from there
    assert s.first_rating_s == 10.1
    assert s.time_to_first_candidate_s == pytest.approx(89.9)
    assert s.time_to_first_canary_s == pytest.approx(109.9)
    assert s.time_to_first_promotion_s == pytest.approx(239.9)
    assert (s.promotions, s.rollbacks, s.rejections) == (1, 1, 0)
    assert s.base["served"] == 11 and s.base["rated"] == 10 and s.base["up_rate"] == 0.3
    assert s.final_stable is not None and s.final_stable["version"] == "ppo-0002"
    assert s.final_stable["up_rate"] == 0.9
    lo, hi = wilson(9, 10)
    assert s.final_stable["up_rate_ci95"] == [round(lo, 4), round(hi, 4)]
    assert s.kl_stable_to_base == 0.031
    assert s.totals == {
        "turns": 21, "chats": 21, "ratings": 20, "ups": 12, "preferences": 0, "errors": 2,
    }  # fmt: skip
    assert s.errors == {"chat:http_503": 2}
    assert [e["event"] for e in s.events][:2] == ["candidate", "canary"]
    json.dumps(s.to_dict())  # all plain JSON


def test_summary_stable_is_base_has_zero_kl() -> None:
    rec = recorder_with([(1.0, "base", 3, "up")])
    facts = RegistryFacts(tracked=True, final_stable="base", states={"base": "stable"})
    s = build_summary(rec, facts, started_at="x", duration_s=60.0, stopped_by="time")
    assert s.kl_stable_to_base == 0.0 and s.final_stable == s.base
    assert s.time_to_first_candidate_s is None and s.promotions == 0


def test_summary_without_registry_says_so() -> None:
    rec = recorder_with([(1.0, "base", 3, "up"), (2.0, "base", 3, "down")])
    facts = RegistryFacts(tracked=False, note="admin API answered 503 admin_disabled")
    s = build_summary(rec, facts, started_at="x", duration_s=60.0, stopped_by="time")
    assert s.registry_tracked is False and "admin_disabled" in (s.registry_note or "")
    for field in (
        "time_to_first_candidate_s", "time_to_first_canary_s", "time_to_first_promotion_s",
        "promotions", "rollbacks", "rejections", "final_stable", "kl_stable_to_base",
        "registry_states",
    ):  # fmt: skip
        assert getattr(s, field) is None, field
    assert s.base["up_rate"] == 0.5 and s.totals["ratings"] == 2
    assert not math.isnan(s.duration_s)
