"""Pure pieces of the reward trainer: batch order, the version gate, atomic checksummed
directories, and the command line generated from RewardConfig."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.reward.cli import config_from_args
from trainer.reward.config import RewardConfig
from trainer.reward.registry import CorruptedDirectory, verify_dir, write_dir_atomically
from trainer.reward.trainer import batch_indices, gate


def test_batches_are_a_pure_function_of_seed_and_step() -> None:
    assert batch_indices(10, 4, 3, seed=7) == batch_indices(10, 4, 3, seed=7)
    assert batch_indices(10, 4, 0, seed=7) != batch_indices(10, 4, 0, seed=8)
    assert batch_indices(0, 4, 3, seed=7) == []


def test_each_epoch_visits_every_example_once() -> None:
    stream = [i for step in range(5) for i in batch_indices(10, 4, step, seed=1)]
    assert sorted(stream[:10]) == list(range(10))
    assert sorted(stream[10:20]) == list(range(10))


def _metrics(accuracy: float | None, thumbs_auc: float | None) -> dict:
    return {"pairwise_accuracy": accuracy, "auc": thumbs_auc}


CONFIG = RewardConfig(min_pairwise_accuracy=0.7, min_auc=0.6, regression_tolerance=0.02)


def test_gate_accepts_a_good_first_version() -> None:
    accepted, reason = gate(_metrics(0.9, 0.8), None, CONFIG)
    assert accepted, reason
    assert "passed" in reason


def test_gate_applies_the_bars() -> None:
    accepted, reason = gate(_metrics(0.6, 0.8), None, CONFIG)
    assert not accepted and "pairwise accuracy 0.6000 < bar 0.7" in reason
    accepted, reason = gate(_metrics(0.9, 0.5), None, CONFIG)
    assert not accepted and "AUC" in reason


def test_gate_refuses_a_regression_beyond_the_tolerance() -> None:
    parent = _metrics(0.95, 0.9)
    accepted, reason = gate(_metrics(0.94, 0.89), parent, CONFIG, "rm-0001")
    assert accepted, reason  # within 0.02
    accepted, reason = gate(_metrics(0.90, 0.9), parent, CONFIG, "rm-0001")
    assert not accepted
    assert "worse than rm-0001's 0.9500" in reason


def test_gate_skips_undefined_metrics_but_needs_one() -> None:
    accepted, _ = gate(_metrics(0.9, None), _metrics(0.9, 0.99), CONFIG)
    assert accepted
    accepted, reason = gate(_metrics(None, None), None, CONFIG)
    assert not accepted and "nothing to evaluate" in reason


def test_atomic_directory_with_manifest(tmp_path: Path) -> None:
    target = tmp_path / "v1"
    write_dir_atomically(target, lambda d: (d / "weights.bin").write_bytes(b"\x01" * 100))
    assert verify_dir(target)["files"].keys() == {"weights.bin"}
    assert [p.name for p in tmp_path.iterdir()] == ["v1"]  # no temporaries left behind
    # replacing keeps it whole
    write_dir_atomically(target, lambda d: (d / "other.bin").write_bytes(b"\x02"))
    assert sorted(p.name for p in target.iterdir()) == ["MANIFEST.json", "other.bin"]


def test_corruption_is_detected(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    write_dir_atomically(target, lambda d: (d / "state.pt").write_bytes(b"\x00" * 64))
    data = bytearray((target / "state.pt").read_bytes())
    data[10] ^= 0xFF
    (target / "state.pt").write_bytes(bytes(data))
    with pytest.raises(CorruptedDirectory, match=r"state\.pt does not match"):
        verify_dir(target)
    (target / "state.pt").unlink()
    with pytest.raises(CorruptedDirectory, match="missing"):
        verify_dir(target)


def test_failed_fill_leaves_nothing(tmp_path: Path) -> None:
    def boom(directory: Path) -> None:
        (directory / "half").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_dir_atomically(tmp_path / "v2", boom)
    assert list(tmp_path.iterdir()) == []


def test_cli_flags_come_from_the_config(tmp_path: Path) -> None:
    config = config_from_args(
        [
            "--database-url",
            "postgresql://x/y",
            "--state-dir",
            str(tmp_path),
            "--base-model",
            str(tmp_path / "base"),
            "--steps",
            "7",
            "--lr",
            "0.01",
            "--no-warm-start",
            "--rules",
            '[{"name": "length_penalty"}]',
        ]
    )
    assert config.steps == 7 and config.lr == 0.01 and config.warm_start is False
    assert config.rules == [{"name": "length_penalty"}]
    assert config.base_model == (tmp_path / "base").resolve()


def test_fingerprint_ignores_where_and_how_but_not_what() -> None:
    a = RewardConfig(steps=10)
    assert a.fingerprint() == RewardConfig(steps=10, progress=False, metrics_port=9).fingerprint()
    assert a.fingerprint() != RewardConfig(steps=11).fingerprint()


def test_gate_needs_evidence_beyond_chance_not_only_the_bar() -> None:
    lucky = {"pairwise_accuracy": 0.75, "n_pairs": 8, "auc": None, "n_labels": 0, "n_up": 0}
    accepted, reason = gate(lucky, None, CONFIG)
    assert not accepted and "not shown better than chance" in reason
    assert "pairwise accuracy 0.7500 on 8 pairs" in reason
    # Noisy live labels: 0.6 is far from perfect but, on 2,000 pairs, surely not chance.
    noisy = {**lucky, "pairwise_accuracy": 0.6, "n_pairs": 2_000}
    accepted, reason = gate(noisy, None, RewardConfig())
    assert accepted and "lower bound 0.58" in reason, reason


def test_gate_judges_a_small_sample_by_its_bounds_not_its_point_value() -> None:
    # 2 of 6 held-out pairs right says little; 400 thumbs with AUC 0.7 say a lot.
    few_pairs = {"pairwise_accuracy": 1 / 3, "n_pairs": 6, "auc": 0.7, "n_labels": 400, "n_up": 200}
    accepted, reason = gate(few_pairs, None, RewardConfig())
    assert accepted, reason
    # The same accuracy on 600 pairs is shown below the bar.
    accepted, reason = gate({**few_pairs, "n_pairs": 600}, None, RewardConfig())
    assert not accepted and "pairwise accuracy 0.3333 < bar 0.55" in reason
