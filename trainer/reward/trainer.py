"""One reward model round: snapshot the feedback, train, evaluate, gate, version.

:func:`train_reward_model` is the whole round, in this order:

1. **Data** as of a watermark (:func:`feedback.datasets.snapshot`): preference pairs
   (explicit comparisons, and up- vs down-rated answers to one prompt) and thumbs labels,
   split by prompt hash into train and held-out (:func:`feedback.datasets.is_heldout`, so a
   prompt stays on its side in every round and versions are compared on the same pairs).
   Warm start (default): train on what arrived since the current version's watermark plus
   a seeded replay sample of the older examples; otherwise on everything.
2. **Training**: Bradley-Terry on pairs + weighted logistic on thumbs
   (:mod:`trainer.reward.losses`), AdamW on the adapter and head only. The batch of step
   ``s`` is a pure function of (seed, s), so a resumed run sees exactly the batches the
   uninterrupted one would have. Every ``checkpoint_every`` steps the adapter, head,
   optimizer state, step and seed are written atomically with a sha256 manifest; a later
   invocation with the same configuration resumes from the newest one (with the run's
   original watermark), and refuses one whose checksums do not match.
3. **Evaluation** on held-out data: pairwise accuracy, thumbs AUC, reward mean/std per
   label; the current version is evaluated on the same data.
4. **Gate and version**: accepted only if it clears the configured bars and does not trail
   the current version by more than the tolerance; either way the candidate is written
   and recorded (current, or rejected with the reason), see :mod:`trainer.reward.registry`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import psycopg
import torch
from prometheus_client import Counter, Gauge, start_http_server

from feedback.datasets import Watermark
from feedback.db import connect, migrate
from trainer.common.device import resolve_device
from trainer.common.progress import progress_bar
from trainer.reward import registry
from trainer.reward.checkpoints import list_checkpoints, load_checkpoint, save_checkpoint
from trainer.reward.config import RewardConfig
from trainer.reward.data import InsufficientData, RewardData, batch_indices, check_enough, load_data
from trainer.reward.evaluation import evaluate, gate
from trainer.reward.losses import (
    reward_loss,
)
from trainer.reward.model import (
    RewardModel,
    attach_reward_model,
    load_base_model,
    load_reward_model,
    load_seq_cls_model,
    new_lora_reward_model,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

RUN_DIR_NAME = "reward_runs/active"

STEPS = Counter("alignloop_reward_train_steps_total", "Reward model optimizer steps taken.")
PAIRS = Counter("alignloop_reward_train_pairs_total", "Preference pairs trained on (with reuse).")
LOSS = Gauge("alignloop_reward_train_loss", "Loss of the latest reward model training step.")
PROGRESS = Gauge("alignloop_reward_train_progress", "Step / steps of the running round.")
HELDOUT = Gauge(
    "alignloop_reward_heldout_metric", "Held-out metrics of the latest candidate.", ["metric"]
)
ROUNDS = Counter("alignloop_reward_rounds_total", "Reward model rounds by outcome.", ["outcome"])


@dataclass(frozen=True)
class RewardRoundResult:
    outcome: Literal["registered", "rejected", "stopped"]
    version: registry.RewardVersion | None
    """The version written (current or rejected); None when stopped before evaluation."""
    metrics: dict[str, Any] | None
    parent_metrics: dict[str, Any] | None
    reason: str
    warnings: list[str]
    stats: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "version": self.version.version if self.version else None,
            "status": self.version.status if self.version else None,
            "metrics": self.metrics,
            "parent_metrics": self.parent_metrics,
            "reason": self.reason,
            "warnings": self.warnings,
            "stats": self.stats,
        }


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _run_record(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return None


def _write_run_record(run_dir: Path, record: dict[str, Any]) -> None:
    """``run.json`` (watermark, parent, its metrics, fingerprint): what a resume reuses."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".run.json.{os.getpid()}"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, run_dir / "run.json")


def _can_warm_start(config: RewardConfig, parent: registry.RewardVersion | None) -> bool:
    if not config.warm_start or parent is None:
        return False
    wanted_kind = "seq_cls" if config.seq_cls_model else "lora"
    same_base = wanted_kind == "seq_cls" or parent.base_model == str(config.base_model)
    if parent.kind != wanted_kind or not same_base:
        log.warning("cannot warm-start from %s (other kind or base): from scratch", parent.version)
        return False
    return True


class _Models:
    """The base (loaded once) and the reward models built on it for one round, on the
    round's device (``config.device``)."""

    def __init__(self, config: RewardConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.base = None
        self.tokenizer = None
        if not config.seq_cls_model:
            self.base, self.tokenizer = load_base_model(Path(config.base_model))
            torch.nn.Module.to(self.base, self.device)  # transformers' override is mistyped

    def parent(self, record: registry.RewardVersion, adapter_name: str) -> RewardModel:
        """The registered version ``record``, on the shared base when it fits there."""
        path = registry.verified_path(record)
        shared = self.base is not None and record.base_model == str(self.config.base_model)
        if record.kind == "lora" and shared:
            model = attach_reward_model(self.base, self.tokenizer, path, adapter_name=adapter_name)
            self.base = model.peft_model
            return model.to(self.device, self.config.precision)
        return load_reward_model(path).to(self.device, self.config.precision)

    def candidate(self, record: registry.RewardVersion | None) -> RewardModel:
        """Warm-started from ``record``, or freshly initialised."""
        config = self.config
        if config.seq_cls_model:
            source = registry.verified_path(record) if record else Path(config.seq_cls_model)
            return load_seq_cls_model(source, config.max_length).to(
                self.device, self.config.precision
            )
        if record is not None:
            model = self.parent(record, "reward")
        else:
            model = new_lora_reward_model(
                self.base,
                self.tokenizer,
                r=config.lora_r,
                alpha=config.lora_alpha,
                target_modules=config.lora_target_modules,
                max_length=config.max_length,
                seed=config.seed,
                base_model_path=str(config.base_model),
            ).to(self.device, self.config.precision)
            self.base = model.peft_model
        model.max_length = config.max_length
        # self.parent() returns the RewardModel base type; past the seq_cls branch above it
        # is always a LoRA reward model, which has a peft_model.
        model.peft_model.set_adapter("reward")  # type: ignore[attr-defined]
        return model


def _evaluate_parent(
    models: _Models, parent: registry.RewardVersion | None, data: RewardData
) -> dict[str, Any] | None:
    """The current version's metrics on this round's held-out data (the gate's reference).

    Called after the candidate exists, so on a shared base the parent's temporary
    ``previous`` adapter is never the only one (PEFT cannot drop its last adapter)."""
    if parent is None:
        return None
    model = models.parent(parent, "previous")
    metrics = evaluate(model, data.heldout_pairs, data.heldout_labels)
    if getattr(model, "peft_model", None) is models.base:
        # Only the candidate's adapter stays on the shared base (and active).
        models.base.delete_adapter("previous")
        models.base.set_adapter("reward")
    return metrics


def train_reward_model(
    config: RewardConfig, conn: psycopg.Connection | None = None
) -> RewardRoundResult:
    """Run (or resume) one round; see the module docstring. ``config`` must name the
    database, state directory and base model (the CLI fills them from the settings).

    Raises :class:`InsufficientData` (nothing made) or :class:`CheckpointCorrupted`.
    """
    if (
        not config.database_url
        or not config.state_dir
        or not (config.base_model or config.seq_cls_model)
    ):
        raise ValueError("config needs database_url, state_dir and base_model (or seq_cls_model)")
    if config.metrics_port:
        start_http_server(config.metrics_port)
    own_conn = conn is None
    conn = conn or connect(config.database_url, autocommit=True)
    try:
        migrate(conn)
        with _torch_threads(config.num_threads):
            return _run_reward_round(conn, config)
    finally:
        if own_conn:
            conn.close()


def _run_reward_round(conn: psycopg.Connection, config: RewardConfig) -> RewardRoundResult:
    started = time.monotonic()
    assert config.state_dir is not None, "the CLI fills state_dir from the settings"
    state_dir = Path(config.state_dir)
    run_dir = state_dir / RUN_DIR_NAME
    parent = registry.current_version(conn)
    warm = _can_warm_start(config, parent)

    record = _resumable_record(config, run_dir, parent)
    watermark = Watermark(**record["watermark"]) if record else None
    parent_mark = Watermark(**parent.watermark) if warm and parent else None
    data = load_data(conn, config, watermark=watermark, parent_watermark=parent_mark)
    for warning in data.warnings:
        log.warning(warning)
    try:
        check_enough(data, config)
    except InsufficientData:
        ROUNDS.labels("insufficient_data").inc()
        raise

    models = _Models(config)
    model = models.candidate(parent if warm else None)
    if record is None:
        parent_metrics = _evaluate_parent(models, parent, data)
        record = {
            "fingerprint": config.fingerprint(),
            "parent_version": parent.version if parent else None,
            "watermark": data.watermark.__dict__,
            "parent_metrics": parent_metrics,
            "seed": config.seed,
        }
        _write_run_record(run_dir, record)
    parent_metrics = record["parent_metrics"]

    optimizer, start_step = _optimizer(model, config, run_dir)
    stats = _train_steps(model, optimizer, data, config, run_dir, start_step)
    stats.update(
        resumed_from_step=start_step,
        watermark=data.watermark.__dict__,
        train_pairs=len(data.train_pairs),
        train_labels=len(data.train_labels),
        heldout_pairs=len(data.heldout_pairs),
        heldout_labels=len(data.heldout_labels),
        new_examples=data.new_examples,
        replayed_examples=data.replayed_examples,
        warm_start=warm,
    )
    if stats["final_step"] < config.steps:
        ROUNDS.labels("stopped").inc()
        reason = f"stopped at step {stats['final_step']} of {config.steps}; run again to resume"
        return RewardRoundResult(
            "stopped", None, None, parent_metrics, reason, data.warnings, stats
        )

    result = _evaluate_and_register(
        conn, state_dir, model, data, parent, parent_metrics, config, stats, started
    )
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


def _evaluate_and_register(
    conn: psycopg.Connection,
    state_dir: Path,
    model: RewardModel,
    data: RewardData,
    parent: registry.RewardVersion | None,
    parent_metrics: dict[str, Any] | None,
    config: RewardConfig,
    stats: dict[str, Any],
    started: float,
) -> RewardRoundResult:
    """Steps 3 and 4: held-out metrics, the gate, and the version written either way."""
    metrics = evaluate(model, data.heldout_pairs, data.heldout_labels)
    for name in ("pairwise_accuracy", "auc"):
        if metrics[name] is not None:
            HELDOUT.labels(name).set(metrics[name])
    parent_name = parent.version if parent else None
    accepted, reason = gate(metrics, parent_metrics, config, parent_name)
    stats["seconds"] = round(time.monotonic() - started, 2)
    version = registry.register_version(
        conn,
        state_dir,
        model,
        accepted=accepted,
        parent_version=parent_name,
        watermark=data.watermark.__dict__,
        metrics=metrics,
        parent_metrics=parent_metrics,
        reason=reason,
        config=config.to_json(),  # secrets (the database URL) redacted
        train_stats=stats,
    )
    outcome: Literal["registered", "rejected"] = "registered" if accepted else "rejected"
    ROUNDS.labels(outcome).inc()
    return RewardRoundResult(
        outcome, version, metrics, parent_metrics, reason, data.warnings, stats
    )


def _resumable_record(
    config: RewardConfig, run_dir: Path, parent: registry.RewardVersion | None
) -> dict[str, Any] | None:
    """The unfinished run to resume, if its configuration and parent are this round's;
    otherwise None, with the run directory cleared."""
    record = None if config.fresh else _run_record(run_dir)
    if record is not None and (
        record["fingerprint"] != config.fingerprint()
        or record["parent_version"] != (parent.version if parent else None)
    ):
        log.warning("an unfinished run with another configuration or parent: starting over")
        record = None
    if record is None:
        shutil.rmtree(run_dir, ignore_errors=True)
    return record


def _optimizer(
    model: RewardModel, config: RewardConfig, run_dir: Path
) -> tuple[torch.optim.Optimizer, int]:
    """AdamW on the trainable parameters, restored from the newest checkpoint if there is
    one; returns it and the step to start from."""
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        return optimizer, 0
    state = load_checkpoint(checkpoints[-1])
    model.load_trainable_state(state["trainable"])
    optimizer.load_state_dict(state["optimizer"])
    log.info("resuming reward model training at step %d", int(state["step"]))
    return optimizer, int(state["step"])


# Long on purpose: the training loop with its checkpoints, metrics and time-box, step by step.
def _train_steps(
    model: RewardModel,
    optimizer: torch.optim.Optimizer,
    data: RewardData,
    config: RewardConfig,
    run_dir: Path,
    start_step: int,
) -> dict[str, Any]:
    """Steps ``start_step .. steps`` (or until ``stop_after_steps``), checkpointing."""
    end = config.steps
    if config.stop_after_steps is not None:
        end = min(end, start_step + config.stop_after_steps)
    pairs, labels = data.train_pairs, data.train_labels
    model.train(True)
    losses: list[float] = []
    pairs_seen = 0
    train_seconds = 0.0
    with progress_bar(config.progress) as bar:
        task = bar.add_task(
            "training reward model", total=config.steps, completed=start_step, status=""
        )
        for step in range(start_step, end):
            t0 = time.perf_counter()
            pair_batch = [
                pairs[i] for i in batch_indices(len(pairs), config.batch_size, step, config.seed)
            ]
            label_batch = [
                labels[i]
                for i in batch_indices(len(labels), config.batch_size, step, config.seed + 1)
            ]
            if config.pointwise_weight == 0:
                label_batch = []
            conversations = [p.messages for p in pair_batch] * 2 + [x.messages for x in label_batch]
            answers = [p.chosen for p in pair_batch] + [p.rejected for p in pair_batch]
            answers += [x.answer for x in label_batch]
            rewards = model.rewards(conversations, answers)
            n = len(pair_batch)
            y = torch.tensor(
                [1.0 if x.label == "up" else 0.0 for x in label_batch], device=rewards.device
            )
            loss = reward_loss(
                rewards[:n], rewards[n : 2 * n], rewards[2 * n :], y, config.pointwise_weight
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(
                [p for group in optimizer.param_groups for p in group["params"]], 1.0
            )
            optimizer.step()
            train_seconds += time.perf_counter() - t0
            losses.append(loss.item())
            pairs_seen += n
            STEPS.inc()
            PAIRS.inc(n)
            LOSS.set(losses[-1])
            PROGRESS.set((step + 1) / config.steps)
            bar.update(task, advance=1, status=f"loss {losses[-1]:.4f}")
            done = step + 1
            if config.checkpoint_every and (done % config.checkpoint_every == 0 or done == end):
                save_checkpoint(run_dir, model, optimizer, done, config.seed)
    final_step = max(start_step, end)
    tail = losses[-min(10, len(losses)) :]
    return {
        "final_step": final_step,
        "steps_this_run": final_step - start_step,
        "final_loss": round(sum(tail) / len(tail), 4) if tail else None,
        "train_seconds": round(train_seconds, 2),
        "pairs_per_s": round(pairs_seen / train_seconds, 1) if train_seconds else None,
    }
