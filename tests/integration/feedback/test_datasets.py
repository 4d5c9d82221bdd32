"""Dataset builders over a hand-made set of interactions, ratings and preferences."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from feedback import datasets
from feedback.cli import export_main
from feedback.ingest.writer import store_events
from schemas.events import LoggedMessage, LoggedToolCall, PreferenceSubmitted, parse_event
from tests.fixtures.postgres import make_feedback, make_interaction

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def preference(**fields: Any) -> PreferenceSubmitted:
    return PreferenceSubmitted(producer="test", preference_id=uuid.uuid4(), **fields)


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


# --- scale: pairs from ratings are capped per prompt --------------------------------------


@pytest.fixture
def popular(conn: psycopg.Connection) -> dict[str, str]:
    """Prompt "popular" answered 3,000 times: 1,800 answers rated up, 1,200 down (all
    against all would be 2,160,000 pairs); "lopsided" with 3 ups and 1,000 downs; "rare"
    with two ups and one down. Maps each answer's text to its rating."""
    rating = {}
    events: list = []
    for prompt, ups, downs in (("popular", 1800, 1200), ("lopsided", 3, 1000), ("rare", 2, 1)):
        for i in range(ups + downs):
            text = f"{prompt} answer {i}"
            rating[text] = "up" if i < ups else "down"
            interaction = make_interaction(prompt=prompt, answers=(text,))
            events += [interaction, make_feedback(interaction.response_id, rating[text], at=T0)]
    store_events(conn, events)
    return rating


def _rating_pairs(conn: psycopg.Connection, **options: int) -> list[datasets.PreferencePair]:
    with datasets.snapshot(conn) as wm:
        return [p for p in datasets.preference_pairs(conn, wm, **options) if p.source == "ratings"]


def test_pairs_from_a_popular_prompt_are_capped(
    conn: psycopg.Connection, popular: dict[str, str]
) -> None:
    pairs = _rating_pairs(conn, max_pairs_per_prompt=16, seed=0)
    by_prompt: dict[str, list[datasets.PreferencePair]] = {}
    for p in pairs:
        assert p.messages[-1]["content"] == p.chosen.split(" answer ")[0]  # the same prompt
        assert popular[p.chosen] == "up" and popular[p.rejected] == "down"
        by_prompt.setdefault(p.messages[-1]["content"], []).append(p)
    hot = by_prompt["popular"]
    assert len(hot) == 16  # not 2,160,000
    assert len({(p.chosen, p.rejected) for p in hot}) == 16
    # stratified: with more answers than the cap on both sides, each answer is used once
    assert len({p.chosen for p in hot}) == 16 and len({p.rejected for p in hot}) == 16
    # few answers on one side: they share the pairs evenly, the other side's are used once
    lopsided = by_prompt["lopsided"]
    assert len(lopsided) == 16 and len({p.rejected for p in lopsided}) == 16
    uses = Counter(p.chosen for p in lopsided)
    assert sorted(uses.values()) == [5, 5, 6]
    # a prompt with fewer combinations than the cap gives all of them
    assert sorted((p.chosen, p.rejected) for p in by_prompt["rare"]) == [
        ("rare answer 0", "rare answer 2"),
        ("rare answer 1", "rare answer 2"),
    ]
    # another cap
    assert (
        sum(
            p.prompt_hash == hot[0].prompt_hash for p in _rating_pairs(conn, max_pairs_per_prompt=5)
        )
        == 5
    )
    assert _rating_pairs(conn, max_pairs_per_prompt=0) == []


def test_pairs_are_deterministic_for_a_seed_and_differ_across_seeds(
    conn: psycopg.Connection, popular: dict[str, str]
) -> None:
    first = _rating_pairs(conn, seed=1)
    assert _rating_pairs(conn, seed=1) == first
    other = _rating_pairs(conn, seed=2)
    hot = {(p.chosen, p.rejected) for p in first if p.chosen.startswith("popular")}
    hot_other = {(p.chosen, p.rejected) for p in other if p.chosen.startswith("popular")}
    assert len(hot) == len(hot_other) == datasets.DEFAULT_MAX_PAIRS_PER_PROMPT
    assert hot != hot_other
    # the rare prompt has no choice to make: every seed gives its two pairs
    rare = {(p.chosen, p.rejected) for p in first if p.chosen.startswith("rare")}
    assert rare == {(p.chosen, p.rejected) for p in other if p.chosen.startswith("rare")}


def test_a_watermark_fixes_the_pairs_while_new_answers_arrive(
    conn: psycopg.Connection, popular: dict[str, str]
) -> None:
    with datasets.snapshot(conn) as wm:
        before = list(datasets.preference_pairs(conn, wm, seed=3))
    late = [make_interaction(prompt="popular", answers=(f"late {i}",)) for i in range(50)]
    store_events(conn, late + [make_feedback(x.response_id, "up", at=T0) for x in late])
    with datasets.snapshot(conn):
        assert list(datasets.preference_pairs(conn, wm, seed=3)) == before


def test_label_refs_and_their_texts_match_the_full_labels(
    conn: psycopg.Connection, world: dict[str, str]
) -> None:
    with datasets.snapshot(conn) as wm:
        full = sorted(datasets.pointwise_labels(conn, wm), key=lambda x: x.answer)
        refs = list(datasets.label_refs(conn, wm))
        assert sorted(datasets.labels_for(conn, refs), key=lambda x: x.answer) == full
        chosen = [r for r in refs if r.label == "down"][:2]
        assert [(x.response_id, x.label) for x in datasets.labels_for(conn, chosen)] == [
            (r.response_id, "down") for r in chosen
        ]
    assert len(full) == 6 and len(refs) == 6


def test_streams_work_outside_a_transaction_and_can_be_abandoned(
    conn: psycopg.Connection, popular: dict[str, str]
) -> None:
    with datasets.snapshot(conn) as wm:
        pass
    stream = datasets.pointwise_labels(conn, wm)  # autocommit: it opens its own transaction
    first = next(stream)
    assert first.label in ("up", "down")
    stream.close()  # its cursor and transaction end; the connection is usable again
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert sum(1 for _ in datasets.label_refs(conn, wm)) == len(popular)
    # the planner settings a stream uses hold only while it runs
    with datasets.snapshot(conn) as wm:
        before = conn.execute("SHOW work_mem").fetchone()
        assert sum(1 for _ in datasets.pointwise_labels(conn, wm)) == len(popular)
        assert conn.execute("SHOW work_mem").fetchone() == before


def test_one_pass_gives_the_same_labels_and_pairs_as_the_separate_streams(
    conn: psycopg.Connection, popular: dict[str, str]
) -> None:
    with datasets.snapshot(conn) as wm:
        both = list(datasets.rated_refs(conn, wm, max_pairs_per_prompt=7, seed=5))
        labels = list(datasets.label_refs(conn, wm))
        pairs = list(datasets.rating_pair_refs(conn, wm, max_pairs_per_prompt=7, seed=5))
        full = list(datasets.preference_pairs(conn, wm, max_pairs_per_prompt=7, seed=5))
        assert datasets.pairs_for(conn, pairs) == full  # the texts of exactly those pairs
    assert sorted(x for x in both if isinstance(x, datasets.LabelRef)) == sorted(labels)
    assert [x for x in both if isinstance(x, datasets.PairRef)] == pairs
    assert len(labels) == len(popular) and len(pairs) == 7 + 7 + 2


def test_tool_calls_and_legacy_completions_are_stored_but_not_trained_on(
    conn: psycopg.Connection,
) -> None:
    """Version-2 interactions: a tool-calling answer, a conversation with tool turns and a
    legacy completion are stored with their calls and endpoint, rated like any answer, and
    left out of every training dataset; a plain chat answer beside them is kept."""
    call = LoggedToolCall(id="call_1", name="get_weather", arguments='{"city": "Oslo"}')
    plain = make_interaction(prompt="W", answers=("plain", "other"))
    calling = make_interaction(prompt="W", answers=("", "text"))
    calling = calling.model_copy(
        update={
            "choices": [
                calling.choices[0].model_copy(update={"tool_calls": [call]}),
                calling.choices[1],
            ]
        }
    )
    turns = make_interaction(prompt="W", answers=("after the tool",)).model_copy(
        update={
            "messages": [
                LoggedMessage(role="user", content="W"),
                LoggedMessage(role="assistant", content="", tool_calls=[call]),
                LoggedMessage(role="tool", content="4 C", tool_call_id="call_1"),
            ]
        }
    )
    legacy = make_interaction(answers=("raw",)).model_copy(
        update={"endpoint": "completions", "prompt": "The capital of", "messages": []}
    )
    interactions = [plain, calling, turns, legacy]
    events: list[Any] = list(interactions)
    for e in interactions:
        for i in range(len(e.choices)):
            up = (e is plain and i == 0) or (e is calling and i == 0) or e is turns or e is legacy
            events.append(make_feedback(e.response_id, "up" if up else "down", choice_index=i))
    store_events(conn, events)

    stored = {
        (rid, idx): rest
        for rid, idx, *rest in conn.execute(
            "SELECT response_id, c.choice_index, i.endpoint, i.prompt, i.prompt_text, "
            "i.tool_turns, c.tool_calls "
            "FROM interactions i JOIN interaction_choices c USING (response_id) "
            "WHERE response_id = ANY(%s)",
            [[calling.response_id, turns.response_id, legacy.response_id]],
        )
    }
    assert stored == {
        (calling.response_id, 0): ["chat", None, "W", False, [call.model_dump()]],
        (calling.response_id, 1): ["chat", None, "W", False, None],
        (turns.response_id, 0): ["chat", None, "W", True, None],
        (legacy.response_id, 0): ["completions", "The capital of", "The capital of", False, None],
    }
    with datasets.snapshot(conn) as wm:
        labels = {(p.answer, p.label) for p in datasets.pointwise_labels(conn, wm)}
        pairs = {(p.chosen, p.rejected) for p in datasets.preference_pairs(conn, wm)}
        prompts = [p.messages for p in datasets.rollout_prompts(conn, wm, 10)]
    assert labels == {("plain", "up"), ("other", "down"), ("text", "down")}
    assert pairs == {("plain", "other"), ("plain", "text")}
    assert prompts == [[{"role": "user", "content": "W"}]]


def test_a_version_1_interaction_event_is_still_ingested(conn: psycopg.Connection) -> None:
    """An event as serving wrote it before version 2 (no endpoint, no tool fields)."""
    raw = {
        "event_id": str(uuid.uuid4()), "schema_version": 1, "occurred_at": T0.isoformat(),
        "producer": "serving@old", "event_type": "interaction.logged",
        "response_id": "chatcmpl-v1", "user": "u1", "policy_version": "base",
        "model": "alignloop", "messages": [{"role": "user", "content": "hello?"}],
        "choices": [{"index": 0, "text": "hi!", "finish_reason": "stop", "completion_tokens": 2}],
        "prompt_tokens": 3, "completion_tokens": 2, "latency_ms": 1.0, "ttft_ms": None,
        "stream": False,
        "sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": 16, "n": 1, "seed": None,
                     "stop": []},
    }  # fmt: skip
    event = parse_event(json.dumps(raw))
    assert event.schema_version == 1
    store_events(conn, [event])
    row = conn.execute(
        "SELECT endpoint, tool_turns, messages, prompt_hash FROM interactions "
        "WHERE response_id = 'chatcmpl-v1'"
    ).fetchone()
    assert row[:3] == ("chat", False, [{"role": "user", "content": "hello?"}])
    # The prompt's identity is what version 1 computed: answers before and after the
    # upgrade still group under one prompt.
    legacy_hash = hashlib.sha256(b'[["user","hello?"]]').hexdigest()
    assert row[3] == legacy_hash


def test_one_key_over_its_share_keeps_a_seeded_sample_of_its_answers(
    conn: psycopg.Connection,
) -> None:
    """`flood` rated 300 answers, `web` 30: capped at half, the flood keeps about as many
    answers as web has (30 / 300 of them), the same ones every time; web keeps all."""
    events: list[Any] = []
    for principal, n in (("flood", 300), ("web", 30)):
        for i in range(n):
            answer = make_interaction(prompt=f"{principal} {i}?", user=f"{principal}-{i}")
            vote = make_feedback(answer.response_id, "up", user=f"{principal}-{i}")
            events += [
                answer.model_copy(update={"principal": principal}),
                vote.model_copy(update={"principal": principal}),
            ]
    store_events(conn, events)
    mark = datasets.capture_watermark(conn)
    assert datasets.principal_keep(conn, mark, 0.5) == {"flood": pytest.approx(30 / 300)}
    owner = {e.response_id: e.principal for e in events}

    def kept(cap: float) -> Counter[str]:
        refs = datasets.rated_refs(conn, mark, principal_cap=cap)
        return Counter(owner[r.response_id] for r in refs if isinstance(r, datasets.LabelRef))

    assert kept(1.0) == Counter({"flood": 300, "web": 30})
    capped = kept(0.5)
    assert capped["web"] == 30
    assert 12 <= capped["flood"] <= 50  # binomial(300, 0.1): mean 30, sd 5.2
    assert kept(0.5) == capped
    labels = list(datasets.label_refs(conn, mark, principal_cap=0.5))
    assert Counter(owner[r.response_id] for r in labels) == capped
