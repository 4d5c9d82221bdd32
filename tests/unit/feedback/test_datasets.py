"""Pure parts of the dataset builders: which rated answers of a prompt to pair, the
reproducible bounded samples callers keep of a stream, and the held-out split."""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter

import pytest

from feedback.datasets import (
    HashSample,
    is_heldout,
    rating_pair_indices,
    sample_by_hash,
    stable_hash,
)


@pytest.mark.parametrize(
    ("n_up", "n_down", "cap"),
    [
        (1, 1, 16),
        (2, 1, 16),
        (3, 1000, 16),
        (1000, 3, 16),
        (4, 6, 16),
        (6, 4, 7),
        (5, 5, 16),
        (20, 30, 16),
        (16, 16, 16),
        (9, 6, 40),
        (12, 8, 96),
        (7, 7, 3),
        (100, 100, 1),
    ],
)
def test_pairs_are_distinct_capped_and_spread_evenly(n_up: int, n_down: int, cap: int) -> None:
    pairs = rating_pair_indices(n_up, n_down, cap)
    a, b = min(n_up, cap), min(n_down, cap)
    assert len(pairs) == min(cap, a * b)
    assert len(set(pairs)) == len(pairs)
    assert all(0 <= i < a and 0 <= j < b for i, j in pairs)
    # the i-th up meets the i-th down first
    assert pairs[: min(a, b)] == [(i, i) for i in range(min(a, b))]
    # every used answer of a side is in floor(T/n) or ceil(T/n) pairs
    total = len(pairs)
    for side, n in ((0, a), (1, b)):
        uses = Counter(p[side] for p in pairs)
        assert len(uses) == min(n, total)  # every used answer, once before any twice
        assert max(uses.values()) <= math.ceil(total / n)
        assert max(uses.values()) - min(uses.values()) <= 1


def test_a_cap_above_every_combination_pairs_all_against_all() -> None:
    assert sorted(rating_pair_indices(3, 4, 100)) == [(i, j) for i in range(3) for j in range(4)]
    assert sorted(rating_pair_indices(6, 4, 24)) == [(i, j) for i in range(6) for j in range(4)]


def test_no_pairs_without_both_sides_or_cap() -> None:
    assert rating_pair_indices(0, 5, 16) == []
    assert rating_pair_indices(5, 0, 16) == []
    assert rating_pair_indices(5, 5, 0) == []


def test_stable_hash_is_fixed_and_seeded() -> None:
    # the same value in every process and release: samples must not move between runs
    assert stable_hash(0, "a") == stable_hash(0, "a") == 0x15D8D767D2A6EBD3
    assert stable_hash(1, "a") != stable_hash(0, "a")
    assert stable_hash(0, "a") != stable_hash(0, "b")
    assert 0 <= stable_hash(7, "x") < 2**64


def _keys(n: int) -> list[str]:
    return [f"item-{i}" for i in range(n)]


def test_hash_sample_keeps_the_lowest_hashes_whatever_the_arrival_order() -> None:
    keys = _keys(5000)
    shuffled = keys[:]
    random.Random(1).shuffle(shuffled)
    sample = sample_by_hash(keys, 100, key=str, seed=3)
    assert sample_by_hash(shuffled, 100, key=str, seed=3) == sample  # same set, same order
    assert len(sample) == 100
    assert sample == sorted(keys, key=lambda k: stable_hash(3, k))[:100]
    assert sample_by_hash(keys, 100, key=str, seed=4) != sample  # another seed, another sample


def test_hash_sample_counts_what_it_saw_and_nests() -> None:
    sample: HashSample[str] = HashSample(50, seed=0)
    for key in _keys(1000):
        sample.add(key, key)
    assert sample.seen == 1000 and len(sample) == 50
    # the 10 lowest of the sample are the sample a size-10 one keeps
    assert sample.items(limit=10) == sample_by_hash(_keys(1000), 10, key=str)
    assert sample.items(limit=0) == []
    # fewer items than the size: everything is kept
    assert sorted(sample_by_hash(_keys(7), 50, key=str)) == sorted(_keys(7))
    assert sample_by_hash(_keys(7), 0, key=str) == []
    with pytest.raises(ValueError):
        HashSample(-1)


def test_a_kept_item_stays_kept_when_fewer_are_offered() -> None:
    everything = sample_by_hash(_keys(3000), 40, key=str)
    subset = [k for k in _keys(3000) if k.endswith(("1", "3", "5"))]
    kept_of_subset = set(sample_by_hash(subset, 40, key=str))
    assert {k for k in everything if k in set(subset)} <= kept_of_subset


def test_heldout_split_is_stable_and_roughly_the_requested_fraction() -> None:
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(4000)]
    held = [h for h in hashes if is_heldout(h, 0.2)]
    assert 0.17 < len(held) / len(hashes) < 0.23
    assert held == [h for h in hashes if is_heldout(h, 0.2)]
    assert set(held) <= {h for h in hashes if is_heldout(h, 0.5)}  # growing never reshuffles
    assert not any(is_heldout(h, 0.0) for h in hashes)
