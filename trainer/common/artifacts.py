"""Atomic, checksummed directories: what the trainer writes that others must trust.

The format and its functions live in :mod:`schemas.durable` (serving checks an adapter
against its registered checksum before loading it, and may not import the trainer); this
module is the trainer's name for them.
"""

from __future__ import annotations

from schemas.durable import (
    MANIFEST_NAME,
    CorruptedDirectory,
    sha256_file,
    verify_checksum,
    verify_dir,
    write_dir_atomically,
)

__all__ = [
    "MANIFEST_NAME",
    "CorruptedDirectory",
    "sha256_file",
    "verify_checksum",
    "verify_dir",
    "write_dir_atomically",
]
