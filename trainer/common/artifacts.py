"""Atomic, checksummed directories: what the trainer writes that others must trust.

:func:`write_dir_atomically` fills a hidden temporary sibling, adds a ``MANIFEST.json``
with the sha256 of every file, fsyncs the files and renames the directory into place, so
a reader sees a whole directory or none (reward model versions, policy adapters,
resumable checkpoints). :func:`verify_dir` checks a directory against its manifest before
it is trusted.
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

from schemas.durable import fsync_dir

MANIFEST_NAME = "MANIFEST.json"


class CorruptedDirectory(RuntimeError):
    """A version or checkpoint directory whose files do not match its manifest."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_dir_atomically(target: Path, fill: Callable[[Path], None]) -> str:
    """Create ``target`` with what ``fill(tmp_dir)`` writes, plus a sha256 manifest.

    Returns the manifest's own sha256. An existing ``target`` is replaced (moved aside
    first, then deleted), so a reader never sees a half-written directory.
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
        manifest = json.loads((directory / MANIFEST_NAME).read_text())
        files: dict[str, str] = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptedDirectory(f"{directory}: missing or unreadable {MANIFEST_NAME}") from exc
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise CorruptedDirectory(f"{directory}: {name} is missing")
        if sha256_file(path) != expected:
            raise CorruptedDirectory(f"{directory}: {name} does not match its sha256")
    return manifest
