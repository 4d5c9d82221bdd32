"""What a reward model round trains on: splits, warm-start replay, and the data edge cases
(too little feedback, one-sided thumbs). No model is trained here."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from feedback import datasets
from feedback.db import connect
from feedback.ingest.writer import prepare_session, store_events
from tests.fixtures.reward_feedback import corpus_answers, feedback_events
from trainer.reward import registry
from trainer.reward.config import RewardConfig
from trainer.reward.data import InsufficientData, load_data
from trainer.reward.trainer import train_reward_model
from trainer.rounds.cli import train_main


@pytest.fixture
def conn(migrated_url: str) -> Iterator[psycopg.Connection]:
    with connect(migrated_url, autocommit=True) as c:
        prepare_session(c)
        yield c


def _events(n_prompts: int, seed: int = 0, **kwargs: object) -> list:
    return feedback_events(*corpus_answers(n_prompts, seed), seed=seed, **kwargs)


def test_heldout_split_is_by_prompt(conn: psycopg.Connection) -> None:
    store_events(conn, _events(120))
    data = load_data(conn, RewardConfig(heldout_fraction=0.3))
    heldout = {p.messages[-1]["content"] for p in data.heldout_pairs}
    heldout |= {x.messages[-1]["content"] for x in data.heldout_labels}
    train = {p.messages[-1]["content"] for p in data.train_pairs}
    train |= {x.messages[-1]["content"] for x in data.train_labels}
    assert heldout and train and not heldout & train
    assert all(datasets.is_heldout(x.prompt_hash, 0.3) for x in data.heldout_labels)
    sources = {p.source for p in data.train_pairs + data.heldout_pairs}
    assert sources == {"preference", "ratings"}
    assert data.warnings == []
    # the same watermark gives the same data, however much arrives later
    again = load_data(conn, RewardConfig(heldout_fraction=0.3), watermark=data.watermark)
    store_events(conn, _events(10, seed=5))
    later = load_data(conn, RewardConfig(heldout_fraction=0.3), watermark=data.watermark)
    assert later == again


def test_warm_start_trains_on_new_feedback_plus_replay(conn: psycopg.Connection) -> None:
    store_events(conn, _events(120, seed=1))
    with datasets.snapshot(conn) as before:
        pass
    store_events(conn, _events(30, seed=2))
    config = RewardConfig(replay_ratio=0.5, heldout_fraction=0.2)
    everything = load_data(conn, config)
    old = load_data(conn, config, watermark=before)
    warm = load_data(conn, config, parent_watermark=before)

    def size(data) -> int:
        return len(data.train_pairs) + len(data.train_labels)

    assert warm.new_examples == size(everything) - size(old) > 0
    assert warm.replayed_examples == min(size(old), round(0.5 * warm.new_examples))
    assert size(warm) == warm.new_examples + warm.replayed_examples
    assert warm.heldout_pairs == everything.heldout_pairs  # evaluation sees everything
    # replay is seeded: the same round picks the same old examples
    assert load_data(conn, config, parent_watermark=before) == warm


def test_one_sided_thumbs_warn_and_pairs_come_from_explicit_preferences(
    conn: psycopg.Connection,
) -> None:
    store_events(conn, _events(90, thumbs="up"))
    data = load_data(conn, RewardConfig())
    assert len(data.warnings) == 1 and "all" in data.warnings[0] and "are up" in data.warnings[0]
    assert {x.label for x in data.train_labels + data.heldout_labels} == {"up"}
    pairs = data.train_pairs + data.heldout_pairs
    assert pairs and {p.source for p in pairs} == {"preference"}


def test_too_little_data_makes_no_version(
    conn: psycopg.Connection, migrated_url: str, tmp_path: Path, capsys
) -> None:
    store_events(conn, _events(6))
    # The check runs before any model is loaded, so a placeholder base directory will do.
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    config = RewardConfig(database_url=migrated_url, state_dir=tmp_path, base_model=base)
    with pytest.raises(InsufficientData, match=r"training examples .* need 32"):
        train_reward_model(config)
    args = ["reward", "--database-url", migrated_url, "--state-dir", str(tmp_path)]
    assert train_main([*args, "--base-model", str(base)]) == 3
    err = capsys.readouterr().err
    assert "not enough feedback" in err and "No new version was made" in err
    assert registry.list_versions(conn) == []
    assert not (tmp_path / "reward_models").exists()


def test_empty_database_is_too_little_data(migrated_url: str, tmp_path: Path) -> None:
    config = RewardConfig(database_url=migrated_url, state_dir=tmp_path, base_model=tmp_path)
    with pytest.raises(InsufficientData, match="0 held-out examples"):
        train_reward_model(config)


def _label_keys(labels: list) -> list[tuple[str, int, str]]:
    return [(x.response_id, x.choice_index, x.label) for x in labels]


def _pair_keys(pairs: list) -> list[tuple[str, str]]:
    return [(p.chosen, p.rejected) for p in pairs]


def test_a_round_keeps_a_seeded_sample_within_the_caps(conn: psycopg.Connection) -> None:
    store_events(conn, _events(120, seed=3))
    everything = load_data(conn, RewardConfig(heldout_fraction=0.3))
    config = RewardConfig(heldout_fraction=0.3, max_train_examples=15, max_heldout_examples=6)
    capped = load_data(conn, config)
    assert len(capped.train_pairs) == len(capped.train_labels) == 15
    assert len(capped.heldout_pairs) == len(capped.heldout_labels) == 6
    read = (everything.pairs_read, everything.labels_read)
    assert (capped.pairs_read, capped.labels_read) == read
    assert min(read) > 21  # the caps did bind
    # a sample of the same split: nothing crosses from held-out prompts into training
    assert set(_pair_keys(capped.train_pairs)) <= set(_pair_keys(everything.train_pairs))
    assert set(_label_keys(capped.heldout_labels)) <= set(_label_keys(everything.heldout_labels))
    assert load_data(conn, config) == capped  # reproducible
    other = load_data(conn, RewardConfig(**{**config.__dict__, "seed": 1}))
    assert _label_keys(other.train_labels) != _label_keys(capped.train_labels)


def test_warm_start_within_the_caps_keeps_new_feedback_first(conn: psycopg.Connection) -> None:
    store_events(conn, _events(120, seed=1))
    with datasets.snapshot(conn) as before:
        pass
    store_events(conn, _events(30, seed=2))
    split = RewardConfig(heldout_fraction=0.2)
    old = set(_label_keys(load_data(conn, split, watermark=before).train_labels))
    new = set(_label_keys(load_data(conn, split).train_labels)) - old
    assert len(new) > 10

    config = RewardConfig(replay_ratio=0.5, heldout_fraction=0.2, max_train_examples=10)
    warm = load_data(conn, config, parent_watermark=before)
    labels = _label_keys(warm.train_labels)
    assert len(labels) == 15  # 10 new ones (the cap), then half as many old ones
    assert set(labels[:10]) <= new and set(labels[10:]) <= old
    assert len(warm.train_pairs) == 15
    assert warm.new_examples == 20 and warm.replayed_examples == 10
    assert load_data(conn, config, parent_watermark=before) == warm


def test_ppo_ptx_text_is_the_up_rated_answers(conn: psycopg.Connection) -> None:
    from trainer.rounds.training_round import PTX_MAX_EXAMPLES, ptx_labels

    store_events(conn, _events(40, seed=4))
    with datasets.snapshot(conn) as wm:
        labels = ptx_labels(conn, wm)
        assert ptx_labels(conn, wm) == labels  # the same sample for the same watermark
        every = list(datasets.pointwise_labels(conn, wm))
    assert {x.label for x in labels} == {"up"}
    assert len(labels) <= PTX_MAX_EXAMPLES
    assert sorted(_label_keys(labels)) == sorted(_label_keys([x for x in every if x.label == "up"]))
