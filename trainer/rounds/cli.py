"""``alignloop train reward | ppo | loop``: :func:`train_main` dispatches on the target;
``train ppo`` runs one training round now and ``train loop`` runs rounds whenever enough new
feedback arrived, or enough time passed (``train reward`` is :mod:`trainer.reward.cli`).

Flags come from :class:`trainer.rounds.config.RoundConfig` and its nested
:class:`trainer.ppo.config.PPOConfig` (``--iterations``, ``--rollout-batch-size``,
``--rollout-backend hf`` ...); the loop adds :class:`trainer.rounds.trigger.TriggerConfig`
(``--min-new-ratings``, ``--max-interval-s``). ``--demo`` sizes a round for the demo
model on a laptop (what ``alignloop up`` runs). Database, state directory, base model and
broker default to the settings (``ALIGNLOOP_*``).

``train ppo`` prints the round's JSON summary on stdout and exits 0 registered,
4 rejected by the gate, 3 failed (no reward model, too few prompts...), 6 aborted (NaN/inf,
runaway KL), 5 stopped by ``--stop-after-iterations`` (run again to resume), 2 bad usage.
Under ``torchrun --nproc-per-node N`` it runs data-parallel (see trainer/common/distributed.py).

One trainer per database: ``train ppo`` (rank 0) and ``train loop`` hold the ``trainer``
lease (:mod:`deploy.policies.leases`) while they run. A second one prints who holds it and
exits 7; a holder whose lease heartbeat fails stops its round (resumable) and exits 8.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploy.policies import leases
from schemas.config_flags import add_config_flags, config_from_namespace
from trainer.common.malloc_tuning import keep_freed_memory
from trainer.common.onednn_cache import bound_computation_caches
from trainer.rounds import records as round_records
from trainer.rounds import requests as round_requests
from trainer.rounds.config import RoundConfig
from trainer.rounds.trigger import TriggerConfig, should_start

if TYPE_CHECKING:  # imported under the lease (see _ppo_round)
    from trainer.rounds.training_round import TrainingRoundResult

log = logging.getLogger(__name__)

EXIT_CODES = {"registered": 0, "failed": 3, "rejected": 4, "stopped": 5, "aborted": 6}
EXIT_USAGE = 2

DEMO_PPO = {
    "rollout_batch_size": 64,
    "mini_batch_size": 16,
    "ppo_epochs": 4,
    "max_new_tokens": 48,
    "actor_lr": 1e-3,
    "critic_lr": 1e-3,
    "lr_warmup_iterations": 0,
    "init_kl_coef": 0.1,
}
"""``--demo``: a round small enough for the 2M-parameter demo model on one CPU core
(timed: docs/benchmarks.md, "A round idle and under load"). The production defaults are
InstructGPT's, far too slow to show a change in 8 iterations of 64 prompts; at 3e-4 and 2
epochs the policy barely moved on a learned reward. These rates move it clearly in a round,
well inside the gate (measured: docs/benchmarks.md, "How far one PPO round moves the
policy")."""
DEMO_ROUND = {"iterations": 8, "prompt_pool": 500, "eval_prompts": 64}
DEMO_TRIGGER = {"min_new_ratings": 150, "max_interval_s": 600.0}
"""The first round waits for 150 ratings: fewer leave a held-out set too small to show the
reward model better than chance, and the failed reward round still costs its time
(docs/benchmarks.md, "A round idle and under load")."""


def _parser(prog: str, description: str, *, loop: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--demo", action="store_true", help="demo-sized defaults (explicit flags still win)"
    )
    add_config_flags(parser, RoundConfig)
    if loop:
        group = parser.add_argument_group("when a round starts (TriggerConfig)")
        add_config_flags(group, TriggerConfig)
        group.add_argument("--poll-s", type=float, default=10.0, help="How often to check.")
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> dict[str, Any]:
    """Flags as a dict; with ``--demo``, the demo values for every flag not given."""
    values = vars(parser.parse_args(argv))
    if values.pop("demo"):
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
        for key, value in {**DEMO_PPO, **DEMO_ROUND, **DEMO_TRIGGER}.items():
            if key not in given and key in values:
                values[key] = value
    from schemas.settings import Settings

    settings = Settings()
    values["database_url"] = values["database_url"] or settings.database_url
    values["state_dir"] = Path(values["state_dir"] or settings.state_dir).resolve()
    values["base_model"] = Path(
        values["base_model"] or settings.base_model or settings.demo_model_dir()
    ).resolve()
    if values["kafka_bootstrap"] is None:
        values["kafka_bootstrap"] = settings.kafka_bootstrap
    return values


def _round_config(values: dict[str, Any]) -> RoundConfig | None:
    from trainer.common.device import resolve_device

    try:
        config = config_from_namespace(RoundConfig, values)
        resolve_device(config.ppo.device)  # `--device cuda` without a GPU: refused here
    except ValueError as exc:
        print(f"alignloop train: {exc}", file=sys.stderr)
        return None
    if not config.database_url:
        print("alignloop train: set ALIGNLOOP_DATABASE_URL or --database-url", file=sys.stderr)
        return None
    if not (config.base_model / "config.json").is_file():
        print(
            f"alignloop train: no model at {config.base_model} (build the demo model with "
            "`alignloop bootstrap-model`, or set --base-model)",
            file=sys.stderr,
        )
        return None
    return config


def ppo_main(argv: list[str]) -> int:
    """``alignloop train ppo``: one round now (resuming an interrupted one)."""
    parser = _parser("alignloop train ppo", __doc__ or "", loop=False)
    config = _round_config(_parse(parser, argv))
    if config is None:
        return EXIT_USAGE
    # Rank 0 alone holds the lease, before the ranks meet: refused, it exits and torchrun
    # ends the others.
    lease = _take_lease(config) if int(os.environ.get("RANK", "0")) == 0 else None
    if isinstance(lease, int):
        return lease
    try:
        result, is_main = _ppo_round(config)
    except KeyboardInterrupt:
        if lease is None or not lease.lost.is_set():
            raise
        return _lost()
    finally:
        if lease is not None:
            lease.release()
    if is_main:
        print(json.dumps(result.to_json(), indent=2, default=str))
        print(f"round {result.round_id} {result.outcome}: {result.reason}", file=sys.stderr)
    return EXIT_CODES.get(result.outcome, 0)


def _ppo_round(config: RoundConfig) -> tuple[TrainingRoundResult, bool]:
    """One round on this rank (:func:`ppo_main`): its result, and whether this is rank 0.

    The training stack is imported here, under the lease: a second trainer is refused
    without waiting for it, and a lease lost meanwhile stops this like a lease lost later.
    """
    import torch
    from prometheus_client import start_http_server

    from trainer.common.distributed import Dist
    from trainer.rounds.training_round import run_round

    torch.set_num_threads(config.torch_threads())
    keep_freed_memory()
    bound_computation_caches()  # before the first product
    dist = Dist.from_env(config.ppo.device)
    try:
        if config.metrics_port and dist.is_main:
            start_http_server(config.metrics_port)
        return run_round(config, dist=dist), dist.is_main
    finally:
        dist.close()


class _Stop(Exception):
    pass


def _raise_stop(signum, frame) -> None:
    raise _Stop


def loop_main(argv: list[str]) -> int:
    """``alignloop train loop``: watch the feedback; run a round when the trigger says so."""
    parser = _parser("alignloop train loop", __doc__ or "", loop=True)
    values = _parse(parser, argv)
    config = _round_config(values)
    if config is None:
        return EXIT_USAGE
    trigger = config_from_namespace(TriggerConfig, values)
    lease = _take_lease(config)
    if isinstance(lease, int):
        return lease
    with lease:
        return _loop(config, trigger, values["poll_s"], lease)


def _loop(config: RoundConfig, trigger: TriggerConfig, poll_s: float, lease: leases.Lease) -> int:
    """The training loop under its lease (:func:`loop_main`). The training stack is
    imported here, under the lease, for the reasons :func:`_ppo_round` gives."""
    signal.signal(signal.SIGTERM, _raise_stop)
    sampler = None
    try:
        import torch
        from prometheus_client import start_http_server

        from feedback.db import connect, migrate
        from trainer.rounds.training_round import run_round, shared_sampler

        torch.set_num_threads(config.torch_threads())
        keep_freed_memory()
        bound_computation_caches()  # before the first product
        if config.metrics_port:
            start_http_server(config.metrics_port)
        log.info(
            "training loop: a round after %d new ratings or %.0f s (poll every %.0f s)",
            trigger.min_new_ratings,
            trigger.max_interval_s,
            poll_s,
        )
        while True:
            with connect(config.database_url, autocommit=True) as conn:
                migrate(conn)
                reason, request = _next_round(conn, trigger)
            if reason is not None:
                if sampler is None and config.rollouts == "vllm":
                    sampler = shared_sampler(config)
                result = run_round(config, trigger=reason, sampler=sampler)
                log.info("round %d %s: %s", result.round_id, result.outcome, result.reason)
                if request is not None:
                    with connect(config.database_url, autocommit=True) as conn:
                        round_requests.link(conn, request.id, result.round_id)
                if sampler is not None and sampler.broken:  # a new engine for the next round
                    sampler.close()
                    sampler = None
                continue
            time.sleep(poll_s)
    except (_Stop, KeyboardInterrupt):
        if lease.lost.is_set():
            return _lost()
        log.info("training loop stopped")
        return 0
    finally:
        if sampler is not None:
            sampler.close()


def _take_lease(config: RoundConfig) -> leases.Lease | int:
    """The ``trainer`` lease (:mod:`deploy.policies.leases`), or the exit status when
    another trainer holds it. Should its heartbeat fail, the main thread gets a SIGINT:
    the round stops at its next step (it resumes under the next holder) and the command
    exits :data:`~deploy.policies.leases.EXIT_LEASE_LOST`."""
    from schemas.settings import Settings

    main_thread = threading.main_thread().ident
    assert main_thread is not None and config.database_url
    # A process started in the background by a shell (or by a supervisor that does so)
    # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler: the
    # SIGINT below would do nothing and a trainer without its lease would carry on.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return leases.Lease.acquire(
            config.database_url,
            leases.TRAINER,
            heartbeat_s=Settings().lease_heartbeat_s,
            on_lost=lambda: signal.pthread_kill(main_thread, signal.SIGINT),
        )
    except leases.LeaseHeld as exc:
        print(f"alignloop train: not started: {exc}", file=sys.stderr)
        return leases.EXIT_LEASE_HELD


def _lost() -> int:
    print(
        f"alignloop train: stopped: lost the {leases.TRAINER!r} lease (its heartbeat failed); "
        "the round resumes under the next holder",
        file=sys.stderr,
    )
    return leases.EXIT_LEASE_LOST


def _next_round(
    conn, trigger: TriggerConfig
) -> tuple[str | None, round_requests.RoundRequest | None]:
    """Why a round should start now and the operator's request it answers, if any. Order:
    resume an interrupted round; an operator's request (taken here, so it starts one round
    only; it does not wait for a canary's decision: the operator asked now); the trigger."""
    if round_records.running_round(conn) is None:
        request = round_requests.open_request(conn)
        if request is not None and round_requests.take(conn, request.id):
            return request.trigger, request
    return _due(conn, trigger), None


def _due(conn, trigger: TriggerConfig) -> str | None:
    """Why a round should start now (resume an interrupted one first), or None. New
    ratings count from the last round's watermark (taken when it started)."""
    running = round_records.running_round(conn)
    if running is not None:
        return f"resume round {running.id}"
    if trigger.wait_for_decision and _awaiting_decision(conn):
        return None
    last = round_records.last_round(conn)
    since = last.watermark if last is not None else None
    from feedback.datasets import new_ratings_since

    new = new_ratings_since(conn, since)
    elapsed = (time.time() - last.started_at.timestamp()) if last is not None else None
    return should_start(new, elapsed, trigger)


def _awaiting_decision(conn) -> bool:
    """A candidate waits for its canary, or a canary runs."""
    from deploy.policies import registry

    return registry.routing_table(conn).canary_version is not None or bool(
        registry.list_versions(conn, "candidate")
    )


TRAIN_TARGETS = ("reward", "ppo", "loop")


def train_main(argv: list[str] | None = None) -> int:
    """``alignloop train TARGET ...``: ``reward`` (one reward model round), ``ppo`` (one full
    training round), ``loop`` (rounds whenever enough new feedback arrived)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in TRAIN_TARGETS:
        print(f"usage: alignloop train {{{','.join(TRAIN_TARGETS)}}} [--help]", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args[0] == "reward":
        from trainer.reward.cli import train_reward

        return train_reward(args[1:])
    return ppo_main(args[1:]) if args[0] == "ppo" else loop_main(args[1:])
