"""Training data read from the feedback tables, as of a watermark.

A training round must see one consistent state while ingestion keeps running. Every
ingested row carries a ``seq``; ingestors commit in ``seq`` order (they serialise on an
advisory lock), so "rows with seq <= watermark" is a snapshot that stays the same however
long the round takes, and re-running a round with the same watermark gives the same data.
Ratings are read from the *history* (``feedback_events``), replaying "latest wins" up to
the watermark, not from ``feedback_current``, which moves on.

:func:`snapshot` opens a REPEATABLE READ transaction and captures the watermark in it.

Data grows with traffic, so every builder streams its rows from a server-side cursor
(:data:`FETCH_ROWS` at a time: the client's memory does not grow with the tables) and does
work linear in the number of ratings (plus the sorts Postgres does): pairs formed from
ratings are a capped, stratified sample per prompt (:func:`preference_pairs`), never all
up-rated answers against all down-rated ones. Callers that keep a subset choose it on
narrow refs (:func:`label_refs`, :func:`rating_pair_refs`, or both in one pass:
:func:`rated_refs`), as a reproducible bounded sample (:class:`HashSample`), and read the
texts of the chosen only (:func:`labels_for`, :func:`pairs_for`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import heapq
import itertools
import json
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Generic, Literal, NamedTuple, TypeVar

import psycopg
from psycopg.pq import TransactionStatus

from feedback.principal_weights import principal_weights

T = TypeVar("T")


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


def watermark_from(value: Watermark | Mapping[str, int]) -> Watermark:
    """A watermark from its stored JSON form (or itself): a missing or unknown key fails
    here, not in a later round."""
    if isinstance(value, Watermark):
        return value
    try:
        return Watermark(**{k: int(v) for k, v in value.items()})
    except TypeError as exc:
        expected = ", ".join(f.name for f in dataclasses.fields(Watermark))
        raise ValueError(f"a watermark has the keys {expected}; got {dict(value)}") from exc


def new_ratings_since(conn: psycopg.Connection, since: Watermark | Mapping[str, int] | None) -> int:
    """How many ratings (rows of ``feedback_events``, re-ratings included) and preferences
    were ingested after the watermark ``since``; None (no previous round) counts
    everything. Interactions without feedback do not count. The training loop passes the
    last round's watermark."""
    mark = watermark_from(since) if since is not None else Watermark(0, 0, 0)
    row = conn.execute(
        """SELECT (SELECT count(*) FROM feedback_events WHERE seq > %s)
                + (SELECT count(*) FROM preferences WHERE seq > %s)""",
        (mark.feedback, mark.preferences),
    ).fetchone()
    assert row is not None
    return int(row[0])


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


class LabelRef(NamedTuple):
    """An answer's net thumbs label as of a watermark, without the texts: what deciding
    which labels to keep needs, at a fraction of the bytes (:func:`label_refs`); the texts
    of the kept ones come from :func:`labels_for`."""

    prompt_hash: str
    response_id: str
    choice_index: int
    label: Literal["up", "down"]
    ups: int
    downs: int
    policy_version: str


@dataclass(frozen=True)
class RolloutPrompt:
    messages: Messages
    prompt_hash: str
    split: Literal["train", "heldout"]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --- streaming and bounded samples ---------------------------------------------------------

FETCH_ROWS = 2_000
"""Rows fetched per round trip from a builder's server-side cursor."""

_cursor_ids = itertools.count()


def _stream(
    conn: psycopg.Connection,
    query: str,
    params: dict[str, Any],
    settings: dict[str, str] | None = None,
) -> Iterator[tuple[Any, ...]]:
    """The rows of ``query`` from a server-side cursor, :data:`FETCH_ROWS` at a time, so
    the client holds one batch however many rows there are.

    A server-side cursor lives in a transaction: inside :func:`snapshot` it reads that
    snapshot; on a connection outside any transaction one is opened for the iteration.
    Consume the iterator before the enclosing transaction ends. ``settings`` (server
    settings such as ``work_mem``) hold while the rows are read, then revert.
    """
    with contextlib.ExitStack() as stack:
        if conn.info.transaction_status == TransactionStatus.IDLE:
            stack.enter_context(conn.transaction())
        # A cursor is planned for a fast first few rows by default; these read every row.
        stack.enter_context(
            _local_settings(conn, {"cursor_tuple_fraction": "1", **(settings or {})})
        )
        cursor = stack.enter_context(conn.cursor(name=f"alignloop_dataset_{next(_cursor_ids)}"))
        cursor.itersize = FETCH_ROWS
        cursor.execute(query, params)
        yield from cursor


@contextmanager
def _local_settings(conn: psycopg.Connection, settings: dict[str, str]) -> Iterator[None]:
    """``SET LOCAL`` each setting for the body, then back to what it was (outside a
    transaction nothing would last: nothing is set)."""
    if conn.info.transaction_status != TransactionStatus.INTRANS:
        yield
        return
    previous = {name: _set_local(conn, name, value) for name, value in settings.items()}
    try:
        yield
    finally:
        if conn.info.transaction_status == TransactionStatus.INTRANS:
            for name, value in previous.items():
                _set_local(conn, name, value)


def _set_local(conn: psycopg.Connection, name: str, value: str) -> str:
    """``SET LOCAL name = value``; returns the value it had."""
    row = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()
    assert row is not None
    conn.execute("SELECT set_config(%s, %s, true)", (name, value))
    return row[0]


def stable_hash(seed: int, key: str) -> int:
    """A 64-bit hash of ``key`` under ``seed``: the same in every process, run and machine."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class HashSample(Generic[T]):
    """A reproducible bounded sample of a stream (bottom-k sampling): the ``k`` items whose
    keys hash lowest under ``seed`` (:func:`stable_hash`).

    Which items are kept, and the order :meth:`items` gives them in (by hash, then key),
    depend only on the set of keys offered and the seed, not on the order they arrive in
    (a query plan's): re-reading the same snapshot gives the same list. A kept item stays
    kept when fewer items are offered. Memory is O(k) whatever the stream's length;
    ``seen`` counts every item offered. (Two distinct keys with equal 64-bit hashes fall
    back to arrival order.)
    """

    def __init__(self, k: int, seed: int = 0) -> None:
        if k < 0:
            raise ValueError(f"sample size must be >= 0, not {k}")
        self.k = k
        self.seed = seed
        self.seen = 0
        # max-heap of the kept by (hash, arrival): (-hash, -arrival, key, item)
        self._heap: list[tuple[int, int, str, T]] = []

    def add(self, item: T, key: str) -> None:
        arrival = self.seen
        self.seen += 1
        if self.k == 0:
            return
        entry = (-stable_hash(self.seed, key), -arrival, key, item)
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, entry)
        elif entry[0] > self._heap[0][0]:  # hashes lower than the highest kept
            heapq.heapreplace(self._heap, entry)

    def __len__(self) -> int:
        return len(self._heap)

    def items(self, limit: int | None = None) -> list[T]:
        """The kept items by hash (then key); with ``limit``, the first ``limit`` of them
        (the sample a smaller ``k`` would have kept)."""
        kept = sorted(self._heap, key=lambda e: (-e[0], e[2], -e[1]))
        if limit is not None:
            kept = kept[: max(limit, 0)]
        return [item for _, _, _, item in kept]


def sample_by_hash(items: Iterable[T], k: int, key: Callable[[T], str], seed: int = 0) -> list[T]:
    """At most ``k`` of ``items`` (a :class:`HashSample`), by hash; O(k) memory."""
    sample: HashSample[T] = HashSample(k, seed)
    for item in items:
        sample.add(item, key(item))
    return sample.items()


class _Conversations:
    """Parses conversation JSON, remembering up to ``size`` recent ones: answers to one
    prompt share its conversation, so a popular prompt's is parsed once per fill of the
    cache, and its answers share one ``messages`` list in memory (treat it as read-only)."""

    def __init__(self, size: int = 1024) -> None:
        self._size = size
        self._parsed: dict[str, Messages] = {}

    def __call__(self, raw: str) -> Messages:
        messages = self._parsed.get(raw)
        if messages is None:
            if len(self._parsed) >= self._size:
                self._parsed.clear()
            messages = self._parsed[raw] = json.loads(raw)
        return messages


# --- thumbs labels and pairs --------------------------------------------------------------

# Net rating per answer as of the watermark: the latest rating per (answer, user) from the
# history, summed per answer. (A window rather than DISTINCT ON: the planner then estimates
# the number of answers from the table's statistics instead of guessing.) A principal over
# its share (`principal_keep`) keeps the ratings of a seeded-hash sample of its answers,
# the fraction `keep` of them: the same answers in every query of one round.
_ANSWER_COUNTS = """
WITH per_answer AS (
    SELECT response_id, choice_index,
           count(*) FILTER (WHERE latest AND rating = 'up') AS ups,
           count(*) FILTER (WHERE latest AND rating = 'down') AS downs
    FROM (
        SELECT f.response_id, f.choice_index, f.rating,
               row_number() OVER (
                   PARTITION BY f.response_id, f.choice_index, f.user_key
                   ORDER BY f.occurred_at DESC, f.event_id DESC
               ) = 1 AS latest
        FROM feedback_events f
        LEFT JOIN unnest(%(thin_principals)s::text[], %(thin_keep)s::float8[])
               AS t(principal, keep) ON t.principal = coalesce(f.principal, '')
        WHERE f.seq <= %(feedback)s
          AND (t.keep IS NULL
               OR ('x' || substr(md5(f.response_id || ':' || f.choice_index), 1, 8))
                  ::bit(32)::bigint < t.keep * 4294967296.0)
    ) history
    GROUP BY response_id, choice_index
)
"""

# Answers rated per principal as of the watermark: what `principal_keep` weighs.
_PRINCIPAL_ANSWERS = """
SELECT coalesce(principal, ''), count(DISTINCT (response_id, choice_index))
FROM feedback_events
WHERE seq <= %(feedback)s
GROUP BY 1
"""


def principal_keep(conn: psycopg.Connection, watermark: Watermark, cap: float) -> dict[str, float]:
    """The fraction of its rated answers each principal over ``cap`` keeps in the training
    data (:mod:`feedback.principal_weights`); principals within the cap are not listed."""
    if cap >= 1.0:
        return {}
    counts = {p: float(n) for p, n in conn.execute(_PRINCIPAL_ANSWERS, asdict(watermark))}
    return {p: w for p, w in principal_weights(counts, cap).items() if w < 1.0}


def _thinned(watermark: Watermark, keep: Mapping[str, float] | None) -> dict[str, Any]:
    """The watermark's query parameters with the principals' keep fractions."""
    keep = keep or {}
    return {**asdict(watermark), "thin_principals": list(keep), "thin_keep": list(keep.values())}


# Every rated answer, ties included (the caller skips them: filtering here would make the
# planner expect a handful of rows and pick per-row index lookups).
_LABELS = (
    _ANSWER_COUNTS
    + """
SELECT i.messages::text, c.text, a.ups, a.downs, i.prompt_hash, a.response_id, a.choice_index,
       i.policy_version
FROM per_answer a
JOIN interactions i ON i.response_id = a.response_id AND i.seq <= %(interactions)s
    AND i.endpoint = 'chat' AND NOT i.tool_turns
JOIN interaction_choices c ON c.response_id = a.response_id AND c.choice_index = a.choice_index
    AND c.tool_calls IS NULL
"""
)

_LABEL_REFS = (
    _ANSWER_COUNTS
    + """
SELECT i.prompt_hash, a.response_id, a.choice_index, a.ups, a.downs, i.policy_version
FROM per_answer a
JOIN interactions i ON i.response_id = a.response_id AND i.seq <= %(interactions)s
    AND i.endpoint = 'chat' AND NOT i.tool_turns
JOIN interaction_choices c ON c.response_id = a.response_id AND c.choice_index = a.choice_index
    AND c.tool_calls IS NULL
"""
)

_TEXTS_BY_REF = """
SELECT k.n, i.messages::text, c.text
FROM unnest(%(response_ids)s::text[], %(choice_indexes)s::int[])
     WITH ORDINALITY AS k(response_id, choice_index, n)
JOIN interactions i ON i.response_id = k.response_id
JOIN interaction_choices c ON c.response_id = k.response_id AND c.choice_index = k.choice_index
"""

# Every rated answer with its prompt hash, side (+1 up, -1 down, 0 tied) and rank within
# its prompt's side by a seeded hash of its ref; ``both_sides``: its prompt has answers on
# both sides. Pairs from ratings are formed from the first ``cap`` of each side.
_RANKED = (
    _ANSWER_COUNTS
    + """
, ranked AS (
    SELECT i.prompt_hash, a.response_id, a.choice_index, a.ups, a.downs, i.policy_version,
           sign(a.ups - a.downs) AS side,
           row_number() OVER (
               PARTITION BY i.prompt_hash, sign(a.ups - a.downs)
               ORDER BY md5(%(salt)s || a.response_id || ':' || a.choice_index),
                        a.response_id, a.choice_index
           ) AS rank,
           bool_or(a.ups > a.downs) OVER (PARTITION BY i.prompt_hash)
           AND bool_or(a.ups < a.downs) OVER (PARTITION BY i.prompt_hash) AS both_sides
    FROM per_answer a
    JOIN interactions i ON i.response_id = a.response_id AND i.seq <= %(interactions)s
        AND i.endpoint = 'chat' AND NOT i.tool_turns
    JOIN interaction_choices c
      ON c.response_id = a.response_id AND c.choice_index = a.choice_index
      AND c.tool_calls IS NULL
)
"""
)

# What pairs from ratings are formed from, narrow (texts are looked up for the pairs kept).
_PAIR_CANDIDATES = (
    _RANKED
    + """
SELECT prompt_hash, side > 0, response_id || ':' || choice_index
FROM ranked
WHERE rank <= %(cap)s AND side <> 0 AND both_sides
ORDER BY prompt_hash, side DESC, rank
"""
)

# Every labeled answer by prompt, and what its prompt's pairs are formed from.
_RATED_BY_PROMPT = (
    _RANKED
    + """
SELECT prompt_hash, response_id, choice_index, ups, downs, policy_version,
       rank <= %(cap)s AND both_sides
FROM ranked
WHERE side <> 0
ORDER BY prompt_hash, side DESC, rank
"""
)

# Whole-table passes: sort and hash in memory, and no per-row index lookups (row counts
# estimated through the aggregates are unreliable, and a nested loop over a million rows
# is the one plan that must not happen); JIT compilation costs more than it saves here.
_SCAN_SETTINGS = {"work_mem": "64MB", "enable_nestloop": "off", "jit": "off"}
# Lookups by key (up to FETCH_ROWS keys): index lookups are the plan, also while a scan's
# stream is open on the same connection.
_LOOKUP_SETTINGS = {"enable_nestloop": "on"}


def _texts(
    conn: psycopg.Connection, refs: Sequence[tuple[str, int]]
) -> dict[tuple[str, int], tuple[str, str]]:
    """(conversation JSON, answer text) of each (response id, choice index) that exists."""
    found: dict[tuple[str, int], tuple[str, str]] = {}
    with _local_settings(conn, _LOOKUP_SETTINGS):
        for start in range(0, len(refs), FETCH_ROWS):
            chunk = refs[start : start + FETCH_ROWS]
            params = {
                "response_ids": [rid for rid, _ in chunk],
                "choice_indexes": [idx for _, idx in chunk],
            }
            for n, raw, text in conn.execute(_TEXTS_BY_REF, params):
                found[chunk[n - 1]] = (raw, text)
    return found


_EXPLICIT = """
SELECT p.messages, p.chosen, p.rejected, p.chosen_response_id, p.rejected_response_id,
       ci.messages, ci.prompt_hash, ri.prompt_hash, cc.text, rc.text
FROM preferences p
LEFT JOIN interactions ci
       ON ci.response_id = p.chosen_response_id AND ci.seq <= %(interactions)s
       AND ci.endpoint = 'chat' AND NOT ci.tool_turns
LEFT JOIN interactions ri
       ON ri.response_id = p.rejected_response_id AND ri.seq <= %(interactions)s
       AND ri.endpoint = 'chat' AND NOT ri.tool_turns
LEFT JOIN interaction_choices cc
       ON cc.response_id = ci.response_id AND cc.choice_index = 0 AND cc.tool_calls IS NULL
LEFT JOIN interaction_choices rc
       ON rc.response_id = ri.response_id AND rc.choice_index = 0 AND rc.tool_calls IS NULL
WHERE p.seq <= %(preferences)s
ORDER BY p.seq
"""


def pointwise_labels(
    conn: psycopg.Connection, watermark: Watermark, *, principal_cap: float = 1.0
) -> Iterator[PointwiseLabel]:
    """(prompt messages, answer, up/down) for every answer with a net label.

    Streamed, in no particular order (a sort of every answer with its texts would cost more
    than the rest of the query): bounded memory, one pass over the ratings. Callers that
    need a subset sample :func:`label_refs` and fetch texts for the sample only."""
    messages = _Conversations()
    keep = principal_keep(conn, watermark, principal_cap)
    rows = _stream(conn, _LABELS, _thinned(watermark, keep), _SCAN_SETTINGS)
    for raw, text, ups, downs, phash, rid, idx, policy in rows:
        if ups == downs:
            continue
        label: Literal["up", "down"] = "up" if ups > downs else "down"
        yield PointwiseLabel(messages(raw), text, label, ups, downs, phash, rid, idx, policy)


def label_refs(
    conn: psycopg.Connection, watermark: Watermark, *, principal_cap: float = 1.0
) -> Iterator[LabelRef]:
    """Every answer with a net label, as :class:`LabelRef` (no texts), in no particular
    order; streamed, one pass over the ratings. Sample these, then fetch the texts of the
    sample with :func:`labels_for`: reading every answer's texts to keep a few costs most
    of a round's data time at a million ratings."""
    keep = principal_keep(conn, watermark, principal_cap)
    rows = _stream(conn, _LABEL_REFS, _thinned(watermark, keep), _SCAN_SETTINGS)
    for phash, rid, idx, ups, downs, policy in rows:
        if ups != downs:
            yield LabelRef(phash, rid, idx, "up" if ups > downs else "down", ups, downs, policy)


def labels_for(conn: psycopg.Connection, refs: Sequence[LabelRef]) -> list[PointwiseLabel]:
    """The :class:`PointwiseLabel` of each ref, in the same order, texts looked up by key.
    Call it in the snapshot the refs came from: a ref whose answer is gone (erased since)
    is left out."""
    conversations = _Conversations()
    texts = _texts(conn, [(r.response_id, r.choice_index) for r in refs])
    labels = []
    for r in refs:
        found = texts.get((r.response_id, r.choice_index))
        if found is not None:
            messages, text = conversations(found[0]), found[1]
            labels.append(
                PointwiseLabel(
                    messages,
                    text,
                    r.label,
                    r.ups,
                    r.downs,
                    r.prompt_hash,
                    r.response_id,
                    r.choice_index,
                    r.policy_version,
                )
            )
    return labels


DEFAULT_MAX_PAIRS_PER_PROMPT = 16


def rating_pair_indices(n_up: int, n_down: int, cap: int) -> list[tuple[int, int]]:
    """Which (up, down) answers of one prompt to pair, as indices into each side's ranking.

    Only the first ``a = min(n_up, cap)`` ups and ``b = min(n_down, cap)`` downs take part,
    and ``T = min(cap, a * b)`` distinct pairs are formed: pair ``t`` is
    ``(t mod a, (t + t // lcm(a, b)) mod b)``. So the i-th up meets the i-th down first,
    then each up the next downs in turn; every up is in ``floor(T/a)`` or ``ceil(T/a)``
    pairs and every down in ``floor(T/b)`` or ``ceil(T/b)``: no answer dominates a prompt's
    pairs. (Within a block of ``lcm(a, b)`` pairs the indices are distinct by the Chinese
    remainder theorem; the shift by the block number makes the ``gcd(a, b)`` blocks cover
    different pairs.)
    """
    a, b = min(n_up, cap), min(n_down, cap)
    total = min(cap, a * b)
    if total <= 0:
        return []
    period = math.lcm(a, b)
    return [(t % a, (t + t // period) % b) for t in range(total)]


def explicit_pairs(conn: psycopg.Connection, watermark: Watermark) -> Iterator[PreferencePair]:
    """Explicit preferences, in arrival order; streamed.

    One naming response ids uses choice 0 of each and is skipped while either interaction
    is unknown (it joins a later round) or when the two answered different prompts (no
    common prompt to train on). One with texts is used as given."""
    for row in _stream(conn, _EXPLICIT, asdict(watermark)):
        messages, chosen, rejected, chosen_id, rejected_id = row[:5]
        ref_messages, chosen_hash, rejected_hash, chosen_text, rejected_text = row[5:]
        if messages is not None and chosen is not None and rejected is not None:
            if any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
                continue  # tool turns are not trained on (docs/training.md)
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


class PairRef(NamedTuple):
    """A pair of an up-rated and a down-rated answer to one prompt, without the texts
    (:func:`rating_pair_refs`); :func:`pairs_for` reads the texts of the ones kept."""

    prompt_hash: str
    chosen_ref: str
    """``response_id:choice_index`` of the up-rated answer."""
    rejected_ref: str


def rating_pair_refs(
    conn: psycopg.Connection,
    watermark: Watermark,
    *,
    max_pairs_per_prompt: int = DEFAULT_MAX_PAIRS_PER_PROMPT,
    seed: int = 0,
    principal_cap: float = 1.0,
) -> Iterator[PairRef]:
    """The pairs formed from ratings (see :func:`preference_pairs`), without texts, by
    prompt hash; streamed."""
    if max_pairs_per_prompt < 0:
        raise ValueError(f"max_pairs_per_prompt must be >= 0, not {max_pairs_per_prompt}")
    if max_pairs_per_prompt == 0:
        return
    keep = principal_keep(conn, watermark, principal_cap)
    params = {**_thinned(watermark, keep), "cap": max_pairs_per_prompt, "salt": f"{seed}:"}
    rows = _stream(conn, _PAIR_CANDIDATES, params, _SCAN_SETTINGS)
    for phash, group in itertools.groupby(rows, key=lambda row: row[0]):
        ups: list[str] = []
        downs: list[str] = []
        for _, up, ref in group:  # at most the cap of each side
            (ups if up else downs).append(ref)
        for i, j in rating_pair_indices(len(ups), len(downs), max_pairs_per_prompt):
            yield PairRef(phash, ups[i], downs[j])


def rated_refs(
    conn: psycopg.Connection,
    watermark: Watermark,
    *,
    max_pairs_per_prompt: int = DEFAULT_MAX_PAIRS_PER_PROMPT,
    seed: int = 0,
    principal_cap: float = 1.0,
) -> Iterator[LabelRef | PairRef]:
    """:func:`label_refs` and :func:`rating_pair_refs` in one pass over the ratings (what a
    reward round reads): per prompt hash, its labels, then its pairs. A principal whose
    rated answers are over ``principal_cap`` of all keeps a seeded sample of them
    (:func:`principal_keep`), so one flooding key cannot dominate a reward model."""
    if max_pairs_per_prompt < 0:
        raise ValueError(f"max_pairs_per_prompt must be >= 0, not {max_pairs_per_prompt}")
    keep = principal_keep(conn, watermark, principal_cap)
    params = {**_thinned(watermark, keep), "cap": max_pairs_per_prompt, "salt": f"{seed}:"}
    rows = _stream(conn, _RATED_BY_PROMPT, params, _SCAN_SETTINGS)
    for phash, group in itertools.groupby(rows, key=lambda row: row[0]):
        ups: list[str] = []
        downs: list[str] = []
        for _, rid, idx, n_up, n_down, policy, paired in group:
            label: Literal["up", "down"] = "up" if n_up > n_down else "down"
            yield LabelRef(phash, rid, idx, label, n_up, n_down, policy)
            if paired:  # at most the cap of each side
                (ups if label == "up" else downs).append(f"{rid}:{idx}")
        for i, j in rating_pair_indices(len(ups), len(downs), max_pairs_per_prompt):
            yield PairRef(phash, ups[i], downs[j])


def _split_ref(ref: str) -> tuple[str, int]:
    response_id, _, index = ref.rpartition(":")
    return response_id, int(index)


def pairs_for(
    conn: psycopg.Connection, pairs: Sequence[PairRef | PreferencePair]
) -> list[PreferencePair]:
    """:class:`PreferencePair` for each item, in the same order: refs get their texts
    (looked up by key), pairs pass through. Call it in the snapshot the refs came from: a
    ref whose answers are gone (erased since) is left out."""
    refs = {_split_ref(r) for p in pairs if isinstance(p, PairRef) for r in p[1:]}
    texts = _texts(conn, sorted(refs))
    conversations = _Conversations()
    out = []
    for p in pairs:
        if isinstance(p, PreferencePair):
            out.append(p)
            continue
        chosen, rejected = (
            texts.get(_split_ref(p.chosen_ref)),
            texts.get(_split_ref(p.rejected_ref)),
        )
        if chosen is not None and rejected is not None:
            out.append(
                PreferencePair(
                    conversations(chosen[0]),
                    chosen[1],
                    rejected[1],
                    "ratings",
                    p.prompt_hash,
                    p.chosen_ref,
                    p.rejected_ref,
                )
            )
    return out


def preference_pairs(
    conn: psycopg.Connection,
    watermark: Watermark,
    *,
    max_pairs_per_prompt: int = DEFAULT_MAX_PAIRS_PER_PROMPT,
    seed: int = 0,
) -> Iterator[PreferencePair]:
    """Explicit preferences (:func:`explicit_pairs`), then pairs of (up-rated, down-rated)
    answers to one prompt (by prompt hash); streamed.

    **Pairs from ratings are a stratified sample**: each prompt contributes at most
    ``max_pairs_per_prompt`` of them, however popular it is (all ups against all downs
    would be quadratic in a popular prompt's ratings: docs/benchmarks.md, "Datasets").
    Per prompt, the up-rated and the down-rated answers are each ranked by
    ``md5(seed:response_id:choice_index)`` (a seeded shuffle that Postgres computes, so
    only the first ``max_pairs_per_prompt`` of each side leave the database), then paired
    by :func:`rating_pair_indices`: the i-th up with the i-th down, then further
    combinations until the cap, every kept answer in an even share of the pairs. The same
    data and seed give the same pairs in the same order; another seed, other pairs where a
    prompt has more combinations than the cap. An answer's pairs change when new answers
    to its prompt outrank it, never otherwise. The work is one pass over the ratings (plus
    Postgres's sorts) and lookups of the kept answers' texts, :data:`FETCH_ROWS` at a
    time; memory holds one such batch. ``0`` forms no pairs from ratings.
    """
    refs = rating_pair_refs(conn, watermark, max_pairs_per_prompt=max_pairs_per_prompt, seed=seed)
    yield from explicit_pairs(conn, watermark)
    while batch := list(itertools.islice(refs, FETCH_ROWS // 2)):
        yield from pairs_for(conn, batch)


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
    served distinct prompts, each marked train or held out by its hash.

    One aggregate pass over the interactions' (prompt hash, seq); at most ``window``
    conversations are read."""
    rows = conn.execute(
        """
        SELECT latest.prompt_hash, i.messages FROM (
            SELECT prompt_hash, max(seq) AS seq
            FROM interactions
            WHERE seq <= %(interactions)s AND endpoint = 'chat' AND NOT tool_turns
            GROUP BY prompt_hash ORDER BY max(seq) DESC LIMIT %(window)s
        ) latest
        JOIN interactions i ON i.seq = latest.seq
        """,
        {**asdict(watermark), "window": window},
    ).fetchall()
    pool = sorted(rows)  # sampling depends on the seed, not on the query plan's order
    chosen = random.Random(seed).sample(pool, min(n, len(pool)))
    return [
        RolloutPrompt(messages, h, "heldout" if is_heldout(h, heldout_fraction) else "train")
        for h, messages in chosen
    ]
