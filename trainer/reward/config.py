"""Configuration of a reward model training round: one dataclass, documented field by field.

Like TRL's ``RewardConfig``, every knob of :mod:`trainer.reward.trainer` lives here, and the
``alignloop train reward`` command line is generated from it (``--steps 200``,
``--no-warm-start``, ...), so the documentation of a flag is the ``help`` below. Fields that
say where things are (database, state directory, base model) default to ``None`` and are
filled from :class:`schemas.settings.Settings` by the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from schemas.config import DeviceConfig


@dataclass
class RewardConfig(DeviceConfig):
    """Everything that determines a reward model training round (and where it keeps things;
    ``device`` from :class:`schemas.config.DeviceConfig`)."""

    SECRETS: ClassVar[tuple[str, ...]] = ("database_url",)
    # A checkpoint written under other values of the rest cannot be resumed: where things
    # are, the gate's bars, how the run is watched or time-boxed, and the rules (applied by
    # PPO, not trained) do not change what the run computes.
    UNFINGERPRINTED: ClassVar[tuple[str, ...]] = (
        "state_dir",
        "num_threads",
        "min_train_examples",
        "min_heldout_examples",
        "min_pairwise_accuracy",
        "min_auc",
        "gate_confidence",
        "regression_tolerance",
        "checkpoint_every",
        "fresh",
        "stop_after_steps",
        "metrics_port",
        "progress",
        "rules",
    )

    # --- where things are ----------------------------------------------------------------
    database_url: str | None = field(
        default=None,
        metadata={"help": "Postgres with the feedback tables. Unset: ALIGNLOOP_DATABASE_URL."},
    )
    state_dir: Path | None = field(
        default=None,
        metadata={
            "help": "Versions go to STATE_DIR/reward_models/<version>, the resumable run to "
            "STATE_DIR/reward_runs/active. Unset: ALIGNLOOP_STATE_DIR."
        },
    )
    base_model: Path | None = field(
        default=None,
        metadata={
            "help": "The frozen causal LM the reward adapter sits on (the policy's base). "
            "Unset: ALIGNLOOP_BASE_MODEL or the demo model."
        },
    )
    seq_cls_model: Path | None = field(
        default=None,
        metadata={
            "help": "Instead of an adapter on the base, fine-tune this Hugging Face "
            "sequence-classification directory (num_labels=1) as a separate model. "
            "PPO then holds it beside the base."
        },
    )

    # --- the model -------------------------------------------------------------------------
    lora_r: int = field(default=8, metadata={"help": "LoRA rank of the reward adapter."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator."})
    lora_target_modules: str = field(
        default="auto",
        metadata={
            "help": "Modules the adapter wraps: 'auto' (the model's transformer-body linear "
            "layers, what vLLM serves LoRA on), 'all-linear' (PEFT's rule) or a comma list."
        },
    )
    max_length: int = field(
        default=256,
        metadata={
            "help": "Tokens scored per conversation; longer ones lose their beginning "
            "(the answer, at the end, is what is judged)."
        },
    )

    # --- optimisation ----------------------------------------------------------------------
    steps: int = field(default=150, metadata={"help": "Optimizer steps of a round."})
    batch_size: int = field(
        default=16, metadata={"help": "Preference pairs and thumbs labels per step (each)."}
    )
    lr: float = field(default=2e-3, metadata={"help": "AdamW learning rate (adapter + head)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    pointwise_weight: float = field(
        default=0.5,
        metadata={
            "help": "Weight of the logistic loss on thumbs labels beside the Bradley-Terry "
            "loss on pairs; 0 trains on pairs only."
        },
    )
    seed: int = field(
        default=0,
        metadata={"help": "Seeds initialisation, data order and replay sampling."},
    )
    num_threads: int = field(
        default=1,
        metadata={
            "help": "Torch intra-op threads. Fixed, so a resumed run sums floats in the same "
            "order as an uninterrupted one; 1 by default because a small model's matrices "
            "gain little from more and lose much when other processes share the cores."
        },
    )

    # --- data ------------------------------------------------------------------------------
    heldout_fraction: float = field(
        default=0.2,
        metadata={
            "help": "Share of prompts (by prompt hash, so stable across rounds) kept out of "
            "training for evaluation."
        },
    )
    warm_start: bool = field(
        default=True,
        metadata={
            "help": "Continue from the current version's adapter and head, training on the "
            "feedback that arrived since it plus a replay of older feedback. "
            "--no-warm-start retrains from scratch on everything."
        },
    )
    replay_ratio: float = field(
        default=1.0,
        metadata={
            "help": "Warm start: older training examples replayed per new one (sampled "
            "without replacement), so the model does not forget what it knew."
        },
    )
    max_pairs_per_prompt: int = field(
        default=16,
        metadata={
            "help": "Pairs formed from thumbs per prompt at most: a prompt's up- and "
            "down-rated answers are sampled (seeded) and paired evenly, never all against "
            "all, so a popular prompt cannot swamp the data (see "
            "feedback.datasets.preference_pairs); 0 pairs explicit preferences only."
        },
    )
    max_principal_share: float = field(
        default=0.5,
        metadata={
            "help": "No API key's rated answers make up more than this share of the thumbs "
            "data: a key over it keeps a seeded sample of its answers (feedback/"
            "principal_weights.py), so one flooding key cannot train the reward model alone. "
            "1 = no cap; with one key (the demo) nothing is capped."
        },
    )
    max_train_examples: int = field(
        default=20_000,
        metadata={
            "help": "Training pairs, and separately thumbs labels, a round keeps at most: a "
            "seeded sample of what the snapshot holds (new ones first on a warm start; the "
            "replay comes on top), so a round's memory does not grow with the feedback."
        },
    )
    max_heldout_examples: int = field(
        default=2_000,
        metadata={
            "help": "Held-out pairs, and separately thumbs labels, evaluated at most (a "
            "seeded sample, the same for the candidate and the current version)."
        },
    )
    min_train_examples: int = field(
        default=32,
        metadata={"help": "Fewer training pairs + labels than this: no round, no version."},
    )
    min_heldout_examples: int = field(
        default=8,
        metadata={"help": "Fewer held-out pairs + labels than this: no round, no version."},
    )

    # --- the version gate ------------------------------------------------------------------
    min_pairwise_accuracy: float = field(
        default=0.55,
        metadata={
            "help": "A new version is rejected when its held-out pairwise accuracy is shown "
            "below this (its upper confidence bound is). Live labels are noisy (two users "
            "disagree on one answer), so even a perfect model stays well below 1."
        },
    )
    min_auc: float = field(
        default=0.55,
        metadata={"help": "Likewise for the held-out thumbs AUC (when both labels occur)."},
    )
    gate_confidence: float = field(
        default=0.95,
        metadata={
            "help": "Level of the one-sided confidence bounds of the held-out metrics (Wilson "
            "for the pairwise accuracy, Hanley-McNeil for the AUC). A new version must be "
            "shown better than chance (some metric's lower bound > 0.5) and not shown below "
            "a bar: evidence, not a lucky few pairs."
        },
    )
    regression_tolerance: float = field(
        default=0.02,
        metadata={
            "help": "A new version may trail the current one on the same held-out data by "
            "at most this much (pairwise accuracy and AUC)."
        },
    )

    # --- running ---------------------------------------------------------------------------
    checkpoint_every: int = field(
        default=25,
        metadata={"help": "Steps between resumable checkpoints (0: none)."},
    )
    fresh: bool = field(
        default=False,
        metadata={"help": "Discard an unfinished run's checkpoints instead of resuming it."},
    )
    stop_after_steps: int | None = field(
        default=None,
        metadata={
            "help": "Time-box: stop after this many steps of this invocation, leaving a "
            "checkpoint the next invocation resumes from."
        },
    )
    metrics_port: int = field(
        default=0, metadata={"help": "Serve Prometheus /metrics on this port (0: off)."}
    )
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})
    rules: list[dict[str, Any]] = field(
        default_factory=list,
        metadata={
            "help": "Rule-based reward terms PPO adds to the model's score, e.g. "
            '[{"name": "length_penalty", "weight": 1.0, "max_words": 30}] '
            "(see trainer.reward.rules). Stored with each version."
        },
    )

    def checks(self) -> list[tuple[bool, str, str]]:
        at_least_one = ("lora_r", "max_length", "steps", "batch_size")
        return [
            *((getattr(self, n) >= 1, n, "must be at least 1") for n in at_least_one),
            (self.lr > 0, "lr", "must be > 0"),
            (0 < self.heldout_fraction < 1, "heldout_fraction", "must be in (0, 1)"),
            (0 < self.gate_confidence < 1, "gate_confidence", "must be in (0, 1)"),
            (self.replay_ratio >= 0, "replay_ratio", "must be >= 0"),
            (self.max_pairs_per_prompt >= 0, "max_pairs_per_prompt", "must be >= 0"),
            (0 < self.max_principal_share <= 1, "max_principal_share", "must be in (0, 1]"),
            (self.num_threads >= 0, "num_threads", "must be >= 0"),
        ]
