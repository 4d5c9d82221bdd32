"""Dataset builders over a hand-made set of interactions, ratings and preferences."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from feedback import datasets
from feedback.cli import export_main
from feedback.ingestor import store_events
from schemas.events import LoggedMessage, PreferenceSubmitted
from tests.fixtures.postgres import make_feedback, make_interaction

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def preference(**fields: object) -> PreferenceSubmitted:
    return PreferenceSubmitted(producer="test", preference_id=uuid.uuid4(), **fields)  # type: ignore[arg-type]


@pytest.fixture
def world(conn: psycopg.Connection) -> dict[str, str]:
    """Prompt P answered four times (A up, B down, C up then re-rated down, D tied one up one
    down), prompt Q answered once with two choices (0 up, 1 down), prompt R rated up only
    (no pair possible), plus explicit preferences of both kinds."""
    a = make_interaction(prompt="P", answers=("A",))
    b = make_interaction(prompt="P", answers=("B",))
    c = make_interaction(prompt="P", answers=("C",))
    d = make_interaction(prompt="P", answers=("D",))
    q = make_interaction(prompt="Q", answers=("Q0", "Q1"), policy="v2")
    r = make_interaction(prompt="R", answers=("R0",))
    store_events(
        conn,
        [
            a,
            b,
            c,
            d,
            q,
            r,
            make_feedback(a.response_id, "up", at=T0),
            make_feedback(b.response_id, "down", at=T0),
            make_feedback(c.response_id, "up", at=T0),
            make_feedback(c.response_id, "down", at=T0 + timedelta(1)),  # re-rated
            make_feedback(d.response_id, "up", user="x", at=T0),
            make_feedback(d.response_id, "down", user="y", at=T0),
            make_feedback(q.response_id, "up", choice_index=0, at=T0),
            make_feedback(q.response_id, "down", choice_index=1, at=T0),
            make_feedback(r.response_id, "up", at=T0),
            preference(chosen_response_id=b.response_id, rejected_response_id=a.response_id),
            preference(chosen_response_id=a.response_id, rejected_response_id=q.response_id),
            preference(chosen_response_id="never-logged", rejected_response_id=a.response_id),
            preference(
                messages=[LoggedMessage(role="user", content="T")], chosen="good", rejected="bad"
            ),
        ],
    )
    return {"a": a.response_id, "b": b.response_id, "c": c.response_id, "q": q.response_id}


def _pairs(conn: psycopg.Connection) -> list[tuple[str, str, str, str]]:
    with datasets.snapshot(conn) as wm:
        return [
            (p.source, p.messages[-1]["content"], p.chosen, p.rejected)
            for p in datasets.preference_pairs(conn, wm)
        ]


def test_preference_pairs_from_explicit_preferences_and_ratings(
    conn: psycopg.Connection, world: dict[str, str]
) -> None:
    assert sorted(_pairs(conn)) == sorted(
        [
            # explicit: by response ids (same prompt) and by texts; the one across prompts
            # and the one naming an unknown response are skipped
            ("preference", "P", "B", "A"),
            ("preference", "T", "good", "bad"),
            # ratings: A up vs B and C (C's current rating is down); D is tied
            ("ratings", "P", "A", "B"),
            ("ratings", "P", "A", "C"),
            ("ratings", "Q", "Q0", "Q1"),
        ]
    )


def test_pointwise_labels_use_current_ratings(
    conn: psycopg.Connection, world: dict[str, str]
) -> None:
    with datasets.snapshot(conn) as wm:
        labels = {(p.answer, p.label) for p in datasets.pointwise_labels(conn, wm)}
    assert labels == {
        ("A", "up"),
        ("B", "down"),
        ("C", "down"),
        ("Q0", "up"),
        ("Q1", "down"),
        ("R0", "up"),
    }


def test_watermark_hides_later_rows_and_later_rerating(
    conn: psycopg.Connection, world: dict[str, str]
) -> None:
    with datasets.snapshot(conn) as wm:
        pass
    before = {(p.answer, p.label) for p in datasets.pointwise_labels(conn, wm)}
    late = make_interaction(prompt="P", answers=("E",))
    store_events(
        conn,
        [
            late,
            make_feedback(late.response_id, "down", at=T0),
            make_feedback(world["a"], "down", at=T0 + timedelta(2)),  # A flips after the mark
        ],
    )
    assert {(p.answer, p.label) for p in datasets.pointwise_labels(conn, wm)} == before
    with datasets.snapshot(conn) as now:
        after = {(p.answer, p.label) for p in datasets.pointwise_labels(conn, now)}
    assert ("A", "down") in after and ("E", "down") in after


def test_rollout_prompts_dedup_and_deterministic_split(conn: psycopg.Connection) -> None:
    store_events(
        conn, [make_interaction(prompt=f"prompt {i % 40}") for i in range(120)]
    )  # 40 distinct prompts, each served three times
    with datasets.snapshot(conn) as wm:
        first = datasets.rollout_prompts(conn, wm, n=30, heldout_fraction=0.25, seed=1)
        again = datasets.rollout_prompts(conn, wm, n=30, heldout_fraction=0.25, seed=1)
        other = datasets.rollout_prompts(conn, wm, n=30, heldout_fraction=0.25, seed=2)
        everything = datasets.rollout_prompts(conn, wm, n=1000, heldout_fraction=0.25, seed=3)
    assert first == again
    assert [p.prompt_hash for p in first] != [p.prompt_hash for p in other]
    assert len({p.prompt_hash for p in first}) == 30
    assert len(everything) == 40
    split = {p.prompt_hash: p.split for p in everything}
    assert all(split[p.prompt_hash] == p.split for p in first + other)
    assert 0 < sum(s == "heldout" for s in split.values()) < 40


def test_export_cli_writes_jsonl(
    migrated_url: str, conn: psycopg.Connection, world: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "pairs.jsonl"
    assert export_main(["pairs", "--out", str(out), "--database-url", migrated_url]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5
    assert {"messages", "chosen", "rejected", "source"} <= set(rows[0])
    prompts = tmp_path / "prompts.jsonl"
    assert export_main(["prompts", "--out", str(prompts), "--database-url", migrated_url]) == 0
    assert len(prompts.read_text().splitlines()) == 3  # P, Q and R (T was never served)
