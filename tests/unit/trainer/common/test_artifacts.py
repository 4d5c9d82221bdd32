"""Tests of :mod:`trainer.common.artifacts`."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.common.artifacts import CorruptedDirectory, verify_dir, write_dir_atomically


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
