"""Durability on a POSIX filesystem, shared by every package that writes files others rely
on (the serving spool, the trainer's artifacts): a rename or a new file is durable only
once its directory entry is, so after ``os.rename`` the parent directory is fsync'd too.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(directory: Path | str) -> None:
    """Make the entries of ``directory`` (creations, renames, deletions) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
