"""`alignloop up`: the whole loop on one machine, on embedded defaults.

Starts, under one state directory: Postgres (embedded unless ALIGNLOOP_DATABASE_URL is
set), a Kafka-protocol broker (embedded unless ALIGNLOOP_KAFKA_BOOTSTRAP is set), the
demo base model (built once, unless ALIGNLOOP_BASE_MODEL is set), then the loop's
processes as children, each logging to state_dir/logs/NAME.log. A child that dies is
restarted with backoff. Ctrl-C (or SIGTERM) stops everything, children first.

On a CPU-only machine the cores are split (:mod:`deploy.local.cpu_plan`): the trainer gets its
share, serving the rest, so training rounds finish in bounded time under chat load. The
admin API (served by the canary controller) gets a token, made once and kept in
``state_dir/admin_token`` unless ``ALIGNLOOP_ADMIN_TOKEN`` is set.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from schemas.settings import Settings

log = logging.getLogger(__name__)
console = Console()
ADMIN_TOKEN_FILE = "admin_token"


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


def _wait_http(url: str, child: Child, timeout: float) -> bool:
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


def admin_token(settings: Settings, state: Path) -> str:
    """The admin API's bearer token: the configured one, else one made once and kept
    (mode 0600) in ``state/admin_token``."""
    if settings.admin_token is not None and settings.admin_token.get_secret_value():
        return settings.admin_token.get_secret_value()
    path = state / ADMIN_TOKEN_FILE
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def child_envs(settings: Settings, base: dict[str, str]) -> dict[str, dict[str, str]]:
    """Each child's environment: ``base`` plus its cores and thread pools (see
    :mod:`deploy.local.cpu_plan`); with a GPU, or nothing to split, every child sees every core."""
    from deploy.local import cpu_plan

    names = ("serving", "ingestor", "canary", "trainer")
    split = None
    if not _cuda_visible():
        split = cpu_plan.plan(os.sched_getaffinity(0), settings.trainer_cpu_share)
    if split is None:
        return {name: dict(base) for name in names}
    light = cpu_plan.child_env(split.light, threads=1)
    return {
        "serving": {**base, **cpu_plan.child_env(split.serving, len(split.serving), vllm=True)},
        "ingestor": {**base, **light},
        "canary": {**base, **light},
        "trainer": {**base, **cpu_plan.child_env(split.trainer, len(split.trainer))},
    }


def _cuda_visible() -> bool:
    """An NVIDIA GPU answers (as ./dev decides between the CPU and GPU builds)."""
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class _Stop(Exception):
    pass


def _raise_stop(signum, frame) -> None:
    raise _Stop


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="alignloop up",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--state-dir", type=Path, help="default: ALIGNLOOP_STATE_DIR or ./.alignloop")
    ap.add_argument("--host", help="chat API bind address (default 127.0.0.1)")
    ap.add_argument("--port", type=int, help="chat API port (default 8000)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("pgserver").setLevel(logging.WARNING)  # logs every pg_ctl call

    overrides = {
        k: v
        for k, v in {"state_dir": args.state_dir, "host": args.host, "port": args.port}.items()
        if v is not None
    }
    settings = Settings(**overrides)
    state = settings.state_dir.resolve()
    state.mkdir(parents=True, exist_ok=True)
    settings = settings.model_copy(update={"state_dir": state})

    # Both explicitly: a shell that starts `up` in the background leaves SIGINT ignored,
    # and Ctrl-C (or kill -INT) must still stop the loop.
    signal.signal(signal.SIGINT, _raise_stop)
    signal.signal(signal.SIGTERM, _raise_stop)
    postgres = broker = None
    children: list[Child] = []
    try:
        # 1. infrastructure
        db_url = settings.database_url
        if not db_url:
            from deploy.local.postgres import EmbeddedPostgres

            with console.status("starting embedded Postgres…"):
                postgres = EmbeddedPostgres(state / "postgres")
                db_url = postgres.start()
        bootstrap = settings.kafka_bootstrap
        if not bootstrap:
            from deploy.local.broker import EmbeddedBroker

            with console.status("starting embedded Kafka-protocol broker (Tansu)…"):
                broker = EmbeddedBroker(log_path=state / "logs" / "broker.log")
                broker.start()
                bootstrap = broker.bootstrap
        # 2. the model
        model_dir = settings.base_model
        if model_dir is None:
            from trainer.demo.model import bootstrap_demo_model

            model_dir = settings.demo_model_dir()
            console.print(f"demo model: {model_dir} (built once, reused afterwards)")
            bootstrap_demo_model(model_dir)
        # 3. the loop's processes
        env = {
            **os.environ,
            "ALIGNLOOP_STATE_DIR": str(state),
            "ALIGNLOOP_DATABASE_URL": db_url,
            "ALIGNLOOP_KAFKA_BOOTSTRAP": bootstrap,
            "ALIGNLOOP_BASE_MODEL": str(Path(model_dir).resolve()),
            "ALIGNLOOP_ADMIN_TOKEN": admin_token(settings, state),
        }
        envs = child_envs(settings, env)
        py = [sys.executable, "-m", "deploy.cli"]
        api = f"http://{settings.host}:{settings.port}"
        logs = state / "logs"
        serve = Child(
            "serving",
            [*py, "serve", "--host", settings.host, "--port", str(settings.port)],
            logs / "serving.log",
            envs["serving"],
        )
        ingest = Child("ingestor", [*py, "ingest"], logs / "ingestor.log", envs["ingestor"])
        # The demo controller decides on small samples so a canary can finish on one laptop.
        canary = Child("canary", [*py, "canary", "--demo"], logs / "canary.log", envs["canary"])
        # Demo-sized PPO rounds, started by new feedback (or a timer) on the demo model.
        trainer = Child(
            "trainer",
            [*py, "train", "loop", "--demo", "--metrics-port", str(settings.trainer_metrics_port)],
            logs / "trainer.log",
            envs["trainer"],
        )
        children += [serve, ingest, canary, trainer]
        for child in children:
            child.start()
        with console.status("starting the chat API (vLLM engine, ~30 s on CPU)…"):
            if not _wait_http(f"{api}/healthz", serve, timeout=300):
                console.print(
                    f"[red]serving did not come up[/red]; last lines of "
                    f"{serve.log_path}:\n{serve.log_tail()}"
                )
                return 1
        console.print(
            f"""[bold green]alignloop is up[/bold green]
  chat API      {api}/v1/chat/completions  (model "{settings.served_model_name}")
  feedback      {api}/v1/feedback
                {api}/v1/preferences
  metrics       {api}/metrics (serving)
                http://127.0.0.1:{settings.ingest_metrics_port}/metrics (ingestor)
                http://127.0.0.1:{settings.admin_port}/metrics (canary controller, /admin)
                http://127.0.0.1:{settings.trainer_metrics_port}/metrics (trainer: PPO rounds)
  admin API     http://127.0.0.1:{settings.admin_port}/admin
                (bearer token in {state / ADMIN_TOKEN_FILE})
  cores         {_cores_line(envs)}
  Postgres      {db_url}
  Kafka         {bootstrap}
  logs          {state / "logs"}
Ctrl-C stops everything.""",
            soft_wrap=True,
        )
        _supervise(children)
        return 0
    except _Stop:
        return 0
    finally:
        # A second Ctrl-C must not abandon the children half-way: finish the shutdown.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        console.print("stopping…")
        for child in reversed(children):
            child.stop()
        if broker is not None:
            broker.stop()
        if postgres is not None:
            postgres.stop()


def _cores_line(envs: dict[str, dict[str, str]]) -> str:
    from deploy.local.cpu_plan import ENV

    if ENV not in envs["trainer"]:
        return "shared by every process"
    return f"serving {envs['serving'][ENV]}, trainer {envs['trainer'][ENV]}"


def _supervise(children: list[Child]) -> None:
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
