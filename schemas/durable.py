"""Durability on a POSIX filesystem, shared by every package that writes files others rely
on (the serving spool, the trainer's artifacts): a rename or a new file is durable only
once its directory entry is, so after ``os.rename`` the parent directory is fsync'd too.

Atomic, checksummed directories (reward model versions, policy adapters, resumable
checkpoints): :func:`write_dir_atomically` fills a hidden temporary sibling, adds a
``MANIFEST.json`` with the sha256 of every file, fsyncs the files and renames the directory
into place, so a reader sees a whole directory or none. The directory's checksum is the
sha256 of its manifest (the policy registry keeps it per version). :func:`verify_dir`
checks a directory against its manifest before it is trusted; :func:`verify_checksum`
checks the manifest against a recorded checksum first. The trainer writes and checks them;
serving checks an adapter before loading it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST_NAME = "MANIFEST.json"


class CorruptedDirectory(RuntimeError):
    """A version or checkpoint directory whose files do not match its manifest."""


def fsync_dir(directory: Path | str) -> None:
    """Make the entries of ``directory`` (creations, renames, deletions) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_dir_atomically(target: Path, fill: Callable[[Path], None]) -> str:
    """Create ``target`` with what ``fill(tmp_dir)`` writes, plus a sha256 manifest.

    Returns the manifest's own sha256 (the directory's checksum). An existing ``target`` is
    replaced (moved aside first, then deleted), so a reader never sees a half-written
    directory.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        fill(tmp)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "files": {str(p.relative_to(tmp)): sha256_file(p) for p in files},
            "written_at": time.time(),
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        for p in [*files, tmp / MANIFEST_NAME]:
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        tmp.chmod(0o755)
        if target.exists():
            trash = target.parent / f".{target.name}.old-{os.getpid()}-{time.time_ns()}"
            os.rename(target, trash)
            os.rename(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sha256_file(target / MANIFEST_NAME)


def verify_dir(directory: Path) -> dict[str, Any]:
    """Check every file against the manifest; returns the manifest or raises
    :class:`CorruptedDirectory` naming what is wrong."""
    directory = Path(directory)
    try:
        manifest: dict[str, Any] = json.loads((directory / MANIFEST_NAME).read_text())
        files: dict[str, str] = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptedDirectory(f"{directory}: missing or unreadable {MANIFEST_NAME}") from exc
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise CorruptedDirectory(f"{directory}: {name} is missing")
        found = sha256_file(path)
        if found != expected:
            raise CorruptedDirectory(
                f"{directory}: {name} does not match its sha256 (manifest {expected}, file {found})"
            )
    return manifest


def verify_checksum(directory: Path, checksum: str) -> dict[str, Any]:
    """:func:`verify_dir`, after checking that the manifest's sha256 is ``checksum`` (what
    :func:`write_dir_atomically` returned when the directory was written)."""
    directory = Path(directory)
    try:
        found = sha256_file(directory / MANIFEST_NAME)
    except OSError as exc:
        raise CorruptedDirectory(f"{directory}: missing or unreadable {MANIFEST_NAME}") from exc
    if found != checksum:
        raise CorruptedDirectory(
            f"{directory}: {MANIFEST_NAME} does not match the checksum (registered {checksum}, "
            f"found {found})"
        )
    return verify_dir(directory)
