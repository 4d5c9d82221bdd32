"""What a reward model round trains and evaluates on, as of a watermark.

:func:`load_data` reads the feedback (:mod:`feedback.datasets`) inside one snapshot:
preference pairs (explicit comparisons, and up- vs down-rated answers to one prompt) and
thumbs labels, split by prompt hash into train and held-out
(:func:`feedback.datasets.is_heldout`, so a prompt stays on its side in every round and
versions are compared on the same pairs). Warm start: what arrived since the parent
version's watermark plus a seeded replay sample of the older examples; otherwise
everything, bounded by the config's caps. :func:`batch_indices` makes the batch of step
``s`` a pure function of (seed, s), so a resumed run sees exactly the batches the
uninterrupted one would have.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
from array import array
from collections import Counter as Tally
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
import psycopg
import torch

from feedback import datasets
from feedback.datasets import HashSample, PointwiseLabel, PreferencePair, Watermark
from schemas.events import LoggedMessage, prompt_hash
from trainer.reward.config import RewardConfig

log = logging.getLogger(__name__)
T = TypeVar("T")


class InsufficientData(RuntimeError):
    """Too little feedback for a round; nothing was trained or registered."""


@dataclass(frozen=True)
class RewardData:
    """What a round trains and evaluates on, as of ``watermark``."""

    watermark: Watermark
    train_pairs: list[PreferencePair]
    heldout_pairs: list[PreferencePair]
    train_labels: list[PointwiseLabel]
    heldout_labels: list[PointwiseLabel]
    new_examples: int
    """Training examples kept that were not there at the parent's watermark (from scratch:
    all kept)."""
    replayed_examples: int
    warnings: list[str] = field(default_factory=list)
    pairs_read: int = 0
    """Pairs the snapshot holds (before the train and held-out caps)."""
    labels_read: int = 0
    """Thumbs labels the snapshot holds (before the caps)."""


def _pair_prompt_hash(pair: PreferencePair | datasets.PairRef) -> str:
    """Explicit preferences given as texts carry no hash; derive the ingestor's own."""
    if pair.prompt_hash:
        return pair.prompt_hash
    assert isinstance(pair, PreferencePair)
    return prompt_hash([LoggedMessage(**m) for m in pair.messages])


def _pair_key(pair: PreferencePair | datasets.PairRef) -> str:
    """Identity of a pair across rounds: the answers it compares (whether an explicit
    preference or two ratings put them in this order), or its texts when it names none."""
    if pair.chosen_ref and pair.rejected_ref:
        return f"{pair.chosen_ref}>{pair.rejected_ref}"
    assert isinstance(pair, PreferencePair)
    return json.dumps([pair.messages, pair.chosen, pair.rejected], sort_keys=True)


def _label_key(label: PointwiseLabel | datasets.LabelRef) -> str:
    return f"{label.response_id}:{label.choice_index}:{label.label}"


def _reward_stream(
    conn: psycopg.Connection, watermark: Watermark, config: RewardConfig
) -> Iterator[PreferencePair | datasets.PairRef | datasets.LabelRef]:
    """Explicit preferences, then per prompt its thumbs labels and its pairs from ratings,
    as refs (no texts yet): one pass over the ratings."""
    yield from datasets.explicit_pairs(conn, watermark)
    yield from datasets.rated_refs(
        conn,
        watermark,
        max_pairs_per_prompt=config.max_pairs_per_prompt,
        seed=config.seed,
        principal_cap=config.max_principal_share,
    )


class _KeyDigests:
    """Which example keys a parent round's data held, as sorted 64-bit digests: 8 bytes per
    example (a million: 8 MB) instead of the examples. A digest collision (odds about
    n^2 / 2^65) would count one new example as old."""

    def __init__(self, digests: array) -> None:
        self._sorted = np.sort(np.frombuffer(digests, dtype=np.uint64)) if digests else None

    def contains(self, keys: Sequence[str]) -> list[bool]:
        if self._sorted is None:
            return [False] * len(keys)
        wanted = np.fromiter((datasets.stable_hash(0, k) for k in keys), np.uint64, len(keys))
        at = np.minimum(np.searchsorted(self._sorted, wanted), len(self._sorted) - 1)
        return (self._sorted[at] == wanted).tolist()


def _parent_digests(
    conn: psycopg.Connection, parent: Watermark, config: RewardConfig
) -> tuple[_KeyDigests, _KeyDigests]:
    """The keys of the pairs and of the labels there were at the parent's watermark."""
    pairs, labels = array("Q"), array("Q")
    for x in _reward_stream(conn, parent, config):
        if isinstance(x, datasets.LabelRef):
            labels.append(datasets.stable_hash(0, _label_key(x)))
        else:
            pairs.append(datasets.stable_hash(0, _pair_key(x)))
    return _KeyDigests(pairs), _KeyDigests(labels)


_CHUNK = 4096


@dataclass
class _Split(Generic[T]):
    train: list[T]
    heldout: list[T]
    new: int
    replayed: int
    read: int


class _Sampler(Generic[T]):
    """Examples of one kind, offered in chunks: held out or training by prompt hash,
    training ones new or old (present at the parent's watermark, when ``old`` is given),
    each kept in a bounded seeded sample (:class:`feedback.datasets.HashSample`): at most
    ``max_heldout_examples`` held out, ``max_train_examples`` new, and a replay of
    ``replay_ratio`` old ones per new one kept. Memory: the samples, not the stream."""

    def __init__(
        self,
        prompt_hash_of: Callable[[T], str],
        key_of: Callable[[T], str],
        old: _KeyDigests | None,
        config: RewardConfig,
    ) -> None:
        self._prompt_hash_of, self._key_of, self._old = prompt_hash_of, key_of, old
        self._config = config
        self._heldout: HashSample[T] = HashSample(config.max_heldout_examples, config.seed)
        self._new: HashSample[T] = HashSample(config.max_train_examples, config.seed)
        room = math.ceil(config.replay_ratio * config.max_train_examples)
        room = room if old is not None else 0
        self._replay: HashSample[T] = HashSample(room, config.seed)

    def add(self, chunk: Sequence[T]) -> None:
        keys = [self._key_of(x) for x in chunk]
        seen = self._old.contains(keys) if self._old is not None else [False] * len(chunk)
        fraction = self._config.heldout_fraction
        for item, key, was_there in zip(chunk, keys, seen, strict=True):
            if datasets.is_heldout(self._prompt_hash_of(item), fraction):
                self._heldout.add(item, key)
            elif was_there:
                self._replay.add(item, key)
            else:
                self._new.add(item, key)

    def result(self) -> _Split[T]:
        new = self._new.items()
        replay = self._replay
        n_replay = min(replay.seen, round(self._config.replay_ratio * len(new)))  # 0: scratch
        read = self._heldout.seen + self._new.seen + replay.seen
        train = new + replay.items(limit=n_replay)
        return _Split(train, self._heldout.items(), len(new), n_replay, read)


def load_data(
    conn: psycopg.Connection,
    config: RewardConfig,
    *,
    watermark: Watermark | None = None,
    parent_watermark: Watermark | None = None,
) -> RewardData:
    """Read pairs and labels as of ``watermark`` (default: now), split and sample them.

    One pass over the ratings (:func:`feedback.datasets.rated_refs`) gives every thumbs
    label and the pairs formed from ratings (capped per prompt: ``max_pairs_per_prompt``,
    seeded by ``seed``) as refs; each kind is kept as a seeded sample of at most
    ``max_train_examples`` training and ``max_heldout_examples`` held-out examples, and
    only the sample's texts are read, so memory stays bounded however much feedback there
    is; below the caps everything is kept. With ``parent_watermark`` (a warm start) the
    training set is the examples that were not there at the parent's watermark plus
    ``replay_ratio`` times as many older ones (a second pass, as of the parent's watermark,
    remembers those as 8-byte digests).
    """
    with datasets.snapshot(conn) as now:
        mark = watermark or now
        pair_refs, label_refs, label_kinds = _sample_refs(conn, mark, parent_watermark, config)
        # Only the sample's texts are read.
        pairs = _Split(
            datasets.pairs_for(conn, pair_refs.train),
            datasets.pairs_for(conn, pair_refs.heldout),
            pair_refs.new,
            pair_refs.replayed,
            pair_refs.read,
        )
        labels = _Split(
            datasets.labels_for(conn, label_refs.train),
            datasets.labels_for(conn, label_refs.heldout),
            label_refs.new,
            label_refs.replayed,
            label_refs.read,
        )
    _log_sampling(pairs, labels)
    return RewardData(
        mark,
        pairs.train,
        pairs.heldout,
        labels.train,
        labels.heldout,
        pairs.new + labels.new,
        pairs.replayed + labels.replayed,
        _label_warnings(labels.read, label_kinds),
        pairs.read,
        labels.read,
    )


def _sample_refs(
    conn: psycopg.Connection,
    mark: Watermark,
    parent_watermark: Watermark | None,
    config: RewardConfig,
) -> tuple[_Split[Any], _Split[datasets.LabelRef], Tally[str]]:
    """One pass over the ratings as of ``mark``: seeded samples of pair and label refs
    (split, new vs replayed) and how many labels of each kind were read."""
    label_kinds: Tally[str] = Tally()
    old_pairs = old_labels = None
    if parent_watermark is not None:
        old_pairs, old_labels = _parent_digests(conn, parent_watermark, config)
    pair_sampler: _Sampler[PreferencePair | datasets.PairRef] = _Sampler(
        _pair_prompt_hash, _pair_key, old_pairs, config
    )
    label_sampler: _Sampler[datasets.LabelRef] = _Sampler(
        lambda x: x.prompt_hash, _label_key, old_labels, config
    )
    stream = _reward_stream(conn, mark, config)
    while chunk := list(itertools.islice(stream, _CHUNK)):
        refs = [x for x in chunk if isinstance(x, datasets.LabelRef)]
        label_kinds.update(x.label for x in refs)
        label_sampler.add(refs)
        pair_sampler.add([x for x in chunk if not isinstance(x, datasets.LabelRef)])
    return pair_sampler.result(), label_sampler.result(), label_kinds


def _label_warnings(read: int, label_kinds: Tally[str]) -> list[str]:
    if len(label_kinds) != 1:
        return []
    only = next(iter(label_kinds))
    return [
        f"all {read} thumbs are {only}: they train pointwise only (no rated pairs "
        "can form), pairs come only from explicit preferences, thumbs AUC is undefined"
    ]


def _log_sampling(pairs: _Split[Any], labels: _Split[Any]) -> None:
    kept_pairs = len(pairs.train) + len(pairs.heldout)
    kept_labels = len(labels.train) + len(labels.heldout)
    if (kept_pairs, kept_labels) != (pairs.read, labels.read):
        log.info(
            "kept a seeded sample (max_train_examples, max_heldout_examples, replay): "
            "%d of %d pairs, %d of %d thumbs labels",
            kept_pairs,
            pairs.read,
            kept_labels,
            labels.read,
        )


def check_enough(data: RewardData, config: RewardConfig) -> None:
    """Raise :class:`InsufficientData` with what is missing, if anything is."""
    train = len(data.train_pairs) + len(data.train_labels)
    heldout = len(data.heldout_pairs) + len(data.heldout_labels)
    problems = []
    if data.new_examples == 0:
        problems.append("no new feedback since the current version")
    if train < config.min_train_examples:
        problems.append(
            f"{train} training examples (pairs + thumbs), need {config.min_train_examples}"
        )
    if heldout < config.min_heldout_examples:
        problems.append(
            f"{heldout} held-out examples (pairs + thumbs), need {config.min_heldout_examples}"
        )
    if config.pointwise_weight == 0 and not data.train_pairs:
        problems.append("no training pairs and pointwise_weight is 0")
    if problems:
        raise InsufficientData(
            "not enough feedback for a reward model round (watermark "
            f"{data.watermark}): " + "; ".join(problems) + ". No new version was made."
        )


@functools.lru_cache(maxsize=64)
def _permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=generator).tolist())


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of step ``step``'s batch: positions ``step*batch_size ...`` of an endless
    stream of seeded per-epoch permutations. A pure function, so resuming needs no state."""
    if n == 0:
        return []
    start = step * batch_size
    return [_permutation(n, seed, p // n)[p % n] for p in range(start, start + batch_size)]
