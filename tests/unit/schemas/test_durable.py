"""Checksummed directories against a recorded checksum (:func:`schemas.durable.verify_checksum`):
what serving checks before it loads an adapter."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from schemas.durable import MANIFEST_NAME, CorruptedDirectory, verify_checksum, write_dir_atomically


def _signed(tmp_path: Path) -> tuple[Path, str]:
    target = tmp_path / "adapter"
    checksum = write_dir_atomically(
        target, lambda d: (d / "weights.bin").write_bytes(bytes(range(256)) * 4)
    )
    return target, checksum


def test_the_checksum_is_the_manifests_sha256_and_verifies(tmp_path: Path) -> None:
    target, checksum = _signed(tmp_path)
    assert checksum == hashlib.sha256((target / MANIFEST_NAME).read_bytes()).hexdigest()
    assert verify_checksum(target, checksum)["files"].keys() == {"weights.bin"}


def test_a_flipped_byte_is_refused_naming_both_sha256s(tmp_path: Path) -> None:
    target, checksum = _signed(tmp_path)
    good = hashlib.sha256((target / "weights.bin").read_bytes()).hexdigest()
    data = bytearray((target / "weights.bin").read_bytes())
    data[700] ^= 0x01
    (target / "weights.bin").write_bytes(bytes(data))
    bad = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(CorruptedDirectory) as refused:
        verify_checksum(target, checksum)
    assert f"weights.bin does not match its sha256 (manifest {good}, file {bad})" in str(
        refused.value
    )


def test_a_rewritten_manifest_does_not_match_the_registered_checksum(tmp_path: Path) -> None:
    target, checksum = _signed(tmp_path)
    # Someone replaces the weights and writes a manifest that agrees with them.
    (target / MANIFEST_NAME).unlink()
    forged = write_dir_atomically(target, lambda d: (d / "weights.bin").write_bytes(b"evil"))
    with pytest.raises(CorruptedDirectory) as refused:
        verify_checksum(target, checksum)
    assert f"(registered {checksum}, found {forged})" in str(refused.value)
    with pytest.raises(CorruptedDirectory, match=r"missing or unreadable MANIFEST\.json"):
        verify_checksum(tmp_path / "nowhere", checksum)
