"""Configuration of a training round (reward update -> PPO -> evaluation -> gate -> register).

The PPO algorithm's own knobs are :class:`trainer.ppo.config.PPOConfig` (field ``ppo``);
this dataclass holds the rest of a round: where things are, how many iterations, which
prompts, which models, how the rollout engine runs, when to abort and which gates a
candidate must pass. Fields that say where things are default to ``None`` and are filled
from :class:`schemas.settings.Settings` by the CLI. ``alignloop train ppo --help`` lists
every field of both as a flag, with the help text below.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from schemas.config import ConfigBase
from trainer.ppo.config import CriticKind, PPOConfig, VllmDtype

RolloutBackend = Literal["auto", "vllm", "hf"]
CriticInit = Literal["reward", "fresh"]


@dataclass
class RoundConfig(ConfigBase):
    """Everything about a training round except the PPO math (see module docstring)."""

    SECRETS: ClassVar[tuple[str, ...]] = ("database_url",)
    UNFINGERPRINTED: ClassVar[tuple[str, ...]] = (
        "kafka_bootstrap",
        "stop_after_iterations",
        "progress",
        "metrics_port",
        "num_threads",
        "vllm_gpu_memory_utilization",
    )

    # --- where things are ----------------------------------------------------------------
    database_url: str | None = field(
        default=None, metadata={"help": "Postgres. Unset: ALIGNLOOP_DATABASE_URL."}
    )
    state_dir: Path | None = field(
        default=None,
        metadata={
            "help": "Candidates go to STATE_DIR/policies/<version>, the resumable round to "
            "STATE_DIR/ppo_runs/round-<id>. Unset: ALIGNLOOP_STATE_DIR."
        },
    )
    base_model: Path | None = field(
        default=None,
        metadata={"help": "The frozen base (SFT = reference). Unset: ALIGNLOOP_BASE_MODEL."},
    )
    kafka_bootstrap: str | None = field(
        default=None,
        metadata={
            "help": "Where the PolicyCandidate event goes (alignloop.policy). Unset: "
            "ALIGNLOOP_KAFKA_BOOTSTRAP; empty: no event (the registry row is the record)."
        },
    )

    # --- the round ---------------------------------------------------------------------------
    iterations: int = field(
        default=20,
        metadata={"help": "PPO iterations (rollout + update) per round (K)."},
    )
    update_reward_model: bool = field(
        default=True,
        metadata={
            "help": "Start the round with a reward model round (alignloop train reward) on the "
            "same feedback; with too little new feedback the current version is used."
        },
    )
    prompt_pool: int = field(
        default=2000,
        metadata={"help": "Distinct recent prompts drawn from logged traffic per round."},
    )
    heldout_fraction: float = field(
        default=0.1,
        metadata={"help": "Share of prompts (by prompt hash) kept for the offline evaluation."},
    )
    min_train_prompts: int = field(
        default=16, metadata={"help": "Fewer distinct training prompts: the round fails."}
    )
    min_eval_prompts: int = field(
        default=8, metadata={"help": "Fewer held-out prompts: the round fails."}
    )
    eval_prompts: int = field(
        default=128, metadata={"help": "At most this many held-out prompts are evaluated."}
    )
    max_prompt_tokens: int = field(
        default=384,
        metadata={"help": "Longer prompts are left out (prompt + answer must fit the model)."},
    )

    # --- models ------------------------------------------------------------------------------
    lora_r: int = field(
        default=8,
        metadata={"help": "LoRA rank of a fresh policy adapter (<= serving's max LoRA rank)."},
    )
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator."})
    lora_target_modules: str = field(
        default="auto",
        metadata={
            "help": "Modules the policy adapter wraps: 'auto' (the model's transformer-body "
            "linear layers, what vLLM serves LoRA on), 'all-linear' or a comma list."
        },
    )
    critic_init: CriticInit = field(
        default="reward",
        metadata={
            "help": "With critic='adapter': 'reward', the critic starts as the reward model's "
            "adapter and head (InstructGPT C.4); 'fresh', a new adapter and a zero value head."
        },
    )
    critic: CriticKind = field(
        default="shared",
        metadata={
            "help": "The critic's trunk: 'shared' (a value head on the actor's trunk: one "
            "backbone pass gives log-probs and values; the value loss trains the head alone, "
            "which starts at zero) or 'adapter' (its own "
            "LoRA on the base, initialised by critic_init: a second backbone pass in scoring "
            "and in every update). Shared: 2.3x the episodes/s on the demo model and 1.7x at "
            "31M parameters (docs/benchmarks.md, PPO at scale)."
        },
    )
    rules: list[dict[str, Any]] | None = field(
        default=None,
        metadata={
            "help": "Rule terms added to the reward model score (trainer/reward/rules.py). "
            "Unset: the rules of the reward model version's own configuration."
        },
    )

    # --- rollout engine ---------------------------------------------------------------------
    rollout_backend: RolloutBackend = field(
        default="auto",
        metadata={
            "help": "'vllm': a vLLM engine with the actor hot-loaded as a LoRA adapter; "
            "'hf': a decode loop on the training model (transformers; bit-reproducible); "
            "'auto': vllm when the models train on a GPU (ppo's device), hf on CPU (why: "
            "docs/benchmarks.md, rollouts on CPU)."
        },
    )
    vllm_dtype: VllmDtype = field(
        default="auto", metadata={"help": "Rollout engine dtype; auto = bfloat16 on CPU."}
    )
    sync_timeout_s: float = field(
        default=60.0,
        metadata={"help": "Writing + loading the actor's adapter into vLLM must take less."},
    )
    vllm_kv_cache_mib: int = field(
        default=256,
        metadata={
            "help": "CPU: the rollout engine's KV cache in MiB; it must hold a rollout batch "
            "(rows x (prompt + answer) tokens)."
        },
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3,
        metadata={
            "help": "GPU: the rollout engine's share of the GPU's memory (vLLM's "
            "gpu_memory_utilization: weights, then KV cache, taken at start-up); serving's "
            "engine and the trainer need the rest (`alignloop up` splits one GPU: "
            "deploy/local/gpu_plan.py)."
        },
    )
    vllm_engine_cpus: int = field(
        default=0,
        metadata={
            "help": "CPU: cores for the rollout engine; the trainer keeps the others, so "
            "generation and scoring run side by side. 0 = half of them (none pinned on one)."
        },
    )

    # --- safety ------------------------------------------------------------------------------
    abort_kl: float = field(
        default=30.0,
        metadata={
            "help": "Abort the round (recorded, nothing registered) when the mean sequence KL "
            "to the reference exceeds this many nats: the policy ran away."
        },
    )

    # --- gates a candidate must pass (offline evaluation on held-out prompts) -------------
    gate_min_win_rate: float = field(
        default=0.5,
        metadata={
            "help": "Share of held-out prompts where the reward prefers the candidate's answer "
            "to the stable policy's (ties count half) must be at least this."
        },
    )
    gate_max_kl: float = field(
        default=10.0,
        metadata={"help": "Mean sequence KL (nats) of the candidate to the reference, at most."},
    )
    gate_min_distinct_ratio: float = field(
        default=0.8,
        metadata={"help": "Candidate distinct-2 / stable distinct-2 at least this (no collapse)."},
    )

    # --- running ------------------------------------------------------------------------------
    num_threads: int = field(
        default=0,
        metadata={
            "help": "torch threads of the training process; 0 = one per core this process "
            "may use (its CPU affinity: `alignloop up` gives the trainer its own cores)."
        },
    )
    stop_after_iterations: int | None = field(
        default=None,
        metadata={"help": "Stop (resumably) after this many iterations in this run."},
    )
    progress: bool = field(default=True, metadata={"help": "Show a progress display."})
    metrics_port: int = field(
        default=0, metadata={"help": "Serve /metrics on this port while training; 0 = off."}
    )
    ppo: PPOConfig = field(
        default_factory=PPOConfig, metadata={"help": "The PPO algorithm (its own flags)."}
    )

    def __post_init__(self) -> None:
        if isinstance(self.ppo, dict):  # from a stored run record or JSON
            self.ppo = PPOConfig(**self.ppo)
        super().__post_init__()

    def checks(self) -> list[tuple[bool, str, str]]:
        return [
            (self.iterations >= 1, "iterations", "must be at least 1"),
            (0 < self.heldout_fraction < 1, "heldout_fraction", "must be in (0, 1)"),
            (0 <= self.gate_min_win_rate <= 1, "gate_min_win_rate", "must be in [0, 1]"),
            (self.abort_kl > 0 and self.gate_max_kl > 0, "abort_kl", "KL bounds must be > 0"),
            (self.sync_timeout_s > 0, "sync_timeout_s", "must be > 0"),
            (self.vllm_kv_cache_mib >= 16, "vllm_kv_cache_mib", "must be at least 16"),
            (
                0 < self.vllm_gpu_memory_utilization < 1,
                "vllm_gpu_memory_utilization",
                "must be in (0, 1)",
            ),
            (self.vllm_engine_cpus >= 0, "vllm_engine_cpus", "must be >= 0 (0 = half)"),
            (self.num_threads >= 0, "num_threads", "must be >= 0 (0 = one per core)"),
        ]

    def torch_threads(self) -> int:
        """``num_threads`` with 0 resolved to the cores this process may run on."""
        return self.num_threads or len(os.sched_getaffinity(0))

    @property
    def rollouts(self) -> str:
        """The rollout backend this machine uses: ``rollout_backend`` with ``auto`` decided
        (vLLM when the models train on a GPU)."""
        if self.rollout_backend != "auto":
            return self.rollout_backend
        from trainer.common.device import resolve_device

        return "vllm" if resolve_device(self.ppo.device).type == "cuda" else "hf"
