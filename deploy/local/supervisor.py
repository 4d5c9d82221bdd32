"""The children of ``alignloop up``: start, watch, restart with backoff, stop.

Each :class:`Child` is one process of the loop in its own session (so a Ctrl-C in the
terminal reaches ``alignloop up`` alone, which then stops the children in order), logging to
its own file. :func:`supervise` restarts a child that died after 1 s, 2 s, … up to 60 s;
:func:`wait_http` waits for a child's HTTP endpoint while the child is alive.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

console = Console()


@dataclass
class Child:
    """One supervised process of the loop."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default=0.0)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        out.close()
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def wait_http(url: str, child: Child, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def supervise(children: list[Child]) -> None:
    """Restart a child that died, with exponential backoff (1 s, 2 s, … up to 60 s)."""
    while True:
        now = time.monotonic()
        for child in children:
            if child.alive() or now < child.next_start:
                continue
            if child.proc is not None and child.next_start == 0.0:
                code = child.proc.returncode
                delay = min(60.0, 2.0**child.restarts)
                console.print(
                    f"[yellow]{child.name} exited ({code}); restarting in "
                    f"{delay:.0f} s[/yellow]\n{child.log_tail(5)}"
                )
                child.next_start = now + delay
                continue
            child.restarts += 1
            child.next_start = 0.0
            child.start()
        time.sleep(0.5)
