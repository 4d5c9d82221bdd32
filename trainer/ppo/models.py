"""The four PPO models on one copy of the base: actor, reference, critic, reward.

One frozen base causal LM in memory, wrapped once in a :class:`peft.PeftModel` that holds
three LoRA adapters side by side:

* **actor** = base + ``policy`` adapter (trainable). It starts from the parent policy's
  adapter, or from a fresh LoRA (B = 0, so the actor starts *equal* to the base);
* **reference** = the same base with every adapter disabled (``disable_adapter()``): the
  SFT model, frozen by construction. Its log-probs are the base model's, bit for bit,
  because a disabled LoRA layer calls only its base layer;
* **critic** = a linear value head on the final hidden state of every position, over one
  of two trunks (``critic``):

  - ``"adapter"``: base + its own ``critic`` adapter (trainable), initialised from the
    reward model's adapter and head (``critic_init="reward"``) or fresh. A second trunk:
    every pass of the critic is a whole backbone forward (and backward) beside the actor's;
  - ``"shared"``: the actor's own trunk (base + ``policy`` adapter): one forward gives
    log-probs and values; the head reads the trunk's features without training them (the
    value loss reaches the head only: through the trunk it would move the policy by a loss
    that is not the policy's), and starts at zero. Half the backbone work of ``"adapter"`` in
    the update and one pass fewer in scoring: what wins once the backbone, not the Python
    floor, is the cost (measured: docs/benchmarks.md, "PPO at scale");
* **reward** = base + the frozen ``reward`` adapter and head of a reward model version
  (:func:`trainer.reward.model.attach_reward_model`), plus rule terms
  (:class:`trainer.reward.rules.ComposedReward`). A ``seq_cls`` version (a separate
  sequence-classification model, possibly on another base and tokenizer) is loaded beside
  the base instead: it scores texts, so it needs nothing from the policy's base, and the
  critic then starts fresh (there is no adapter to copy).

Switching adapters is a flag flip in each LoRA layer, not a copy. On the CPU, passes
without a gradient run the adapter folded into copies of the base weights, and the update's
LoRA layers run folded too (:mod:`trainer.common.lora_folding`): one product per layer.
The frozen LM head gives each response token's log-prob and entropy chunk by chunk
(:meth:`PolicyModels.token_logprobs`, :mod:`trainer.ppo.lm_head`): no pass holds the
``[N, V]`` logits whole, and the update keeps none of them for its backward.

**Device**: :meth:`PolicyModels.to` puts every model on the training device; every pass
then runs there under that device's precision policy (:mod:`trainer.common.device`:
bfloat16 autocast over float32 weights on CUDA, float32 on the CPU), and
:meth:`TokenBatch.to` brings each batch along. The reference runs the same base weights
through the same autocast policy, so it stays the base model of that device, bit for bit.

PEFT's ``set_adapter`` also marks only the active adapter trainable;
:meth:`PolicyModels.use` puts the requires-grad flags back (actor and critic trainable,
everything else frozen) after every switch, so the optimizer's parameters never silently
stop getting gradients.

:class:`ActorCritic` is the one ``nn.Module`` the optimizer (and DDP) sees: its forward
runs the actor and the critic over a :class:`TokenBatch` and returns per-response-token
log-probs, values and the logits' entropy.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from schemas.config import TrainingPrecision
from trainer.common.device import autocast, autocast_dtype, folding_pays, module_device
from trainer.common.gated_mlp import fuse_gated_mlps
from trainer.common.lora_folding import cast_base, fold_in_training, folded
from trainer.common.onednn_layout import (
    is_laid_out,
    laid_out_copy,
    layout_pays,
    multiplying_by,
)
from trainer.common.shared_prefix import (
    common_prefix_length,
    hidden_after_prefix,
    prefix_shareable,
    shared_prefix_length,
)
from trainer.ppo.config import CriticKind
from trainer.ppo.core import entropy_per_token, logprobs_from_logits, ptx_loss
from trainer.ppo.lm_head import head_logprobs
from trainer.reward.model import (
    LoraRewardModel,
    RewardModel,
    SequenceClassifierRewardModel,
    attach_reward_model,
    load_base_model,
    load_seq_cls_model,
    lora_config,
    read_card,
    transformer_of,
)

POLICY, CRITIC, REWARD = "policy", "critic", "reward"
log = logging.getLogger(__name__)


# --- token batches ------------------------------------------------------------------------


@dataclass
class TokenBatch:
    """Prompt + response rows, right-padded, with the response positions spelled out.

    * ``input_ids``, ``attention_mask``: ``[B, T]``, each row ``prompt + response`` then pad;
    * ``positions``: ``[B, R]``, the index in ``input_ids`` whose hidden state predicts
      response token ``j`` (``prompt_len - 1 + j``; clamped on padding);
    * ``response_ids``: ``[B, R]`` the response tokens (pad beyond each row's length);
    * ``mask``: ``[B, R]``, 1 on response tokens, 0 on padding.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    response_ids: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def build(
        cls,
        prompts: Sequence[Sequence[int]],
        responses: Sequence[Sequence[int]],
        pad_id: int,
        device: torch.device | str | None = None,
    ) -> TokenBatch:
        """The batch of ``prompts[i] + responses[i]`` rows, laid out on the CPU and then
        moved to ``device`` (one copy per tensor; None: stays on the CPU)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        width = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
        resp_width = max(1, max(len(r) for r in responses))
        b = len(prompts)
        input_ids = torch.full((b, width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((b, width), dtype=torch.long)
        positions = torch.zeros((b, resp_width), dtype=torch.long)
        response_ids = torch.full((b, resp_width), pad_id, dtype=torch.long)
        mask = torch.zeros((b, resp_width), dtype=torch.long)
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            if not p:
                raise ValueError("every prompt needs at least one token")
            row = list(p) + list(r)
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
            steps = torch.arange(resp_width)
            positions[i] = (len(p) - 1 + steps).clamp(max=width - 1)
            if r:
                response_ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
                mask[i, : len(r)] = 1
        batch = cls(input_ids, attention_mask, positions, response_ids, mask)
        return batch if device is None else batch.to(device)

    def to(self, device: torch.device | str) -> TokenBatch:
        """The same batch on ``device`` (itself when it is there already)."""
        if self.input_ids.device == torch.device(device):
            return self
        return TokenBatch(
            *(
                t.to(device)
                for t in (
                    self.input_ids,
                    self.attention_mask,
                    self.positions,
                    self.response_ids,
                    self.mask,
                )
            )
        )

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_width(self) -> int:
        return self.mask.shape[1]

    def length_chunks(self, size: int) -> list[torch.Tensor]:
        """Row indices in chunks of ``size``, shortest rows first: scoring a rollout chunk by
        chunk (each cut to its own longest row by :meth:`select`) skips most padding."""
        order = torch.argsort(self.attention_mask.sum(1), stable=True)
        return list(order.split(size))

    def response_tokens(self) -> torch.Tensor:
        """The ``N`` response tokens ``[N]``, row by row, padding skipped."""
        return self.response_ids[self.mask.bool()]

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """``[N]`` values, one per response token (as :meth:`response_tokens` orders them),
        back to ``[B, R]`` with 0 on padding; differentiable."""
        keep = self.mask.bool()
        return values.new_zeros(keep.shape).index_put((keep,), values)

    def select(self, rows: torch.Tensor) -> TokenBatch:
        """The sub-batch of ``rows`` (a mini-batch), cut to its own longest row: padding
        that only longer rows elsewhere in the batch needed is not computed on."""
        attention = self.attention_mask[rows]
        width = max(1, int(attention.sum(1).max()))
        mask = self.mask[rows]
        response_width = max(1, int(mask.sum(1).max()))
        return TokenBatch(
            self.input_ids[rows, :width],
            attention[:, :width],
            self.positions[rows, :response_width].clamp(max=width - 1),
            self.response_ids[rows, :response_width],
            mask[:, :response_width],
        )


def _gather_positions(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``hidden[b, positions[b, j]]``: ``[B, T, H], [B, R] -> [B, R, H]``."""
    index = positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return hidden.gather(1, index)


# --- the trainable module -----------------------------------------------------------------


class ActorCritic(torch.nn.Module):
    """Actor (``policy`` adapter) and critic (value head on its trunk) on one base.

    ``forward(batch)`` -> ``(logprobs, values, entropy, ptx_nll)``: per response token, the
    actor's log-prob of the sampled token at ``temperature``, the critic's value of the
    state before it; the mean entropy of the actor's distribution over response tokens (a
    scalar). The LM head runs only on response tokens, not on the prompt or padding. With
    a ``"shared"`` critic, one backbone pass gives both.
    """

    def __init__(
        self,
        models: PolicyModels,
        value_head: torch.nn.Linear,
        temperature: float,
        critic: CriticKind = "adapter",
    ) -> None:
        super().__init__()
        self.peft_model = models.peft_model
        self.value_head = value_head
        self.temperature = temperature
        self.critic_kind: CriticKind = critic
        self._models = [models]  # a list: not registered as a submodule twice

    @property
    def models(self) -> PolicyModels:
        return self._models[0]

    def forward(
        self, batch: TokenBatch, ptx: TokenBatch | None = None, entropy_grad: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(logprobs, values, entropy, ptx_nll)``; ``ptx_nll`` is the actor's next-token
        NLL on the SFT rows ``ptx`` (PPO-ptx), at temperature 1, or None without them.
        ``entropy_grad=False``: the entropy is only logged (no bonus), so no gradient."""
        logprobs, values, entropy = self.evaluate(batch, entropy_grad=entropy_grad)
        ptx_nll = None
        if ptx is not None:
            self.models.use(POLICY)
            ptx_nll = ptx_loss(self.models.response_logits(ptx), ptx.response_tokens())
        assert entropy is not None
        return logprobs, values, entropy, ptx_nll

    def evaluate(
        self, batch: TokenBatch, with_entropy: bool = True, entropy_grad: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(logprobs, values, entropy)`` of the actor and the critic: two backbone passes
        with an ``"adapter"`` critic, one with a ``"shared"`` one."""
        if self.critic_kind == "adapter":
            logprobs, entropy = self.actor(batch, with_entropy, entropy_grad)
            return logprobs, self.critic(batch), entropy
        with self.models.adapter(POLICY):
            hidden = self.models.response_hidden(batch)
        logprobs, entropy = self._policy_head(hidden, batch, with_entropy, entropy_grad)
        # The value loss trains the head only: through the trunk it would move the policy
        # by a loss that is not the policy's (measured: a round's KL to the reference 10.2
        # against a target of 6 in tests/integration/trainer/rounds, within it detached).
        return logprobs, self.values_of(hidden.detach()), entropy

    def actor(
        self, batch: TokenBatch, with_entropy: bool = True, entropy_grad: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Policy log-probs ``[B, R]`` of the response tokens and the mean entropy (None
        when not asked for: scoring a rollout needs only the log-probs)."""
        with self.models.adapter(POLICY):
            hidden = self.models.response_hidden(batch)
        return self._policy_head(hidden, batch, with_entropy, entropy_grad)

    def critic(self, batch: TokenBatch) -> torch.Tensor:
        """Values ``[B, R]``: the value head on the critic's trunk at each position."""
        with self.models.adapter(CRITIC if self.critic_kind == "adapter" else POLICY):
            hidden = self.models.response_hidden(batch)
        return self.values_of(hidden if self.critic_kind == "adapter" else hidden.detach())

    def _policy_head(
        self, hidden: torch.Tensor, batch: TokenBatch, with_entropy: bool, entropy_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logprobs, entropy = self.models.token_logprobs(
            hidden[batch.mask.bool()],
            batch.response_tokens(),
            self.temperature,
            with_entropy=with_entropy,
            entropy_grad=with_entropy and entropy_grad,
        )
        return batch.unpack(logprobs), None if entropy is None else entropy.mean()

    def values_of(self, hidden: torch.Tensor) -> torch.Tensor:
        """The value head on hidden states ``[..., H]`` -> ``[...]``, in float32 (a no-op on
        the CPU): values are regression targets."""
        return self.value_head(hidden.float()).squeeze(-1)


# --- the models on one base -----------------------------------------------------------------


class PolicyModels:
    """The base, its adapters and heads, and the passes PPO needs (see module docstring).

    Build with :meth:`load`; then :attr:`actor_critic` is the trainable module,
    :meth:`reference_logprobs` the frozen reference, :attr:`reward` the reward model.
    """

    def __init__(
        self,
        peft_model: PeftModel,
        tokenizer: PreTrainedTokenizerBase,
        reward: RewardModel,
        value_head: torch.nn.Linear,
        temperature: float,
        base_model_path: Path,
        *,
        critic: CriticKind = "adapter",
        critic_from_reward: bool = False,
    ) -> None:
        self.peft_model = peft_model
        self.critic_from_reward = critic_from_reward
        """The critic started as the reward model: its head predicts raw reward scores."""
        self.device = module_device(peft_model)
        self.autocast_dtype = autocast_dtype(self.device)
        """The precision policy of every pass (:mod:`trainer.common.device`); tests set
        bfloat16 on the CPU to check CUDA's exactness claims."""
        # The update's LoRA layers, folded where that was measured faster (lora_folding).
        fold_in_training(peft_model, enabled=folding_pays(self.device))
        # The update keeps less for its backward, at no cost to its numbers: a gated MLP's
        # SiLU product keeps 3 of its 4 tensors (gated_mlp).
        fuse_gated_mlps(peft_model)
        self.tokenizer = tokenizer
        self.reward = reward
        self.base_model_path = base_model_path
        hf_model = transformer_of(peft_model)
        self._backbone = getattr(hf_model, hf_model.base_model_prefix)
        self._lm_head = hf_model.get_output_embeddings()
        self._lm_head_cached: tuple[tuple[Any, ...], torch.Tensor] | None = None
        self._weights_held: str | None = None
        """What the base weights hold during a no-gradient pass: an adapter's name (folded
        in), ``"reference"`` (cast), or None (the base weights themselves)."""
        self.shared_prefix_min_tokens = 0
        """A prefix at least this long that every row of a pass begins with runs once, as
        one row (:mod:`trainer.common.shared_prefix`); 0: every row runs whole. The trainer
        sets it from ``PPOConfig.shared_prefix_min_tokens``."""
        self._prefix_shareable = prefix_shareable(self._backbone.config)
        self.prefix_tokens_shared = 0
        """Backbone token positions not computed so far because their rows shared them:
        ``(rows - 1) * prefix`` per pass."""
        self.actor_critic = ActorCritic(self, value_head, temperature, critic)
        marker = {name: f".{name}." for name in (POLICY, CRITIC)}
        self._policy_params = [p for n, p in peft_model.named_parameters() if marker[POLICY] in n]
        self._critic_params = [p for n, p in peft_model.named_parameters() if marker[CRITIC] in n]
        self._trainable = {id(p) for p in self.trainable_parameters()}
        self._adapter_key: tuple[str, ...] = ()
        self._adapter_list: list[torch.nn.Parameter] = []
        self.use(POLICY)

    # --- construction ----------------------------------------------------------------------

    # Long on purpose: the four models put on one base in the order they depend on each
    # other (policy adapter, reward, critic by its kind and initialisation), in one place.
    @classmethod
    def load(
        cls,
        base_model: Path,
        reward_dir: Path,
        *,
        policy_init: Path | None = None,
        critic_init: str = "reward",
        critic: CriticKind = "adapter",
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_target_modules: str = "auto",
        temperature: float = 1.0,
        seed: int = 0,
    ) -> PolicyModels:
        """Load the base once and put every adapter on it.

        ``policy_init``: a PEFT adapter directory the actor starts from (the parent policy);
        ``None`` = a fresh LoRA of rank ``lora_r``. ``critic_init``: ``"reward"`` copies the
        reward model's adapter and head into the critic (its LoRA config included),
        ``"fresh"`` starts a new LoRA and a zero value head. A ``seq_cls`` reward model is
        loaded as its own model and the critic starts fresh whatever ``critic_init`` says.
        ``critic``: ``"adapter"`` (its own LoRA trunk) or ``"shared"`` (the value head on
        the actor's trunk; it always starts at zero: the reward head reads another trunk's
        features, so ``critic_init`` does not apply). A round's default is ``"shared"``
        (``RoundConfig.critic``).
        """
        if critic_init not in ("reward", "fresh"):
            raise ValueError(f"critic_init must be 'reward' or 'fresh', got {critic_init!r}")
        if critic not in get_args(CriticKind):
            raise ValueError(f"critic must be one of {get_args(CriticKind)}, got {critic!r}")
        base, tokenizer = load_base_model(Path(base_model))
        card = read_card(Path(reward_dir))
        if card.get("kind") == "seq_cls" and critic_init == "reward" and critic == "adapter":
            log.info("the reward model is a separate classifier: the critic starts fresh")
            critic_init = "fresh"
        if critic == "shared":
            critic_init = "fresh"  # a zero head on the actor's trunk
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = lora_config(lora_r, lora_alpha, lora_target_modules, base)
            peft_model = _with_policy_adapter(base, policy_init, fresh)
            reward: RewardModel
            if card.get("kind") == "seq_cls":
                reward = load_seq_cls_model(Path(reward_dir), int(card.get("max_length", 256)))
                reward.model.requires_grad_(False)
            else:
                reward = attach_reward_model(peft_model, tokenizer, Path(reward_dir))
            hidden = base.config.hidden_size
            value_head = torch.nn.Linear(hidden, 1)
            if critic == "shared":
                torch.nn.init.zeros_(value_head.weight)
                torch.nn.init.zeros_(value_head.bias)
            elif critic_init == "reward":
                assert isinstance(reward, LoraRewardModel)  # seq_cls switched to fresh above
                critic_config = copy.deepcopy(peft_model.peft_config[REWARD])
                critic_config.inference_mode = False
                peft_model.add_adapter(CRITIC, critic_config)
                _copy_adapter(peft_model, REWARD, CRITIC)
                value_head.load_state_dict(reward.head.state_dict())
            else:
                peft_model.add_adapter(
                    CRITIC, lora_config(lora_r, lora_alpha, lora_target_modules, base)
                )
                torch.nn.init.zeros_(value_head.weight)
                torch.nn.init.zeros_(value_head.bias)
        peft_model.eval()  # no dropout anywhere: PPO's ratios must compare like with like
        return cls(
            peft_model,
            tokenizer,
            reward,
            value_head,
            temperature,
            Path(base_model),
            critic=critic,
            critic_from_reward=critic_init == "reward",
        )

    def to(self, device: torch.device, precision: TrainingPrecision = "auto") -> PolicyModels:
        """Put the base, every adapter, the value head and the reward model on ``device`` and
        take that device's precision policy at a config's ``precision``, and its folding
        choice (:mod:`trainer.common.device`). Before the optimizer and DDP are built
        (:class:`~trainer.ppo.trainer.PPOTrainer`): the parameters stay the same objects,
        their data moves."""
        self.peft_model.to(device)
        self.value_head.to(device)
        self.reward.to(device, precision)
        self.device = torch.device(device)
        base = sum(p.numel() for n, p in self.peft_model.named_parameters() if ".lora_" not in n)
        self.autocast_dtype = autocast_dtype(self.device, precision, base)
        fold_in_training(self.peft_model, enabled=folding_pays(self.device))
        return self

    # --- adapters and parameters ------------------------------------------------------------

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Actor adapter, critic adapter (none when shared), value head: what the optimizer
        updates."""
        return [*self._policy_params, *self._critic_params, *self.value_head.parameters()]

    @property
    def value_head(self) -> torch.nn.Linear:
        return self.actor_critic.value_head

    def param_groups(self, actor_lr: float, critic_lr: float) -> list[dict[str, Any]]:
        """Optimizer groups: the actor at ``actor_lr``, the critic and head at ``critic_lr``."""
        return [
            {"params": self._policy_params, "lr": actor_lr, "name": "actor"},
            {
                "params": [*self._critic_params, *self.value_head.parameters()],
                "lr": critic_lr,
                "name": "critic",
            },
        ]

    def use(self, adapter: str) -> None:
        """Make ``adapter`` the active one; trainable flags stay as they must be.

        Cheap when ``adapter`` is already active (PEFT's switch walks every module); the
        flags are put back on the adapters' tensors every time, because any other
        ``set_adapter`` call (the reward model restores its caller's adapter) re-marks them.
        """
        if self.peft_model.active_adapter != adapter:
            self.peft_model.set_adapter(adapter)
        for p in self._adapter_tensors():
            p.requires_grad_(id(p) in self._trainable)

    def replaying_adapter(self) -> contextlib.AbstractContextManager[None]:
        """A context that makes the adapter active now the active one again for its body
        (and then the one active then): a checkpointed layer's replay in the backward runs
        in it (:func:`trainer.common.activation_checkpointing.checkpoint_layers`), since an
        adapter critic's forward runs between the actor's and the backward."""
        return self._active_again(self.peft_model.active_adapter)

    @contextlib.contextmanager
    def _active_again(self, name: str) -> Iterator[None]:
        before = self.peft_model.active_adapter
        if before == name:
            yield
            return
        self.use(name)
        try:
            yield
        finally:
            self.use(before)

    def _adapter_tensors(self) -> list[torch.nn.Parameter]:
        """Every adapter's tensors (the base's stay frozen): recomputed when adapters are
        added or deleted (the evaluation loads other policy versions)."""
        key = tuple(sorted(self.peft_model.peft_config))
        if self._adapter_key != key:
            self._adapter_key = key
            self._adapter_list = [p for n, p in self.peft_model.named_parameters() if ".lora_" in n]
        return self._adapter_list

    @contextlib.contextmanager
    def adapter(self, name: str, decode_rows: int | None = None) -> Iterator[None]:
        """The passes inside run with adapter ``name``: made active (:meth:`use`) when a
        gradient may flow, folded into the base weights when none can (no-gradient passes:
        scoring, sampling; see :mod:`trainer.common.lora_folding`). Inside a no-gradient
        pass of the same adapter it is already folded: the body runs as it is (a caller
        folds once for many chunks). ``decode_rows``: the body is a decode loop over that
        many rows, whose products take the folded weights, and the LM head's, laid out for
        them where that pays (:mod:`trainer.common.onednn_layout`)."""
        if torch.is_grad_enabled():
            self.use(name)
            yield
        else:
            with self._no_gradient_pass(name, self._folded_weights(name, decode_rows)):
                yield

    @contextlib.contextmanager
    def _folded_weights(self, name: str, decode_rows: int | None) -> Iterator[None]:
        """Adapter ``name`` folded into the base weights (:func:`folded`) and, for a decode
        loop of ``decode_rows`` rows where that pays (:mod:`trainer.common.onednn_layout`),
        the LM head multiplying by a copy of its weight laid out for them: the
        vocabulary-wide head is a small model's widest product, made at every step. The
        copy is the head's own (the head is not folded), made once per decode loop and
        dropped after it."""
        with folded(self.peft_model, name, self.autocast_dtype, decode_rows):
            head = self._lm_head
            if (
                decode_rows is None
                or type(head) is not torch.nn.Linear
                or not layout_pays(head.weight, self.autocast_dtype, decode_rows)
            ):
                yield
                return
            laid_out = laid_out_copy(head.weight, decode_rows, self.autocast_dtype)
            with multiplying_by([(head, laid_out)]):
                yield

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """The frozen reference: every adapter disabled for the duration. Without a
        gradient, under autocast, its weights are cast once for the body, not in every
        call (the same numbers); inside such a pass the body runs as it is."""
        if torch.is_grad_enabled():
            with self.peft_model.disable_adapter():
                yield
        else:
            cast = cast_base(self.peft_model, self.autocast_dtype)
            with self._no_gradient_pass("reference", cast):
                yield

    @contextlib.contextmanager
    def _no_gradient_pass(
        self, what: str, weights: contextlib.AbstractContextManager[None]
    ) -> Iterator[None]:
        """Run the body with the base weights holding ``what`` (``weights`` puts it there,
        entered only when they do not hold it already). A different pass inside one would
        start from these weights, not the base ones (an adapter folded on top of another, a
        "reference" that is the policy): refused."""
        if self._weights_held == what:
            yield
            return
        if self._weights_held is not None:
            raise RuntimeError(
                f"a no-gradient pass of {what!r} inside one of {self._weights_held!r}: "
                "the base weights hold the outer pass's"
            )
        with weights:
            self._weights_held = what
            try:
                yield
            finally:
                self._weights_held = None

    # --- forward passes --------------------------------------------------------------------

    def hidden_states(self, batch: TokenBatch) -> torch.Tensor:
        """Final hidden states ``[B, T, H]`` of the active adapter (or the reference), in
        the autocast dtype (float32 on the CPU)."""
        with autocast(self.device, self.autocast_dtype):
            return self._backbone(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
            ).last_hidden_state

    def decode_hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any,
    ) -> torch.Tensor:
        """One decode step of the active adapter: the final hidden state ``[B, H]`` of each
        row's last position, the KV ``cache`` extended (what the LM head and the value head
        read, as :meth:`response_hidden` does for a whole batch)."""
        with autocast(self.device, self.autocast_dtype):
            out = self._backbone(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
        return out.last_hidden_state[:, -1]

    def shared_prompt_prefix(self, prompts: Sequence[Sequence[int]]) -> int:
        """How many leading tokens of ``prompts`` (token ids) a decode loop's prefill runs
        once (:meth:`decode_prefix`): what every prompt begins with, each keeping at least
        its last token for its own pass (the first answer token is read off it), where that
        is at least :attr:`shared_prefix_min_tokens` and the model's layers cache plain keys
        and values; else 0."""
        if not (self.shared_prefix_min_tokens and self._prefix_shareable):
            return 0
        shared = common_prefix_length(prompts, min(len(p) for p in prompts) - 1)
        return shared if shared >= self.shared_prefix_min_tokens else 0

    def decode_prefix(self, prefix: Sequence[int], rows: int, cache: Any) -> None:
        """Fill the empty KV ``cache`` with the keys and values of ``prefix``, which all
        ``rows`` prompts of a decode loop begin with: one row's forward of the active
        adapter, its cache then repeated to the batch. The prefill that follows runs each
        prompt's rest, after the prefix's positions."""
        ids = torch.tensor([list(prefix)], dtype=torch.long, device=self.device)
        positions = torch.arange(len(prefix), device=self.device).unsqueeze(0)
        self.decode_hidden(ids, torch.ones_like(ids), positions, cache)
        cache.batch_repeat_interleave(rows)
        self.prefix_tokens_shared += (rows - 1) * len(prefix)

    def response_hidden(self, batch: TokenBatch) -> torch.Tensor:
        """Final hidden states ``[B, R, H]`` of the positions that predict each response
        token (what the LM head and the value head read). A prompt prefix every row shares
        (at least :attr:`shared_prefix_min_tokens` long) runs once; it ends before the
        first position read, so only the rest's hidden states are needed."""
        shared = 0
        if self.shared_prefix_min_tokens and self._prefix_shareable:
            first_read = int(batch.positions[:, 0].min())  # the shortest prompt's last token
            shared = shared_prefix_length(batch.input_ids, batch.attention_mask, first_read)
        if shared < max(1, self.shared_prefix_min_tokens):
            return _gather_positions(self.hidden_states(batch), batch.positions)
        with autocast(self.device, self.autocast_dtype):
            rest = hidden_after_prefix(
                self._backbone, batch.input_ids, batch.attention_mask, shared
            )
        self.prefix_tokens_shared += (len(batch) - 1) * shared
        return _gather_positions(rest, batch.positions - shared)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on hidden states ``[N, H]`` -> logits ``[N, V]``, in float32."""
        dtype = self.autocast_dtype
        head = self._lm_head
        plain = type(head) is torch.nn.Linear and head.bias is None and not is_laid_out(head)
        if dtype is not None and plain and not torch.is_grad_enabled():
            # The frozen head's autocast cast, made once (autocast would make it per call,
            # per generated token in the decode loop; a vocabulary-wide head is the widest
            # product of a small model). A decode loop's laid-out head has its own.
            logits = F.linear(hidden.to(dtype), self._lm_head_cast(dtype))
        else:
            with autocast(self.device, dtype):
                logits = head(hidden)
        # Log-softmax, ratios and KL in float32 whatever the product ran in (no-op on CPU).
        return logits.float()

    def token_logprobs(
        self,
        hidden: torch.Tensor,
        tokens: torch.Tensor,
        temperature: float,
        with_entropy: bool = True,
        entropy_grad: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per row of ``hidden [N, H]``: the log-prob of ``tokens [N]`` at ``temperature``
        and the entropy of the distribution (None without ``with_entropy``), ``[N]`` each,
        in float32; the entropy carries a gradient only with ``entropy_grad``.

        A frozen plain head runs chunk by chunk (:mod:`trainer.ppo.lm_head`): the ``[N, V]``
        logits are never held whole, nor kept for the backward. Any other head (one that
        trains, or has a bias) takes the plain logits path."""
        head = self._lm_head
        if type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad:
            dtype = self.autocast_dtype
            weight = head.weight if dtype is None else self._lm_head_cast(dtype)
            return head_logprobs(
                hidden, weight, tokens, temperature, dtype, with_entropy, entropy_grad
            )
        logits = self.lm_logits(hidden)
        logprobs = logprobs_from_logits(logits, tokens, temperature)
        if not with_entropy:
            return logprobs, None
        scaled = logits / temperature if temperature != 1.0 else logits
        return logprobs, entropy_per_token(scaled if entropy_grad else scaled.detach())

    def _lm_head_cast(self, dtype: torch.dtype) -> torch.Tensor:
        """The LM head's weight in ``dtype``, cast once per weight tensor and device."""
        weight = self._lm_head.weight
        key = (weight.data_ptr(), weight.device, dtype)
        if self._lm_head_cached is None or self._lm_head_cached[0] != key:
            self._lm_head_cached = (key, weight.detach().to(dtype))
        return self._lm_head_cached[1]

    def response_logits(self, batch: TokenBatch) -> torch.Tensor:
        """Logits ``[N, V]`` predicting the batch's ``N`` response tokens, row by row (as
        :meth:`TokenBatch.response_tokens`): the LM head, the widest product of a small
        model, runs on nothing else, neither prompt nor padding."""
        return self.lm_logits(self.response_hidden(batch)[batch.mask.bool()])

    @torch.no_grad()
    def reference_logprobs(self, batch: TokenBatch) -> torch.Tensor:
        """Log-probs ``[B, R]`` of the response tokens under the reference (base) model."""
        with self.reference():
            hidden = self.response_hidden(batch)[batch.mask.bool()]
        temperature = self.actor_critic.temperature
        logprobs, _ = self.token_logprobs(
            hidden, batch.response_tokens(), temperature, with_entropy=False
        )
        return batch.unpack(logprobs)

    # --- saving the actor ------------------------------------------------------------------

    def policy_state(self) -> dict[str, torch.Tensor]:
        """The policy adapter's tensors in PEFT's file naming (what vLLM loads), on the CPU."""
        state = get_peft_model_state_dict(self.peft_model, adapter_name=POLICY)
        return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}

    def save_policy(self, directory: Path) -> None:
        """Write the actor as a standalone PEFT adapter directory (servable by vLLM)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.peft_model.peft_config[POLICY]
        config.base_model_name_or_path = str(self.base_model_path)
        config.save_pretrained(str(directory))
        save_file(self.policy_state(), str(directory / "adapter_model.safetensors"))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor by name (checkpoints)."""
        named = dict(self.peft_model.named_parameters())
        state = {
            f"adapter:{n}": p.detach().clone() for n, p in named.items() if id(p) in self._trainable
        }
        state.update(
            {f"value_head:{n}": t.detach().clone() for n, t in self.value_head.state_dict().items()}
        )
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        named = dict(self.peft_model.named_parameters())
        expected = {f"adapter:{n}" for n, p in named.items() if id(p) in self._trainable}
        expected |= {f"value_head:{n}" for n in self.value_head.state_dict()}
        if set(state) != expected:
            raise ValueError("checkpoint tensors do not match this actor/critic")
        with torch.no_grad():
            for key, tensor in state.items():
                kind, name = key.split(":", 1)
                target = named[name] if kind == "adapter" else self.value_head.state_dict()[name]
                target.copy_(tensor)

    def parameter_bytes(self) -> dict[str, int]:
        """Bytes held by the base, each adapter and the value head (the memory breakdown)."""
        sizes: dict[str, int] = {"base": 0, POLICY: 0, CRITIC: 0, REWARD: 0}
        for name, p in self.peft_model.named_parameters():
            owner = next((a for a in (POLICY, CRITIC, REWARD) if f".{a}." in name), "base")
            sizes[owner] += p.numel() * p.element_size()
        sizes["value_head"] = sum(
            p.numel() * p.element_size() for p in self.value_head.parameters()
        )
        # A lora reward model is an adapter (counted above) and a head; a seq_cls one is a
        # whole model of its own.
        reward_params: list[torch.nn.Parameter] = []
        if isinstance(self.reward, LoraRewardModel):
            reward_params = list(self.reward.head.parameters())
        elif isinstance(self.reward, SequenceClassifierRewardModel):
            reward_params = list(self.reward.model.parameters())
        sizes["reward_head"] = sum(p.numel() * p.element_size() for p in reward_params)
        return sizes


def _with_policy_adapter(
    base: PreTrainedModel, policy_init: Path | None, fresh: LoraConfig
) -> PeftModel:
    if policy_init is None:
        return get_peft_model(base, fresh, adapter_name=POLICY)
    return PeftModel.from_pretrained(base, str(policy_init), adapter_name=POLICY, is_trainable=True)


def _copy_adapter(peft_model: PeftModel, source: str, target: str) -> None:
    """Copy every LoRA tensor of adapter ``source`` into adapter ``target`` (same config)."""
    params = dict(peft_model.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, p in params.items():
            if f".{source}." in name:
                params[name.replace(f".{source}.", f".{target}.")].copy_(p)
                copied += 1
    if copied == 0:
        raise ValueError(f"adapter {source!r} has no tensors to copy")
