"""Training data read from the feedback tables, as of a watermark.

A training round must see one consistent state while ingestion keeps running. Every
ingested row carries a ``seq``; ingestors commit in ``seq`` order (they serialise on an
advisory lock), so "rows with seq <= watermark" is a snapshot that stays the same however
long the round takes, and re-running a round with the same watermark gives the same data.
Ratings are read from the *history* (``feedback_events``), replaying "latest wins" up to
the watermark, not from ``feedback_current``, which moves on.

:func:`snapshot` opens a REPEATABLE READ transaction and captures the watermark in it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Literal

import psycopg


@dataclass(frozen=True)
class Watermark:
    """The highest ``seq`` included, per table."""

    interactions: int
    feedback: int
    preferences: int


def capture_watermark(conn: psycopg.Connection) -> Watermark:
    row = conn.execute(
        "SELECT (SELECT coalesce(max(seq), 0) FROM interactions),"
        " (SELECT coalesce(max(seq), 0) FROM feedback_events),"
        " (SELECT coalesce(max(seq), 0) FROM preferences)"
    ).fetchone()
    assert row is not None
    return Watermark(*row)


@contextmanager
def snapshot(conn: psycopg.Connection) -> Iterator[Watermark]:
    """A read-only REPEATABLE READ transaction and the watermark as of its start."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        yield capture_watermark(conn)


Messages = list[dict[str, str]]


@dataclass(frozen=True)
class PreferencePair:
    messages: Messages
    chosen: str
    rejected: str
    source: Literal["preference", "ratings"]
    """``preference``: an explicit comparison event; ``ratings``: an up-rated and a
    down-rated answer to the same prompt."""
    prompt_hash: str | None
    chosen_ref: str | None
    """``response_id:choice_index`` of the chosen answer when it is one we served."""
    rejected_ref: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PointwiseLabel:
    messages: Messages
    answer: str
    label: Literal["up", "down"]
    ups: int
    downs: int
    prompt_hash: str
    response_id: str
    choice_index: int
    policy_version: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RolloutPrompt:
    messages: Messages
    prompt_hash: str
    split: Literal["train", "heldout"]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# Answers with a net label as of the watermark: the latest rating per (answer, user) from
# the history, summed per answer; ties (as many ups as downs) carry no label.
_LABELED_ANSWERS = """
WITH cur AS (
    SELECT DISTINCT ON (response_id, choice_index, user_key) response_id, choice_index, rating
    FROM feedback_events
    WHERE seq <= %(feedback)s
    ORDER BY response_id, choice_index, user_key, occurred_at DESC, event_id DESC
), per_answer AS (
    SELECT response_id, choice_index,
           count(*) FILTER (WHERE rating = 'up') AS ups,
           count(*) FILTER (WHERE rating = 'down') AS downs
    FROM cur GROUP BY response_id, choice_index
), labeled AS (
    SELECT i.prompt_hash, i.messages, i.policy_version, a.response_id, a.choice_index,
           c.text, a.ups, a.downs
    FROM per_answer a
    JOIN interactions i ON i.response_id = a.response_id AND i.seq <= %(interactions)s
    JOIN interaction_choices c
      ON c.response_id = a.response_id AND c.choice_index = a.choice_index
    WHERE a.ups <> a.downs
)
"""


def pointwise_labels(conn: psycopg.Connection, watermark: Watermark) -> Iterator[PointwiseLabel]:
    """(prompt messages, answer, up/down) for every answer with a net label."""
    rows = conn.execute(
        _LABELED_ANSWERS
        + """SELECT messages, text, ups, downs, prompt_hash, response_id, choice_index,
                    policy_version
             FROM labeled ORDER BY prompt_hash, response_id, choice_index""",
        asdict(watermark),
    )
    for messages, text, ups, downs, phash, rid, idx, policy in rows:
        label: Literal["up", "down"] = "up" if ups > downs else "down"
        yield PointwiseLabel(messages, text, label, ups, downs, phash, rid, idx, policy)


def preference_pairs(conn: psycopg.Connection, watermark: Watermark) -> Iterator[PreferencePair]:
    """Explicit preferences, then pairs of (up-rated, down-rated) answers to one prompt.

    An explicit preference naming response ids uses choice 0 of each and is skipped while
    either interaction is unknown (it joins a later round) or when the two answered
    different prompts (no common prompt to train on). One with texts is used as given.
    """
    explicit = conn.execute(
        """
        SELECT p.messages, p.chosen, p.rejected, p.chosen_response_id, p.rejected_response_id,
               ci.messages, ci.prompt_hash, ri.prompt_hash, cc.text, rc.text
        FROM preferences p
        LEFT JOIN interactions ci
               ON ci.response_id = p.chosen_response_id AND ci.seq <= %(interactions)s
        LEFT JOIN interactions ri
               ON ri.response_id = p.rejected_response_id AND ri.seq <= %(interactions)s
        LEFT JOIN interaction_choices cc
               ON cc.response_id = ci.response_id AND cc.choice_index = 0
        LEFT JOIN interaction_choices rc
               ON rc.response_id = ri.response_id AND rc.choice_index = 0
        WHERE p.seq <= %(preferences)s
        ORDER BY p.seq
        """,
        asdict(watermark),
    ).fetchall()
    for row in explicit:
        messages, chosen, rejected, chosen_id, rejected_id = row[:5]
        ref_messages, chosen_hash, rejected_hash, chosen_text, rejected_text = row[5:]
        if messages is not None and chosen is not None and rejected is not None:
            yield PreferencePair(messages, chosen, rejected, "preference", None, None, None)
        elif chosen_text is not None and rejected_text is not None:
            if chosen_hash != rejected_hash:
                continue
            yield PreferencePair(
                ref_messages,
                chosen_text,
                rejected_text,
                "preference",
                chosen_hash,
                f"{chosen_id}:0",
                f"{rejected_id}:0",
            )
    rated = conn.execute(
        _LABELED_ANSWERS
        + """SELECT u.messages, u.text, d.text, u.prompt_hash,
                    u.response_id || ':' || u.choice_index, d.response_id || ':' || d.choice_index
             FROM labeled u JOIN labeled d ON d.prompt_hash = u.prompt_hash
             WHERE u.ups > u.downs AND d.downs > d.ups
             ORDER BY u.prompt_hash, u.response_id, u.choice_index, d.response_id, d.choice_index
        """,
        asdict(watermark),
    )
    for messages, chosen_text, rejected_text, phash, chosen_ref, rejected_ref in rated:
        yield PreferencePair(
            messages, chosen_text, rejected_text, "ratings", phash, chosen_ref, rejected_ref
        )


def is_heldout(prompt_hash: str, heldout_fraction: float) -> bool:
    """Deterministic split by prompt: a prompt stays on its side in every round."""
    return int(prompt_hash[:16], 16) / 2**64 < heldout_fraction


def rollout_prompts(
    conn: psycopg.Connection,
    watermark: Watermark,
    n: int,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    *,
    window: int = 10_000,
) -> list[RolloutPrompt]:
    """Up to ``n`` distinct prompts sampled (seeded) from the ``window`` most recently
    served distinct prompts, each marked train or held out by its hash."""
    rows = conn.execute(
        """
        SELECT prompt_hash, messages FROM (
            SELECT DISTINCT ON (prompt_hash) prompt_hash, messages, seq
            FROM interactions WHERE seq <= %(interactions)s
            ORDER BY prompt_hash, seq DESC
        ) latest
        ORDER BY seq DESC LIMIT %(window)s
        """,
        {**asdict(watermark), "window": window},
    ).fetchall()
    pool = sorted(rows)  # sampling depends on the seed, not on the query plan's order
    chosen = random.Random(seed).sample(pool, min(n, len(pool)))
    return [
        RolloutPrompt(messages, h, "heldout" if is_heldout(h, heldout_fraction) else "train")
        for h, messages in chosen
    ]
