"""One training round, from live feedback to a registered candidate policy.

:func:`run_round`, in order:

1. **Open** the round record (``training_rounds``): resume the running one if a trainer
   was killed mid-round with the same configuration, else start a new one.
2. **Reward model**: a reward model round on the feedback so far
   (:func:`trainer.reward.trainer.train_reward_model`); with too little new feedback, or a
   rejected version, the current version is used. No reward model at all: the round fails.
   The reward version, the data watermark and the parent (the stable policy) are recorded,
   so a resumed round trains on exactly the same inputs.
3. **Prompts** sampled from logged traffic as of the watermark, split by prompt hash into
   training and held-out prompts.
4. **PPO**: ``iterations`` x :meth:`trainer.ppo.trainer.PPOTrainer.iteration`, each
   recorded (``training_steps``, Prometheus, the console) and checkpointed atomically.
   NaN/inf or a runaway KL aborts the round (recorded; nothing registered).
5. **Evaluate** the candidate against the stable policy on held-out prompts
   (:mod:`trainer.ppo.evaluation`) and **gate** it.
6. **Register**: the adapter is written atomically (temporary directory, sha256 manifest,
   rename) under ``STATE_DIR/policies/ppo-NNNN``, registered as a ``candidate`` policy
   version (metrics, parent, reward model version, round), and a ``PolicyCandidate`` event
   goes to ``alignloop.policy``. The canary controller takes it from there.

A trainer killed at any point leaves either the previous checkpoint or the next one (never
half of one), the round ``running``, and no candidate, or a complete, checksummed one: the
next run resumes. Under ``torchrun`` every rank runs this function (see
:mod:`trainer.common.distributed`); rank 0 alone writes.
"""

from __future__ import annotations

import hashlib
import logging
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import torch
from prometheus_client import Counter, Gauge

from deploy.policies import registry as policy_registry
from feedback import datasets
from feedback.db import connect, migrate
from trainer.common import artifacts
from trainer.common.device import resolve_device
from trainer.common.distributed import Dist
from trainer.common.progress import progress_bar
from trainer.ppo.evaluation import evaluate
from trainer.ppo.models import PolicyModels
from trainer.ppo.rollout.base import AdapterSyncError, Sampler, eos_token_ids, render_prompts
from trainer.ppo.rollout.hf import HFSampler
from trainer.ppo.rollout.vllm import VllmOptions, VllmSampler
from trainer.ppo.trainer import PPOTrainer, TrainingDiverged
from trainer.reward import registry as reward_registry
from trainer.reward.config import RewardConfig
from trainer.reward.data import InsufficientData
from trainer.reward.rules import ComposedReward, build_rules
from trainer.reward.trainer import train_reward_model
from trainer.rounds import records as round_records
from trainer.rounds.config import RoundConfig
from trainer.rounds.gate import gate

log = logging.getLogger(__name__)

RUNS_DIR = "ppo_runs"
POLICIES_DIR = "policies"
CHECKPOINT_STATE = "state.pt"
ACTOR = "trainer"

ITERATIONS = Counter("alignloop_ppo_iterations_total", "PPO iterations completed.")
EPISODES = Counter("alignloop_ppo_episodes_total", "Rollout episodes (prompt + response).")
ROLLOUT_TOKENS = Counter("alignloop_ppo_rollout_tokens_total", "Tokens sampled in rollouts.")
ITERATION_METRIC = Gauge(
    "alignloop_ppo_iteration_metric",
    "Metrics of the latest PPO iteration (reward_raw, kl_ref, kl_coef, clip_fraction, ...).",
    ["metric"],
)
EVAL_METRIC = Gauge(
    "alignloop_ppo_eval_metric", "Offline evaluation of the latest candidate.", ["metric"]
)
ROUNDS = Counter("alignloop_training_rounds_total", "Training rounds by outcome.", ["outcome"])
ROUND_RUNNING = Gauge("alignloop_training_round_running", "1 while a round is running.")


class RoundFailed(RuntimeError):
    """The round cannot run (no reward model, too few prompts...); the reason is recorded."""


@dataclass
class TrainingRoundResult:
    round_id: int
    outcome: str
    """registered | rejected | failed | aborted | stopped (resumable)."""
    reason: str
    candidate_version: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "round_id": self.round_id,
            "outcome": self.outcome,
            "reason": self.reason,
            "candidate_version": self.candidate_version,
            "metrics": self.metrics,
            "steps": self.steps,
        }


# --- the round ---------------------------------------------------------------------------------


def run_round(
    config: RoundConfig,
    *,
    trigger: str = "manual",
    sampler: Sampler | None = None,
    dist: Dist | None = None,
) -> TrainingRoundResult:
    """Run (or resume) one round; see the module docstring.

    ``sampler``: a vLLM sampler kept across rounds by ``alignloop train loop`` (the engine
    is slow to start: docs/benchmarks.md, "Figures quoted in code"); None = start one for
    this round (and close it after).
    """
    dist = dist or Dist.from_env(config.ppo.device)
    if not config.database_url or not config.state_dir or not config.base_model:
        raise ValueError("config needs database_url, state_dir and base_model")
    with connect(config.database_url, autocommit=True) as conn:
        if dist.is_main:
            migrate(conn)
        record = _open_round(conn, config, trigger, dist)
        ROUND_RUNNING.set(1)
        try:
            result = _run_training_round(conn, config, record, dist, sampler)
        except TrainingDiverged as exc:
            result = TrainingRoundResult(record.id, "aborted", str(exc))
        except (RoundFailed, AdapterSyncError, artifacts.CorruptedDirectory) as exc:
            result = TrainingRoundResult(record.id, "failed", str(exc))
        finally:
            ROUND_RUNNING.set(0)
        if result.outcome in ("aborted", "failed") and dist.is_main:
            round_records.finish_round(conn, record.id, result.outcome, result.reason)
            shutil.rmtree(_run_dir(config, record.id), ignore_errors=True)
        ROUNDS.labels(result.outcome).inc()
        return result


def _open_round(
    conn: psycopg.Connection, config: RoundConfig, trigger: str, dist: Dist
) -> round_records.TrainingRound:
    """Rank 0 resumes the running round (same configuration) or starts one; others follow."""
    if dist.is_main:
        running = round_records.running_round(conn)
        if running is not None and running.config.get("fingerprint") != config.fingerprint():
            round_records.finish_round(
                conn, running.id, "failed", "superseded: restarted with another configuration"
            )
            running = None
        if running is None:
            stable = policy_registry.routing_table(conn).stable_version
            running = round_records.start_round(
                conn,
                trigger=trigger,
                config={**config.to_json(), "fingerprint": config.fingerprint()},
                parent_version=stable,
            )
            log.info("training round %d started (%s)", running.id, trigger)
        else:
            log.info("resuming training round %d", running.id)
    dist.barrier()
    record = round_records.running_round(conn)
    assert record is not None
    return record


def _run_training_round(
    conn: psycopg.Connection,
    config: RoundConfig,
    record: round_records.TrainingRound,
    dist: Dist,
    sampler: Sampler | None,
) -> TrainingRoundResult:
    record = _reward_model_and_watermark(conn, config, record, dist)
    assert record.reward_model_version is not None  # step 1 set it
    rm = reward_registry.get_version(conn, record.reward_model_version)
    assert rm is not None and record.watermark is not None
    watermark = datasets.Watermark(**record.watermark)
    train_prompts, heldout_prompts = _prompts(conn, config, watermark)
    parent = policy_registry.get(conn, record.parent_version or "base")

    assert config.base_model is not None  # run_round checked it
    models = PolicyModels.load(
        Path(config.base_model),
        reward_registry.verified_path(rm),
        policy_init=Path(parent.adapter_uri) if parent.adapter_uri else None,
        critic_init=config.critic_init,
        critic=config.critic,
        lora_r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_target_modules=config.lora_target_modules,
        temperature=config.ppo.temperature,
        seed=config.ppo.seed,
    ).to(resolve_device(config.ppo.device), config.ppo.precision)
    rules = config.rules if config.rules is not None else rm.config.get("rules", [])
    reward_fn = ComposedReward(models.reward, build_rules(rules)).components
    own_sampler = sampler is None
    if sampler is None:
        sampler = make_sampler(config, models, _run_dir(config, record.id) / "sync")
    try:
        trainer = PPOTrainer(
            config.ppo,
            models,
            sampler,
            reward_fn,
            dist,
            ptx_examples=_ptx_examples(conn, models, watermark) if config.ppo.ptx_coef else (),
        )
        steps, stopped = _train(conn, config, record, trainer, train_prompts, dist)
        digest = hashlib.sha256(
            b"".join(t.numpy().tobytes() for t in models.policy_state().values())
        ).hexdigest()
        log.info("rank %d policy sha256 %s", dist.rank, digest)  # DDP keeps ranks identical
        if stopped:
            return TrainingRoundResult(record.id, "stopped", stopped, steps=steps)
        if not dist.is_main:
            dist.barrier()
            return TrainingRoundResult(
                record.id, "done-on-rank-0", "rank 0 evaluates and registers"
            )
        sampler.sync(models, "final")
        stable_which = parent.adapter_uri or "base"
        evaluation = evaluate(models, sampler, reward_fn, heldout_prompts, stable_which, config.ppo)
        for name in ("win_rate", "reward_gain", "kl_to_reference", "distinct_2_ratio"):
            EVAL_METRIC.labels(name).set(evaluation[name])
        result = _gate_and_register(conn, config, record, rm, models, evaluation, steps)
        dist.barrier()
        return result
    finally:
        if own_sampler:
            sampler.close()


def _reward_model_and_watermark(
    conn: psycopg.Connection,
    config: RoundConfig,
    record: round_records.TrainingRound,
    dist: Dist,
) -> round_records.TrainingRound:
    """Step 2: update the reward model (once per round) and fix the round's data snapshot."""
    if record.reward_model_version is None and dist.is_main:
        # The snapshot is taken after the reward update: PPO sees at least what it saw.
        if config.update_reward_model:
            reward_config = RewardConfig(
                database_url=config.database_url,
                state_dir=config.state_dir,
                base_model=config.base_model,
                progress=config.progress,
                device=config.ppo.device,
            )
            try:
                outcome = train_reward_model(reward_config, conn)
                log.info("reward model round: %s (%s)", outcome.outcome, outcome.reason)
            except InsufficientData as exc:
                log.info("reward model unchanged: %s", exc)
        rm = reward_registry.current_version(conn)
        if rm is None:
            raise RoundFailed(
                "no reward model version yet: it needs enough feedback for a first accepted "
                "round (alignloop train reward)"
            )
        round_records.update_round(
            conn,
            record.id,
            reward_model_version=rm.version,
            watermark=datasets.capture_watermark(conn).__dict__,
        )
    dist.barrier()
    refreshed = round_records.running_round(conn)
    assert refreshed is not None and refreshed.id == record.id
    return refreshed


def _prompts(
    conn: psycopg.Connection, config: RoundConfig, watermark: datasets.Watermark
) -> tuple[list[Any], list[Any]]:
    """Step 3: training and held-out conversations from logged traffic."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(config.base_model))
    pool = datasets.rollout_prompts(
        conn, watermark, config.prompt_pool, config.heldout_fraction, config.ppo.seed
    )
    fits = [
        p
        for p, ids in zip(pool, render_prompts(tokenizer, [p.messages for p in pool]), strict=True)
        if len(ids) <= config.max_prompt_tokens
    ]
    train = [p.messages for p in fits if p.split == "train"]
    heldout = [p.messages for p in fits if p.split == "heldout"][: config.eval_prompts]
    if len(train) < config.min_train_prompts or len(heldout) < config.min_eval_prompts:
        raise RoundFailed(
            f"too few logged prompts as of {watermark}: {len(train)} for training (need "
            f"{config.min_train_prompts}), {len(heldout)} held out (need "
            f"{config.min_eval_prompts})"
        )
    return train, heldout


PTX_MAX_EXAMPLES = 10_000
"""PPO-ptx examples a round holds at most: each gradient step draws one mini-batch of them,
so a seeded sample of the up-rated answers serves as well as all of them, in bounded memory."""


def ptx_labels(
    conn: psycopg.Connection, watermark: datasets.Watermark
) -> list[datasets.PointwiseLabel]:
    """At most :data:`PTX_MAX_EXAMPLES` up-rated answers, a seeded sample (the same for the
    same watermark) chosen on the labels' refs, so only the sample's texts are read."""
    chosen = datasets.sample_by_hash(
        (x for x in datasets.label_refs(conn, watermark) if x.label == "up"),
        PTX_MAX_EXAMPLES,
        key=lambda x: f"{x.response_id}:{x.choice_index}",
    )
    return datasets.labels_for(conn, chosen)


def _ptx_examples(
    conn: psycopg.Connection, models: PolicyModels, watermark: datasets.Watermark
) -> list[tuple[list[int], list[int]]]:
    """PPO-ptx text: up-rated answers (prompt ids, answer ids + end-of-turn), the
    :func:`ptx_labels` sample."""
    labels = ptx_labels(conn, watermark)
    prompts = render_prompts(models.tokenizer, [x.messages for x in labels])
    hf_model = models.peft_model.get_base_model()
    end = min(eos_token_ids(models.tokenizer, hf_model.generation_config))
    answers = [
        models.tokenizer(x.answer, add_special_tokens=False)["input_ids"] + [end] for x in labels
    ]
    return list(zip(prompts, answers, strict=True))


def make_sampler(config: RoundConfig, models: PolicyModels, sync_dir: Path) -> Sampler:
    if config.rollouts == "hf":
        return HFSampler(models)
    return shared_sampler(config, sync_dir)


def shared_sampler(config: RoundConfig, sync_dir: Path | None = None) -> VllmSampler:
    """A vLLM rollout engine on the base model; ``alignloop train loop`` keeps one for
    every round (it is slow to start), syncing each round's actor into it."""
    # Both paths are set: by run_round's check, or by the CLI from the settings.
    if sync_dir is None:
        assert config.state_dir is not None
        sync_dir = Path(config.state_dir) / RUNS_DIR / "sync"
    assert config.base_model is not None
    return VllmSampler(
        Path(config.base_model),
        sync_dir,
        VllmOptions(
            dtype=config.vllm_dtype,
            max_lora_rank=max(8, config.lora_r),
            kv_cache_mib=config.vllm_kv_cache_mib,
            gpu_memory_utilization=config.vllm_gpu_memory_utilization,
            engine_cpus=config.vllm_engine_cpus,
            sync_timeout_s=config.sync_timeout_s,
        ),
    )


# --- step 4: the PPO iterations -------------------------------------------------------------


def _run_dir(config: RoundConfig, round_id: int) -> Path:
    assert config.state_dir is not None  # run_round checked it
    return Path(config.state_dir) / RUNS_DIR / f"round-{round_id}"


def iteration_prompts(pool: Sequence[Any], iteration: int, n: int, seed: int) -> list[Any]:
    """The prompts of one iteration: a pure function of (pool, iteration, seed), so a
    resumed round draws exactly what the uninterrupted one would have."""
    rng = random.Random(f"{seed}:{iteration}")
    return rng.sample(list(pool), n) if n <= len(pool) else rng.choices(list(pool), k=n)


def _train(
    conn: psycopg.Connection,
    config: RoundConfig,
    record: round_records.TrainingRound,
    trainer: PPOTrainer,
    pool: list[Any],
    dist: Dist,
) -> tuple[list[dict[str, Any]], str | None]:
    """Iterations from the checkpoint on; returns (metrics per iteration, stop reason)."""
    run_dir = _run_dir(config, record.id)
    start = _load_checkpoint(run_dir, trainer)
    steps = [m for _, m in round_records.steps(conn, record.id) if m["iteration"] < start]
    end = config.iterations
    if config.stop_after_iterations is not None:
        end = min(end, start + config.stop_after_iterations)
    ppo = config.ppo
    with progress_bar(config.progress and dist.is_main) as bar:
        task = bar.add_task("PPO", total=config.iterations, completed=start, status="")
        for it in range(start, end):
            prompts = iteration_prompts(pool, it, ppo.rollout_batch_size, ppo.seed)
            metrics = trainer.iteration(prompts[dist.shard(len(prompts))], it)
            if metrics["kl_ref"] > config.abort_kl:
                raise TrainingDiverged(
                    f"KL to the reference {metrics['kl_ref']:.2f} nats > abort_kl "
                    f"{config.abort_kl} at iteration {it}: the policy ran away"
                )
            steps.append(metrics)
            if dist.is_main:
                round_records.record_step(conn, record.id, it, metrics)
                _export_metrics(metrics)
                _save_checkpoint(run_dir, trainer, it + 1, config)
                bar.update(
                    task,
                    advance=1,
                    status=f"reward {metrics['reward_raw']:+.3f}  KL {metrics['kl_ref']:.3f}  "
                    f"clip {metrics['clip_fraction'] or 0:.3f}  "
                    f"{metrics['rollout_tokens_per_s']:.0f} tok/s",
                )
            dist.barrier()
    if end < config.iterations:
        return steps, f"stopped after iteration {end} of {config.iterations}; run again to resume"
    return steps, None


def _export_metrics(metrics: dict[str, Any]) -> None:
    ITERATIONS.inc()
    EPISODES.inc(metrics["episodes"])
    ROLLOUT_TOKENS.inc(metrics["rollout_tokens"])
    for name, value in metrics.items():
        if isinstance(value, int | float) and not isinstance(value, bool) and value is not None:
            ITERATION_METRIC.labels(name).set(value)


def _save_checkpoint(run_dir: Path, trainer: PPOTrainer, iteration: int, config: RoundConfig):
    state = {"iteration": iteration, "fingerprint": config.fingerprint(), **trainer.state_dict()}
    artifacts.write_dir_atomically(
        run_dir / "checkpoint", lambda d: torch.save(state, d / CHECKPOINT_STATE)
    )


def _load_checkpoint(run_dir: Path, trainer: PPOTrainer) -> int:
    """The iteration to start at (0 without a checkpoint); a corrupted one is refused."""
    path = run_dir / "checkpoint"
    if not path.exists():
        return 0
    artifacts.verify_dir(path)  # raises CorruptedDirectory: the round fails, says why
    # On the CPU first (a round may resume on another device): the trainer copies it over.
    state = torch.load(path / CHECKPOINT_STATE, weights_only=True, map_location="cpu")
    trainer.load_state_dict(state)
    log.info("resuming PPO at iteration %d from %s", state["iteration"], path)
    return int(state["iteration"])


# --- steps 5-6: gate and register --------------------------------------------------------------


def _gate_and_register(
    conn: psycopg.Connection,
    config: RoundConfig,
    record: round_records.TrainingRound,
    reward: reward_registry.RewardVersion,
    models: PolicyModels,
    evaluation: dict[str, Any],
    steps: list[dict[str, Any]],
) -> TrainingRoundResult:
    reward_version = reward.version
    summary = {
        "evaluation": evaluation,
        "reward_start": steps[0]["reward_raw"] if steps else None,
        "reward_end": steps[-1]["reward_raw"] if steps else None,
        "final_kl": steps[-1]["kl_ref"] if steps else None,
        "iterations": len(steps),
        "reward_model_version": reward_version,
        "watermark": record.watermark,
    }
    passed, verdict = gate(evaluation, config)
    reason = round_reason(record, reward, verdict)
    if not passed:
        round_records.finish_round(conn, record.id, "rejected", reason, metrics=summary)
        shutil.rmtree(_run_dir(config, record.id), ignore_errors=True)
        log.info("round %d rejected: %s", record.id, reason)
        return TrainingRoundResult(record.id, "rejected", reason, None, summary, steps)

    version = f"ppo-{record.id:04d}"
    assert config.state_dir is not None  # run_round checked it
    path = Path(config.state_dir) / POLICIES_DIR / version
    checksum = artifacts.write_dir_atomically(path, models.save_policy)
    try:
        policy_registry.register_candidate(
            conn,
            version,
            str(path.resolve()),
            actor=ACTOR,
            checksum=checksum,
            parent_version=record.parent_version,
            reward_model_version=reward_version,
            training_round=record.id,
            metrics=round_records.storable(summary),
            reason=reason,
        )
    except policy_registry.VersionExists:
        log.info("%s was already registered by an earlier run of round %d", version, record.id)
    round_records.finish_round(
        conn, record.id, "registered", reason, metrics=summary, candidate_version=version
    )
    _announce(config, record, version, str(path.resolve()), checksum, reward_version, summary)
    shutil.rmtree(_run_dir(config, record.id), ignore_errors=True)
    log.info("round %d registered %s: %s", record.id, version, reason)
    return TrainingRoundResult(record.id, "registered", reason, version, summary, steps)


def round_reason(
    record: round_records.TrainingRound, reward: reward_registry.RewardVersion, verdict: str
) -> str:
    """A round's outcome in one line: why it ran, from what, on which reward model (with
    its held-out evidence) and the gate's verdict with its numbers. Logged, and recorded
    as the round's and the candidate's reason (audit)."""
    m = reward.metrics
    evidence = ", ".join(
        f"{label} {m[key]:.3f} on {m.get(n, '?')} {unit}"
        for key, label, n, unit in (
            ("pairwise_accuracy", "pairwise accuracy", "n_pairs", "held-out pairs"),
            ("auc", "thumbs AUC", "n_labels", "held-out labels"),
        )
        if m.get(key) is not None
    )
    return (
        f"trigger: {record.trigger}; parent {record.parent_version or 'base'}; reward model "
        f"{reward.version} ({evidence or 'no held-out metrics'}); gate {verdict}"
    )


def _announce(
    config: RoundConfig,
    record: round_records.TrainingRound,
    version: str,
    uri: str,
    checksum: str,
    reward_version: str,
    summary: dict[str, Any],
) -> None:
    """The PolicyCandidate event (best effort: the registry row is the record)."""
    if not config.kafka_bootstrap:
        return
    from schemas.events import PolicyCandidate
    from trainer.rounds.announce import EventNotDelivered, publish_candidate

    event = PolicyCandidate(
        producer=f"trainer@round-{record.id}",
        version=version,
        adapter_uri=uri,
        checksum=checksum,
        parent_version=record.parent_version,
        reward_model_version=reward_version,
        training_round=record.id,
        metrics=round_records.storable(summary["evaluation"]),
    )
    started = time.monotonic()
    try:
        publish_candidate(config.kafka_bootstrap, event)
    except EventNotDelivered as exc:
        log.warning("PolicyCandidate for %s not delivered (%s); it is registered", version, exc)
    else:
        log.info("PolicyCandidate %s sent in %.2f s", version, time.monotonic() - started)
