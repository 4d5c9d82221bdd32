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
import functools
import itertools
import json
import logging
import math
import os
import shutil
import time
from array import array
from collections import Counter as Tally
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import numpy as np
import psycopg
import torch
from prometheus_client import Counter, Gauge, start_http_server

from feedback import datasets
from feedback.datasets import HashSample, PointwiseLabel, PreferencePair, Watermark
from feedback.db import connect, migrate
from schemas.events import LoggedMessage, prompt_hash
from trainer.common.progress import progress_bar
from trainer.reward import registry
from trainer.reward.config import RewardConfig
from trainer.reward.losses import (
    accuracy_bounds,
    auc,
    auc_bounds,
    pairwise_accuracy,
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
CHECKPOINT_STATE = "state.pt"

STEPS = Counter("alignloop_reward_train_steps_total", "Reward model optimizer steps taken.")
PAIRS = Counter("alignloop_reward_train_pairs_total", "Preference pairs trained on (with reuse).")
LOSS = Gauge("alignloop_reward_train_loss", "Loss of the latest reward model training step.")
PROGRESS = Gauge("alignloop_reward_train_progress", "Step / steps of the running round.")
HELDOUT = Gauge(
    "alignloop_reward_heldout_metric", "Held-out metrics of the latest candidate.", ["metric"]
)
ROUNDS = Counter("alignloop_reward_rounds_total", "Reward model rounds by outcome.", ["outcome"])


class InsufficientData(RuntimeError):
    """Too little feedback for a round; nothing was trained or registered."""


class CheckpointCorrupted(RuntimeError):
    """The run's checkpoint fails its checksums; resuming from it is refused."""


# --- data ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardData:
    """What a round trains and evaluates on, as of ``watermark``."""

    watermark: Watermark
    train_pairs: list[PreferencePair]
    heldout_pairs: list[PreferencePair]
    train_labels: list[PointwiseLabel]
    heldout_labels: list[PointwiseLabel]
    new_examples: int
    """Training examples kept that were not there at the parent's watermark (from scratch:
    all kept)."""
    replayed_examples: int
    warnings: list[str] = field(default_factory=list)
    pairs_read: int = 0
    """Pairs the snapshot holds (before the train and held-out caps)."""
    labels_read: int = 0
    """Thumbs labels the snapshot holds (before the caps)."""


def _pair_prompt_hash(pair: PreferencePair | datasets.PairRef) -> str:
    """Explicit preferences given as texts carry no hash; derive the ingestor's own."""
    if pair.prompt_hash:
        return pair.prompt_hash
    assert isinstance(pair, PreferencePair)
    return prompt_hash([LoggedMessage(**m) for m in pair.messages])


def _pair_key(pair: PreferencePair | datasets.PairRef) -> str:
    """Identity of a pair across rounds: the answers it compares (whether an explicit
    preference or two ratings put them in this order), or its texts when it names none."""
    if pair.chosen_ref and pair.rejected_ref:
        return f"{pair.chosen_ref}>{pair.rejected_ref}"
    assert isinstance(pair, PreferencePair)
    return json.dumps([pair.messages, pair.chosen, pair.rejected], sort_keys=True)


def _label_key(label: PointwiseLabel | datasets.LabelRef) -> str:
    return f"{label.response_id}:{label.choice_index}:{label.label}"


def _reward_stream(
    conn: psycopg.Connection, watermark: Watermark, config: RewardConfig
) -> Iterator[PreferencePair | datasets.PairRef | datasets.LabelRef]:
    """Explicit preferences, then per prompt its thumbs labels and its pairs from ratings,
    as refs (no texts yet): one pass over the ratings."""
    yield from datasets.explicit_pairs(conn, watermark)
    yield from datasets.rated_refs(
        conn, watermark, max_pairs_per_prompt=config.max_pairs_per_prompt, seed=config.seed
    )


class _KeyDigests:
    """Which example keys a parent round's data held, as sorted 64-bit digests: 8 bytes per
    example (a million: 8 MB) instead of the examples. A digest collision (odds about
    n^2 / 2^65) would count one new example as old."""

    def __init__(self, digests: array) -> None:
        self._sorted = np.sort(np.frombuffer(digests, dtype=np.uint64)) if digests else None

    def contains(self, keys: Sequence[str]) -> list[bool]:
        if self._sorted is None:
            return [False] * len(keys)
        wanted = np.fromiter((datasets.stable_hash(0, k) for k in keys), np.uint64, len(keys))
        at = np.minimum(np.searchsorted(self._sorted, wanted), len(self._sorted) - 1)
        return (self._sorted[at] == wanted).tolist()


def _parent_digests(
    conn: psycopg.Connection, parent: Watermark, config: RewardConfig
) -> tuple[_KeyDigests, _KeyDigests]:
    """The keys of the pairs and of the labels there were at the parent's watermark."""
    pairs, labels = array("Q"), array("Q")
    for x in _reward_stream(conn, parent, config):
        if isinstance(x, datasets.LabelRef):
            labels.append(datasets.stable_hash(0, _label_key(x)))
        else:
            pairs.append(datasets.stable_hash(0, _pair_key(x)))
    return _KeyDigests(pairs), _KeyDigests(labels)


_CHUNK = 4096


@dataclass
class _Split(Generic[T]):
    train: list[T]
    heldout: list[T]
    new: int
    replayed: int
    read: int


class _Sampler(Generic[T]):
    """Examples of one kind, offered in chunks: held out or training by prompt hash,
    training ones new or old (present at the parent's watermark, when ``old`` is given),
    each kept in a bounded seeded sample (:class:`feedback.datasets.HashSample`): at most
    ``max_heldout_examples`` held out, ``max_train_examples`` new, and a replay of
    ``replay_ratio`` old ones per new one kept. Memory: the samples, not the stream."""

    def __init__(
        self,
        prompt_hash_of: Callable[[T], str],
        key_of: Callable[[T], str],
        old: _KeyDigests | None,
        config: RewardConfig,
    ) -> None:
        self._prompt_hash_of, self._key_of, self._old = prompt_hash_of, key_of, old
        self._config = config
        self._heldout: HashSample[T] = HashSample(config.max_heldout_examples, config.seed)
        self._new: HashSample[T] = HashSample(config.max_train_examples, config.seed)
        room = math.ceil(config.replay_ratio * config.max_train_examples)
        room = room if old is not None else 0
        self._replay: HashSample[T] = HashSample(room, config.seed)

    def add(self, chunk: Sequence[T]) -> None:
        keys = [self._key_of(x) for x in chunk]
        seen = self._old.contains(keys) if self._old is not None else [False] * len(chunk)
        fraction = self._config.heldout_fraction
        for item, key, was_there in zip(chunk, keys, seen, strict=True):
            if datasets.is_heldout(self._prompt_hash_of(item), fraction):
                self._heldout.add(item, key)
            elif was_there:
                self._replay.add(item, key)
            else:
                self._new.add(item, key)

    def result(self) -> _Split[T]:
        new = self._new.items()
        replay = self._replay
        n_replay = min(replay.seen, round(self._config.replay_ratio * len(new)))  # 0: scratch
        read = self._heldout.seen + self._new.seen + replay.seen
        train = new + replay.items(limit=n_replay)
        return _Split(train, self._heldout.items(), len(new), n_replay, read)


def load_data(
    conn: psycopg.Connection,
    config: RewardConfig,
    *,
    watermark: Watermark | None = None,
    parent_watermark: Watermark | None = None,
) -> RewardData:
    """Read pairs and labels as of ``watermark`` (default: now), split and sample them.

    One pass over the ratings (:func:`feedback.datasets.rated_refs`) gives every thumbs
    label and the pairs formed from ratings (capped per prompt: ``max_pairs_per_prompt``,
    seeded by ``seed``) as refs; each kind is kept as a seeded sample of at most
    ``max_train_examples`` training and ``max_heldout_examples`` held-out examples, and
    only the sample's texts are read, so memory stays bounded however much feedback there
    is; below the caps everything is kept. With ``parent_watermark`` (a warm start) the
    training set is the examples that were not there at the parent's watermark plus
    ``replay_ratio`` times as many older ones (a second pass, as of the parent's watermark,
    remembers those as 8-byte digests).
    """
    label_kinds: Tally[str] = Tally()
    with datasets.snapshot(conn) as now:
        mark = watermark or now
        old_pairs = old_labels = None
        if parent_watermark is not None:
            old_pairs, old_labels = _parent_digests(conn, parent_watermark, config)
        pair_sampler: _Sampler[PreferencePair | datasets.PairRef] = _Sampler(
            _pair_prompt_hash, _pair_key, old_pairs, config
        )
        label_sampler: _Sampler[datasets.LabelRef] = _Sampler(
            lambda x: x.prompt_hash, _label_key, old_labels, config
        )
        stream = _reward_stream(conn, mark, config)
        while chunk := list(itertools.islice(stream, _CHUNK)):
            refs = [x for x in chunk if isinstance(x, datasets.LabelRef)]
            label_kinds.update(x.label for x in refs)
            label_sampler.add(refs)
            pair_sampler.add([x for x in chunk if not isinstance(x, datasets.LabelRef)])
        pair_refs, label_refs = pair_sampler.result(), label_sampler.result()
        # Only the sample's texts are read.
        pairs = _Split(
            datasets.pairs_for(conn, pair_refs.train),
            datasets.pairs_for(conn, pair_refs.heldout),
            pair_refs.new,
            pair_refs.replayed,
            pair_refs.read,
        )
        labels = _Split(
            datasets.labels_for(conn, label_refs.train),
            datasets.labels_for(conn, label_refs.heldout),
            label_refs.new,
            label_refs.replayed,
            label_refs.read,
        )

    warnings = []
    if len(label_kinds) == 1:
        only = next(iter(label_kinds))
        warnings.append(
            f"all {labels.read} thumbs are {only}: they train pointwise only (no rated pairs "
            "can form), pairs come only from explicit preferences, thumbs AUC is undefined"
        )
    kept_pairs = len(pairs.train) + len(pairs.heldout)
    kept_labels = len(labels.train) + len(labels.heldout)
    if (kept_pairs, kept_labels) != (pairs.read, labels.read):
        log.info(
            "kept a seeded sample (max_train_examples, max_heldout_examples, replay): "
            "%d of %d pairs, %d of %d thumbs labels",
            kept_pairs,
            pairs.read,
            kept_labels,
            labels.read,
        )
    return RewardData(
        mark,
        pairs.train,
        pairs.heldout,
        labels.train,
        labels.heldout,
        pairs.new + labels.new,
        pairs.replayed + labels.replayed,
        warnings,
        pairs.read,
        labels.read,
    )


def check_enough(data: RewardData, config: RewardConfig) -> None:
    """Raise :class:`InsufficientData` with what is missing, if anything is."""
    train = len(data.train_pairs) + len(data.train_labels)
    heldout = len(data.heldout_pairs) + len(data.heldout_labels)
    problems = []
    if data.new_examples == 0:
        problems.append("no new feedback since the current version")
    if train < config.min_train_examples:
        problems.append(
            f"{train} training examples (pairs + thumbs), need {config.min_train_examples}"
        )
    if heldout < config.min_heldout_examples:
        problems.append(
            f"{heldout} held-out examples (pairs + thumbs), need {config.min_heldout_examples}"
        )
    if config.pointwise_weight == 0 and not data.train_pairs:
        problems.append("no training pairs and pointwise_weight is 0")
    if problems:
        raise InsufficientData(
            "not enough feedback for a reward model round (watermark "
            f"{data.watermark}): " + "; ".join(problems) + ". No new version was made."
        )


@functools.lru_cache(maxsize=64)
def _permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=generator).tolist())


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of step ``step``'s batch: positions ``step*batch_size ...`` of an endless
    stream of seeded per-epoch permutations. A pure function, so resuming needs no state."""
    if n == 0:
        return []
    start = step * batch_size
    return [_permutation(n, seed, p // n)[p % n] for p in range(start, start + batch_size)]


# --- evaluation and the gate -------------------------------------------------------------


def _stats(values: torch.Tensor) -> dict[str, float | int | None]:
    if values.numel() == 0:
        return {"n": 0, "mean": None, "std": None}
    std = float(values.std()) if values.numel() > 1 else 0.0
    return {"n": values.numel(), "mean": round(float(values.mean()), 4), "std": round(std, 4)}


def evaluate(
    model: RewardModel, pairs: Sequence[PreferencePair], labels: Sequence[PointwiseLabel]
) -> dict[str, Any]:
    """Held-out metrics: pairwise accuracy, thumbs AUC, reward mean/std per label."""
    model.train(False)
    r_chosen = model.score([p.messages for p in pairs], [p.chosen for p in pairs])
    r_rejected = model.score([p.messages for p in pairs], [p.rejected for p in pairs])
    r_labeled = model.score([x.messages for x in labels], [x.answer for x in labels])
    y = torch.tensor([1 if x.label == "up" else 0 for x in labels], dtype=torch.long)
    accuracy = pairwise_accuracy(r_chosen, r_rejected)
    thumbs_auc = auc(r_labeled, y)
    return {
        "pairwise_accuracy": None if accuracy is None else round(accuracy, 4),
        "n_pairs": len(pairs),
        "auc": None if thumbs_auc is None else round(thumbs_auc, 4),
        "n_labels": len(labels),
        "n_up": int(y.sum()),
        "reward": {
            "up": _stats(r_labeled[y == 1]),
            "down": _stats(r_labeled[y == 0]),
            "chosen": _stats(r_chosen),
            "rejected": _stats(r_rejected),
        },
    }


def gate(
    metrics: dict[str, Any],
    parent_metrics: dict[str, Any] | None,
    config: RewardConfig,
    parent_version: str | None = None,
) -> tuple[bool, str]:
    """Accept or reject a candidate; the reason is recorded either way.

    Live labels are noisy and a round's held-out sample can be small, so each held-out
    metric is judged with its confidence bounds (:func:`_bounds`): the version is accepted
    when at least one metric is shown better than chance (lower bound > 0.5), no metric is
    shown below its bar (upper bound < bar), and it does not trail the current version on
    the same held-out data by more than the tolerance."""
    bounds = _bounds(metrics, config.gate_confidence)
    if not bounds:
        return False, "no held-out pairs and no two-sided thumbs: nothing to evaluate on"
    problems = []
    bars = {"pairwise_accuracy": config.min_pairwise_accuracy, "auc": config.min_auc}
    for name, (_, upper) in bounds.items():
        if upper < bars[name]:
            problems.append(
                f"held-out {_LABEL[name]} {metrics[name]:.4f} < bar {bars[name]} "
                f"(upper bound {upper:.4f})"
            )
    if not problems and all(lower <= 0.5 for lower, _ in bounds.values()):
        problems.append(
            "not shown better than chance: "
            + ", ".join(
                f"{_LABEL[name]} {metrics[name]:.4f} on {_sample(metrics, name)} "
                f"({config.gate_confidence:.0%} lower bound {lower:.4f} <= 0.5)"
                for name, (lower, _) in bounds.items()
            )
        )
    if parent_metrics is not None:
        for name in ("pairwise_accuracy", "auc"):
            new, old = metrics.get(name), parent_metrics.get(name)
            if new is not None and old is not None and new < old - config.regression_tolerance:
                problems.append(
                    f"held-out {name} {new:.4f} is worse than {parent_version}'s {old:.4f} on "
                    f"the same data by more than {config.regression_tolerance}"
                )
    if problems:
        return False, "; ".join(problems)
    summary = ", ".join(
        f"{name} {metrics[name]:.4f} on {_sample(metrics, name)} (lower bound {lower:.4f})"
        for name, (lower, _) in bounds.items()
    )
    against = f" (current was {parent_version})" if parent_version else ""
    return True, f"passed the gate: {summary}{against}"


_LABEL = {"pairwise_accuracy": "pairwise accuracy", "auc": "thumbs AUC"}


def _sample(metrics: dict[str, Any], name: str) -> str:
    if name == "pairwise_accuracy":
        return f"{metrics.get('n_pairs', '?')} pairs"
    return f"{metrics.get('n_labels', '?')} labels"


def _bounds(metrics: dict[str, Any], confidence: float) -> dict[str, tuple[float, float]]:
    """(lower, upper) confidence bounds of each held-out metric that was measured. Metrics
    recorded without their sample sizes (older versions) count as exact."""
    bounds = {}
    accuracy, thumbs_auc = metrics.get("pairwise_accuracy"), metrics.get("auc")
    if accuracy is not None:
        bounds["pairwise_accuracy"] = (
            accuracy_bounds(accuracy, metrics["n_pairs"], confidence)
            if "n_pairs" in metrics
            else (accuracy, accuracy)
        )
    if thumbs_auc is not None:
        n_up = metrics.get("n_up")
        bounds["auc"] = (
            auc_bounds(thumbs_auc, n_up, metrics["n_labels"] - n_up, confidence)
            if n_up is not None
            else (thumbs_auc, thumbs_auc)
        )
    return bounds


# --- checkpoints -------------------------------------------------------------------------


def _checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (hidden temporaries are not listed)."""
    return sorted((run_dir / "checkpoints").glob("step-*"))


def save_checkpoint(
    run_dir: Path, model: RewardModel, optimizer: torch.optim.Optimizer, step: int, seed: int
) -> Path:
    """Write ``step-NNNNNN`` atomically (manifest included), then drop older ones."""
    target = run_dir / "checkpoints" / f"step-{step:06d}"
    state = {
        "step": step,
        "seed": seed,
        "trainable": model.trainable_state(),
        "optimizer": optimizer.state_dict(),
    }
    registry.write_dir_atomically(target, lambda d: torch.save(state, d / CHECKPOINT_STATE))
    for older in _checkpoints(run_dir):
        if older != target:
            shutil.rmtree(older, ignore_errors=True)
    return target


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The saved state, after checking the manifest; a mismatch is refused."""
    try:
        registry.verify_dir(path)
    except registry.CorruptedDirectory as exc:
        raise CheckpointCorrupted(
            f"checkpoint {path} is corrupted ({exc}); refusing to resume from it. "
            "Delete it, or start over with --fresh."
        ) from exc
    return torch.load(path / CHECKPOINT_STATE, weights_only=True)


# --- the round ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundResult:
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
    """The base (loaded once) and the reward models built on it for one round."""

    def __init__(self, config: RewardConfig) -> None:
        self.config = config
        self.base = None
        self.tokenizer = None
        if not config.seq_cls_model:
            self.base, self.tokenizer = load_base_model(Path(config.base_model))

    def parent(self, record: registry.RewardVersion, adapter_name: str) -> RewardModel:
        """The registered version ``record``, on the shared base when it fits there."""
        path = registry.verified_path(record)
        shared = self.base is not None and record.base_model == str(self.config.base_model)
        if record.kind == "lora" and shared:
            model = attach_reward_model(self.base, self.tokenizer, path, adapter_name=adapter_name)
            self.base = model.peft_model
            return model
        return load_reward_model(path)

    def candidate(self, record: registry.RewardVersion | None) -> RewardModel:
        """Warm-started from ``record``, or freshly initialised."""
        config = self.config
        if config.seq_cls_model:
            source = registry.verified_path(record) if record else Path(config.seq_cls_model)
            return load_seq_cls_model(source, config.max_length)
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
            )
            self.base = model.peft_model
        model.max_length = config.max_length
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


def train_reward_model(config: RewardConfig, conn: psycopg.Connection | None = None) -> RoundResult:
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
            return _round(conn, config)
    finally:
        if own_conn:
            conn.close()


def _round(conn: psycopg.Connection, config: RewardConfig) -> RoundResult:
    started = time.monotonic()
    state_dir = Path(config.state_dir)  # type: ignore[arg-type]
    run_dir = state_dir / RUN_DIR_NAME
    parent = registry.current_version(conn)
    warm = _can_warm_start(config, parent)

    record = None if config.fresh else _run_record(run_dir)
    if record is not None and (
        record["fingerprint"] != config.fingerprint()
        or record["parent_version"] != (parent.version if parent else None)
    ):
        log.warning("an unfinished run with another configuration or parent: starting over")
        record = None
    if record is None:
        shutil.rmtree(run_dir, ignore_errors=True)

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

    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    start_step = 0
    checkpoints = _checkpoints(run_dir)
    if checkpoints:
        state = load_checkpoint(checkpoints[-1])
        model.load_trainable_state(state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
        log.info("resuming reward model training at step %d", start_step)

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
        return RoundResult("stopped", None, None, parent_metrics, reason, data.warnings, stats)

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
        config={**config.to_json(), "database_url": None},
        train_stats=stats,
    )
    shutil.rmtree(run_dir, ignore_errors=True)
    outcome: Literal["registered", "rejected"] = "registered" if accepted else "rejected"
    ROUNDS.labels(outcome).inc()
    return RoundResult(outcome, version, metrics, parent_metrics, reason, data.warnings, stats)


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
            y = torch.tensor([1.0 if x.label == "up" else 0.0 for x in label_batch])
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
