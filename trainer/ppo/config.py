"""Configuration of a PPO round: one dataclass, documented field by field.

Like TRL's ``PPOConfig``, every knob of the PPO loop lives here with what it does, its
default and where the default comes from. The math it parameterises is in
:mod:`trainer.ppo.core`. Sources:

* InstructGPT: Ouyang et al. 2022, "Training language models to follow instructions with
  human feedback", appendix C.4 (PPO details).
* PPO-max: Zheng et al. 2023, "Secrets of RLHF in Large Language Models Part I: PPO",
  section 5.3.
* Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences" (adaptive KL).
* Schulman et al. 2017 (PPO), 2016 (GAE); Schulman 2020, "Approximating KL divergence".
* CleanRL: Huang et al. 2022, "The 37 Implementation Details of Proximal Policy
  Optimization".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from schemas.config import DeviceConfig

if TYPE_CHECKING:  # not at run time: a config is data, and parsing one needs no torch
    from trainer.ppo.core import AdaptiveKLController, FixedKLController

KLEstimator = Literal["k1", "k3"]
"""The per-token KL estimator of the penalty (:func:`trainer.ppo.core.kl_penalty`)."""
KLMode = Literal["adaptive", "fixed"]
RecomputeLogprobs = Literal["auto", "always"]
CriticKind = Literal["adapter", "shared"]
"""The critic's trunk (:mod:`trainer.ppo.models`): its own LoRA adapter on the base, or the
actor's trunk shared (one backbone pass for both)."""
VllmDtype = Literal["auto", "half", "float16", "bfloat16", "float", "float32"]
"""The dtypes vLLM's engine accepts (its ``ModelDType``), for the rollout engine
(:mod:`trainer.ppo.rollout.vllm`)."""


@dataclass
class PPOConfig(DeviceConfig):
    """Everything that determines the algorithm of a PPO round (not where things are),
    and the device it trains on (``device``, from :class:`schemas.config.DeviceConfig`)."""

    # --- rollout -----------------------------------------------------------------------------
    rollout_batch_size: int = field(
        default=512,
        metadata={
            "help": "Prompts (one response each) sampled per PPO iteration, before the "
            "update. Default 512 (InstructGPT C.4: batch size 512)."
        },
    )
    max_new_tokens: int = field(
        default=64,
        metadata={
            "help": "Longest response sampled in a rollout; a response cut here gets its score "
            "on its last token like any other. Default 64 (the demo model's answers are short)."
        },
    )
    temperature: float = field(
        default=1.0,
        metadata={
            "help": "Sampling temperature of rollouts; log-probs are computed at the same "
            "temperature (trainer.ppo.core.logprobs_from_logits). Default 1.0 (InstructGPT "
            "C.4)."
        },
    )
    seed: int = field(
        default=0, metadata={"help": "Seeds sampling, mini-batch shuffling and initialisation."}
    )
    recompute_logprobs: RecomputeLogprobs = field(
        default="auto",
        metadata={
            "help": "'always': the training model recomputes the actor's log-probs (and a "
            "shared critic's values) of every rollout. 'auto': only where the sampler is "
            "another engine or another precision; a sampler that is the training model "
            "itself in float32 (the hf decode loop on the CPU) computed them with the same "
            "weights, equal up to rounding (trainer.ppo.rollout.base), so that pass is saved; "
            "in another precision, only once an iteration measured the gap below "
            "sampler_logprob_tolerance on the update's first mini-batch."
        },
    )
    sampler_logprob_tolerance: float = field(
        default=0.01,
        metadata={
            "help": "'auto' with a sampler that is the training model under bfloat16 "
            "autocast (a decode step and a full pass round differently): the first iteration "
            "recomputes the actor's log-probs of the update's first mini-batch only and "
            "measures their mean absolute gap per token to the sampler's, taking the "
            "sampler's for the other rows; below this many nats, this and later iterations "
            "keep the sampler's own, else the other rows are recomputed too, and so are "
            "later iterations'. Default 0.01: a ratio within 1 % of exact, far "
            "inside the clip range "
            '(measured gaps per model: docs/benchmarks.md, "Attention in float32 on the '
            'CPU").'
        },
    )
    first_mini_batch_from_update: bool = field(
        default=True,
        metadata={
            "help": "Where the actor's log-probs are recomputed, those of the first mini-batch "
            "of the update (and its critic values) are read off that mini-batch's own forward "
            "in the update, made before any optimizer step with the weights that sampled, "
            "instead of a scoring pass of their own: one actor pass over mini_batch_size rows "
            "fewer per iteration, and the first step's ratios exactly 1. Taken where the "
            "mini-batch is one micro-batch (its graph is then the only one held while "
            "advantages are computed), on one process and without PPO-ptx, and not in the "
            "iteration that measures the sampler's gap (recompute_logprobs 'auto': it scores "
            "that mini-batch before the update, so that where the gap is too large the other "
            "rows' pass runs while no graph is held). Measured: docs/benchmarks.md, "
            '"The first mini-batch scored by its own update forward".'
        },
    )

    # --- optimisation ------------------------------------------------------------------------
    mini_batch_size: int = field(
        default=64,
        metadata={
            "help": "Rollouts per gradient step; must divide rollout_batch_size. Default 64 "
            "(InstructGPT C.4: each batch split into 8 minibatches of 64)."
        },
    )
    micro_batch_size: int = field(
        default=16,
        metadata={
            "help": "Rows per forward/backward pass (an implementation detail, not a "
            "hyperparameter: the gradient is the mini-batch's). A mini-batch's rows are "
            "sorted by length and cut into micro-batches, so short rows are not padded to the "
            "longest; each micro-batch's loss is weighted by its share of the mini-batch's "
            "tokens (gradient accumulation). Rollouts are scored (no gradient) as they finish, "
            "once twice this many are ready, up to mini_batch_size rows a pass. Default 16, "
            "faster than 8 or 32 for the demo model on 2 CPU cores (measured: "
            "docs/benchmarks.md, figures quoted in code)."
        },
    )
    activation_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Keep only each decoder layer's input for the backward and run the layer "
            "again during it (trainer.common.activation_checkpointing): the update's peak "
            "memory holds one layer's activations instead of every layer's, for one more "
            "forward pass per micro-batch. Off by default (the faster update); on where "
            'memory, not time, is short (measured: docs/benchmarks.md, "jemalloc and '
            'activation checkpointing: both PPO targets at 31 M"). Changes no gradient.'
        },
    )
    checkpoint_every: int = field(
        default=1,
        metadata={
            "help": "With activation_checkpointing: checkpoint the first decoder layer and "
            "every n-th one after it. 1 checkpoints them all (the least memory); 2 every "
            "other one: half the replayed forward for about half the activations saved. A "
            "round's peak is the larger of the update's and the decode loop's (its KV cache "
            "and folded weights), so where the update's is well below, a larger n buys speed "
            "for little peak (measured at 31 M: about a fifth more episodes/s for 4 % more "
            'peak; docs/benchmarks.md, "Checkpointing every other layer, on an AMX machine").'
        },
    )
    shared_prefix_min_tokens: int = field(
        default=8,
        metadata={
            "help": "Where every row of a scoring or update pass begins with the same prompt "
            "tokens, at least this many (a chat template's system prompt: SmolLM2's default "
            "one is 24 tokens), the backbone runs them once, as one row, and the rest of "
            "each row against their keys and values (trainer.common.shared_prefix): the same "
            "numbers up to rounding, and the same gradients (the prefix's is the sum over "
            "its rows). 0 runs every row whole. Default 8: below that the extra pass costs "
            "about what it saves on a small model. The decode loop's prefill shares it too: "
            "the prefix runs once into the KV cache, which every row then starts from."
        },
    )
    ppo_epochs: int = field(
        default=1,
        metadata={
            "help": "Passes over a rollout batch per iteration. Default 1 (InstructGPT C.4: a "
            "single inner epoch)."
        },
    )
    actor_lr: float = field(
        default=1e-5,
        metadata={
            "help": "AdamW learning rate of the policy adapter. Default 1e-5, a LoRA-adapter "
            "rate: adapters need higher rates than the full-weight fine-tuning rates of "
            "InstructGPT and PPO-max (constant after warm-up, InstructGPT C.4)."
        },
    )
    critic_lr: float = field(
        default=3e-5,
        metadata={
            "help": "AdamW learning rate of the critic (value adapter and head). Default 3e-5, "
            "3x the policy's: the critic must track a moving target faster than the policy "
            "moves (PPO-max trains the critic at a higher rate than the policy)."
        },
    )
    lr_warmup_iterations: int = field(
        default=10,
        metadata={
            "help": "PPO iterations of linear learning-rate warm-up from a tenth of the peak "
            "rate. Default 10 (InstructGPT C.4). 0 = no warm-up."
        },
    )
    max_grad_norm: float = field(
        default=1.0,
        metadata={
            "help": "Global gradient-norm clip, applied with torch.nn.utils.clip_grad_norm_ "
            "before every optimizer step. Default 1.0 (PPO-max: global gradient "
            "clipping; CleanRL uses 0.5)."
        },
    )

    # --- the PPO objective -------------------------------------------------------------------
    clip_range: float = field(
        default=0.2,
        metadata={
            "help": "Policy ratio clip epsilon of the surrogate, clip(ratio, 1-eps, 1+eps). "
            "Default 0.2 (Schulman et al. 2017; InstructGPT C.4)."
        },
    )
    value_clip_range: float = field(
        default=0.2,
        metadata={
            "help": "Value clip epsilon: V is kept within V_old +- eps in the clipped value "
            "loss. Default 0.2 (PPO2 baselines; PPO-max: value loss clipping)."
        },
    )
    vf_coef: float = field(
        default=0.5,
        metadata={
            "help": "Weight of the value loss in the total loss. Default 0.5 (CleanRL; the "
            "c1 of Schulman et al. 2017)."
        },
    )
    entropy_coef: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the entropy bonus (loss - coef * H). Default 0: the KL penalty "
            "already keeps the policy spread (InstructGPT's objective, eq. 2, has no entropy "
            "term; PPO-max leaves it out). The entropy is always logged."
        },
    )
    ptx_coef: float = field(
        default=0.0,
        metadata={
            "help": "PPO-ptx: weight of the next-token NLL on pretraining/SFT text added to the "
            "policy loss, to limit the alignment tax. Default 0 = off (InstructGPT eq. 2 "
            "uses 27.8 for PPO-ptx)."
        },
    )
    approx_kl_stop: float = field(
        default=0.1,
        metadata={
            "help": "Early stop: skip the rest of an iteration's epochs once the mean "
            "approximate KL(pi_old || pi) (k3, trainer.ppo.core.policy_loss) of a mini-batch "
            "exceeds this (the mechanism of Spinning Up PPO and CleanRL's target_kl). Default 0.1 "
            "nats/token: a safety bound well above a healthy update's. 0 = off."
        },
    )
    critic_warmup_iterations: int = field(
        default=0,
        metadata={
            "help": "First PPO iterations that update only the critic, so advantages come from "
            "a fitted value function (PPO-max: critic pre-training). Default 0: an adapter "
            "critic starts as the reward model (InstructGPT C.4); a shared critic's head "
            "starts at zero, so its first advantages are the whitened returns (measured "
            "enough for the closed loop's promotion, docs/benchmarks.md, PPO at scale)."
        },
    )

    # --- advantages --------------------------------------------------------------------------
    gamma: float = field(
        default=1.0,
        metadata={
            "help": "Discount of GAE. Default 1.0 (InstructGPT C.4: no discount; one response "
            "is one short episode)."
        },
    )
    lam: float = field(
        default=0.95,
        metadata={
            "help": "GAE lambda: bias (0) / variance (1) trade-off of the advantage. Default "
            "0.95 (Ziegler et al. 2019; Stiennon et al. 2020)."
        },
    )
    whiten_advantages: bool = field(
        default=True,
        metadata={
            "help": "Whiten advantages (mean 0, std 1 over response tokens) per rollout batch. "
            "Default on (PPO-max: advantage normalisation; CleanRL norm_adv)."
        },
    )

    # --- reward ------------------------------------------------------------------------------
    normalize_reward: bool = field(
        default=True,
        metadata={
            "help": "Normalise sequence scores by the running mean and std of all scores seen "
            "(trainer.ppo.core.normalize_and_clip_rewards). Default on (PPO-max: reward "
            "scaling and normalisation)."
        },
    )
    reward_clip: float = field(
        default=5.0,
        metadata={
            "help": "Normalised scores are clipped to [-c, c] (with normalize_reward off, the "
            "raw score is). Default 5.0 (PPO-max: reward clipping)."
        },
    )
    kl_estimator: KLEstimator = field(
        default="k1",
        metadata={
            "help": "Per-token KL(pi || pi_ref) in the reward: 'k1' = log p - log p_ref "
            "(unbiased, the InstructGPT / PPO-max token-level penalty), 'k3' = (r-1) - log r, "
            "r = p_ref/p (non-negative, lower variance; Schulman 2020). Default 'k1'."
        },
    )
    kl_mode: KLMode = field(
        default="fixed",
        metadata={
            "help": "'fixed' keeps the KL coefficient at init_kl_coef (InstructGPT, PPO-max); "
            "'adaptive' steers it towards target_kl (Ziegler et al. 2019). Default 'fixed'."
        },
    )
    init_kl_coef: float = field(
        default=0.02,
        metadata={
            "help": "KL penalty coefficient beta (its start value when adaptive). Default 0.02 "
            "(InstructGPT C.4)."
        },
    )
    target_kl: float = field(
        default=6.0,
        metadata={
            "help": "Adaptive mode only: the sequence KL (nats) the controller aims for. "
            "Default 6.0 (Ziegler et al. 2019; TRL)."
        },
    )
    kl_horizon: int = field(
        default=10000,
        metadata={
            "help": "Adaptive mode only: the controller's horizon H; beta moves by at most "
            "0.2 * n_steps / H per update. Default 10000 (Ziegler et al. 2019; TRL)."
        },
    )

    def checks(self) -> list[tuple[bool, str, str]]:
        at_least_one = (
            "rollout_batch_size",
            "mini_batch_size",
            "micro_batch_size",
            "checkpoint_every",
            "ppo_epochs",
            "max_new_tokens",
            "kl_horizon",
        )
        positive = (
            "actor_lr",
            "critic_lr",
            "temperature",
            "max_grad_norm",
            "value_clip_range",
            "reward_clip",
            "target_kl",
        )
        non_negative = (
            "vf_coef",
            "entropy_coef",
            "ptx_coef",
            "init_kl_coef",
            "approx_kl_stop",
            "shared_prefix_min_tokens",
        )
        return [
            *((getattr(self, n) >= 1, n, "must be at least 1") for n in at_least_one),
            *(
                (getattr(self, n) >= 0, n, "must be >= 0 (0 = off)")
                for n in ("lr_warmup_iterations", "critic_warmup_iterations")
            ),
            (
                self.mini_batch_size <= self.rollout_batch_size
                and self.rollout_batch_size % self.mini_batch_size == 0,
                "mini_batch_size",
                f"must divide rollout_batch_size ({self.rollout_batch_size})",
            ),
            *((getattr(self, n) > 0, n, "must be > 0") for n in positive),
            (0 < self.clip_range < 1, "clip_range", "must be in (0, 1)"),
            *((getattr(self, n) >= 0, n, "must be >= 0") for n in non_negative),
            *((0 <= getattr(self, n) <= 1, n, "must be in [0, 1]") for n in ("gamma", "lam")),
        ]

    @property
    def gradient_steps_per_iteration(self) -> int:
        """Optimizer steps of one PPO iteration (without an early stop)."""
        return self.ppo_epochs * self.rollout_batch_size // self.mini_batch_size

    def kl_controller(self) -> AdaptiveKLController | FixedKLController:
        """A fresh KL coefficient controller for ``kl_mode``."""
        from trainer.ppo.core import AdaptiveKLController, FixedKLController

        if self.kl_mode == "adaptive":
            return AdaptiveKLController(self.init_kl_coef, self.target_kl, self.kl_horizon)
        return FixedKLController(self.init_kl_coef)
