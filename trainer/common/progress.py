"""The progress display every long trainer job shows (model bootstrap, reward rounds, PPO).

One look everywhere: description, bar, done/total, a free-form ``status`` field the job
updates (loss, reward, KL...), elapsed and remaining time. It writes to stderr, so a
command's stdout stays free for its machine-readable result.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress_bar(enabled: bool = True) -> Progress:
    """A `rich` progress display; add tasks with ``status=""`` in their fields."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )
