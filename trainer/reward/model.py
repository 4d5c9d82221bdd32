"""The reward model: a scalar score for an answer to a conversation.

Two kinds, one interface (:class:`RewardModel`):

* ``lora`` (the default): the frozen base causal LM plus the reward model's own LoRA adapter
  and a linear head on the final hidden state of the last non-pad token. The base is not
  copied: the adapter is injected into the model object it is given, beside any other
  adapters (PPO's policy and critic), and :meth:`RewardModel.score` switches to the reward
  adapter for its forward pass and back afterwards. A version directory holds only the
  adapter (``adapter_config.json`` + ``adapter_model.safetensors``, PEFT's format) and the
  head (``head.safetensors``): a few hundred KB for the demo model.
* ``seq_cls``: a separate Hugging Face sequence-classification model (``num_labels=1``),
  fully fine-tuned and saved whole; for a reward model that should not share the policy's
  base.

**For PPO** (one base in memory): ``attach_reward_model(base, tokenizer, version_dir)``
loads a ``lora`` version onto the base model (a plain ``PreTrainedModel`` or a ``PeftModel``
already holding other adapters) under the adapter name ``"reward"`` and returns the
:class:`RewardModel`; score with ``rm.score(conversations, answers)``. Scoring leaves the
previously active adapter active again.

A version directory also holds ``reward_model.json`` (the model card: kind, base model,
max length, hidden size), which is what :func:`load_reward_model` dispatches on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from schemas.config import TrainingPrecision
from trainer.common.cpu_attention import use_cpu_attention
from trainer.common.device import autocast, autocast_dtype
from trainer.common.lora_folding import applied

CARD_NAME = "reward_model.json"
HEAD_NAME = "head.safetensors"
ADAPTER_NAME = "reward"
"""The adapter name a reward model gets on a shared base unless told otherwise."""

Messages = Sequence[dict[str, Any]]


def transformer_of(peft_model: PeftModel) -> PreTrainedModel:
    """The ``transformers`` model under a PEFT wrapper. PEFT annotates
    ``get_base_model()`` as a bare ``torch.nn.Module``; every model here is a
    ``PreTrainedModel`` (loaded by :func:`load_base_model`), and saying so once lets the
    type checker see its ``config`` and ``base_model_prefix``."""
    return cast(PreTrainedModel, peft_model.get_base_model())


def _conversation_text(tokenizer: PreTrainedTokenizerBase, messages: Messages, answer: str) -> str:
    """The conversation with the answer as the final assistant turn, as the model saw it in
    training (its chat template); a plain ``role: content`` transcript without one."""
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    turns.append({"role": "assistant", "content": answer})
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(turns, tokenize=False)
        assert isinstance(text, str)  # tokenize=False renders one string
        return text
    return "\n".join(f"{t['role']}: {t['content']}" for t in turns)


class RewardModel:
    """Scores answers. Subclasses say how a batch of token ids becomes one scalar per row."""

    kind: str

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.device = torch.device("cpu")
        """Where its weights are and its passes run (:meth:`to`)."""
        self.autocast_dtype: torch.dtype | None = None
        """The precision policy of its passes (:mod:`trainer.common.device`)."""

    def to(self, device: torch.device | str, precision: TrainingPrecision = "auto") -> RewardModel:
        """Move the weights to ``device`` and take its precision policy at a config's
        ``precision``; subclasses move their modules, then call this."""
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype(self.device, precision, self.parameters_count())
        return self

    def parameters_count(self) -> int:
        """Parameters its passes run through (what ``auto`` precision sizes it by)."""
        raise NotImplementedError

    # --- the small public API ------------------------------------------------------------

    @torch.no_grad()
    def score(
        self, conversations: Sequence[Messages], answers: Sequence[str], *, batch_size: int = 64
    ) -> torch.Tensor:
        """One reward per (conversation, answer), float32, shape ``(len(answers),)``, on
        the CPU (beside the rule terms) wherever the model runs."""
        if len(conversations) != len(answers):
            raise ValueError(f"{len(conversations)} conversations but {len(answers)} answers")
        out = [
            self.rewards(conversations[i : i + batch_size], answers[i : i + batch_size])
            for i in range(0, len(answers), batch_size)
        ]
        return torch.cat(out).float().cpu() if out else torch.zeros(0)

    def rewards(self, conversations: Sequence[Messages], answers: Sequence[str]) -> torch.Tensor:
        """Like :meth:`score` but in one batch and differentiable (training), on the
        model's device."""
        input_ids, attention_mask = self.encode(conversations, answers)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        return self.forward(input_ids, attention_mask)

    # --- for the trainer -------------------------------------------------------------------

    def encode(
        self, conversations: Sequence[Messages], answers: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded token ids and mask. Over-long rows keep their *last* ``max_length``
        tokens: the answer being judged is at the end."""
        rows = []
        for messages, answer in zip(conversations, answers, strict=True):
            text = _conversation_text(self.tokenizer, messages, answer)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            rows.append(ids[-self.max_length :])
        width = max((len(r) for r in rows), default=0)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, : len(ids)] = 1
        return input_ids, attention_mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer updates (marked ``requires_grad``); everything else is frozen."""
        raise NotImplementedError

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors by name (checkpoints): small for ``lora``, all for ``seq_cls``."""
        raise NotImplementedError

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def train(self, mode: bool = True) -> None:
        raise NotImplementedError

    def save(self, directory: Path) -> None:
        """Write this model's files into an existing (empty) directory."""
        raise NotImplementedError

    def card(self) -> dict[str, Any]:
        return {"kind": self.kind, "max_length": self.max_length}


class LoraRewardModel(RewardModel):
    """Adapter ``adapter_name`` of a shared :class:`PeftModel` plus a linear head."""

    kind = "lora"

    def __init__(
        self,
        peft_model: PeftModel,
        adapter_name: str,
        head: torch.nn.Linear,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        base_model_path: str | None,
    ) -> None:
        super().__init__(tokenizer, max_length)
        self.peft_model = peft_model
        self.adapter_name = adapter_name
        self.head = head
        self.base_model_path = base_model_path
        hf_model = transformer_of(peft_model)
        # The transformer without its LM head: the reward reads hidden states, not logits.
        self._backbone = getattr(hf_model, hf_model.base_model_prefix)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Scoring (no gradient) runs the adapter folded into the base weights.
        with (
            applied(self.peft_model, self.adapter_name),
            autocast(self.device, self.autocast_dtype),
        ):
            hidden = self._backbone(
                input_ids=input_ids, attention_mask=attention_mask
            ).last_hidden_state
        last = attention_mask.sum(dim=1) - 1
        final = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.head(final.to(self.head.weight.dtype)).squeeze(-1)

    def to(
        self, device: torch.device | str, precision: TrainingPrecision = "auto"
    ) -> LoraRewardModel:
        """The shared base (with every adapter on it) and the head on ``device``."""
        self.peft_model.to(device)
        self.head.to(device)
        super().to(device, precision)
        return self

    def parameters_count(self) -> int:
        """The shared base's (its passes run through all of it; adapters aside)."""
        named = self.peft_model.named_parameters()
        return sum(p.numel() for n, p in named if ".lora_" not in n)

    def _adapter_parameters(self) -> dict[str, torch.nn.Parameter]:
        marker = f".{self.adapter_name}."
        return {n: p for n, p in self.peft_model.named_parameters() if marker in n}

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        params = [*self._adapter_parameters().values(), *self.head.parameters()]
        for p in params:
            p.requires_grad_(True)
        return params

    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = {f"adapter:{n}": p.detach().clone() for n, p in self._adapter_parameters().items()}
        state.update({f"head:{n}": t.detach().clone() for n, t in self.head.state_dict().items()})
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        adapter = self._adapter_parameters()
        expected = {f"adapter:{n}" for n in adapter} | {f"head:{n}" for n in ("weight", "bias")}
        if set(state) != expected:
            raise ValueError("checkpoint tensors do not match this reward model's adapter/head")
        with torch.no_grad():
            for name, param in adapter.items():
                param.copy_(state[f"adapter:{name}"])
            self.head.weight.copy_(state["head:weight"])
            self.head.bias.copy_(state["head:bias"])

    def train(self, mode: bool = True) -> None:
        self.peft_model.train(mode)
        self.head.train(mode)

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        self.peft_model.peft_config[self.adapter_name].save_pretrained(str(directory))
        adapter_state = get_peft_model_state_dict(self.peft_model, adapter_name=self.adapter_name)
        save_file(
            {k: v.contiguous() for k, v in adapter_state.items()},
            str(directory / "adapter_model.safetensors"),
        )
        save_file(
            {k: v.contiguous() for k, v in self.head.state_dict().items()},
            str(directory / HEAD_NAME),
        )
        self.tokenizer.save_pretrained(str(directory))
        (directory / CARD_NAME).write_text(json.dumps(self.card(), indent=2) + "\n")

    def card(self) -> dict[str, Any]:
        return {
            **super().card(),
            "base_model": self.base_model_path,
            "hidden_size": self.head.in_features,
        }


class SequenceClassifierRewardModel(RewardModel):
    """A whole ``AutoModelForSequenceClassification`` (``num_labels=1``); its logit is the
    reward. Fully fine-tuned: it is its own model, not an adapter on the policy's base."""

    kind = "seq_cls"

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_length: int
    ) -> None:
        super().__init__(tokenizer, max_length)
        if model.config.pad_token_id is None:
            # The classifier finds each row's last real token by the pad id.
            model.config.pad_token_id = tokenizer.pad_token_id
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.autocast_dtype):
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits[:, 0].float()  # a no-op on the CPU

    def to(
        self, device: torch.device | str, precision: TrainingPrecision = "auto"
    ) -> SequenceClassifierRewardModel:
        # nn.Module's own: transformers' decorated override is typed for its own arguments.
        torch.nn.Module.to(self.model, device)
        super().to(device, precision)
        return self

    def parameters_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        params = list(self.model.parameters())
        for p in params:
            p.requires_grad_(True)
        return params

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        if set(state) != set(params):
            raise ValueError("checkpoint tensors do not match this sequence classifier")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state[name])

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def save(self, directory: Path) -> None:
        self.model.save_pretrained(str(directory))
        self.tokenizer.save_pretrained(str(directory))
        (Path(directory) / CARD_NAME).write_text(json.dumps(self.card(), indent=2) + "\n")


# --- building and loading ----------------------------------------------------------------


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give a tokenizer without a pad token one: its EOS (else its UNK). Padding is always
    masked out here, so any id works; an existing token keeps the vocabulary (and the
    embedding matrix) the size the model was trained with."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        if fallback is None:
            raise ValueError("the tokenizer has no pad, EOS or UNK token to pad with")
        tokenizer.pad_token = fallback
    return tokenizer


def load_base_model(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM directory in float32 (CPU training) with its tokenizer (given a pad token
    when it has none: :func:`ensure_pad_token`), frozen, eval mode, its attention
    :mod:`~trainer.common.cpu_attention`'s where it would be ``sdpa``."""
    tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(str(path)))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    use_cpu_attention(model)
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer


def lora_target_modules(model: PreTrainedModel | PeftModel) -> list[str]:
    """The modules a LoRA adapter on ``model`` wraps when none are configured (``"auto"``):
    every linear layer of the transformer body (attention and MLP projections, by their
    leaf names), not the LM head, the embeddings or any classification head.

    This is the set vLLM (0.32) can serve an adapter on: it supports LoRA on every linear
    layer of its own implementation of the architecture (``get_supported_lora_modules`` in
    ``vllm/lora/utils.py``), whose fused layers (``qkv_proj``, ``gate_up_proj``) expand back
    to these Hugging Face names (``packed_modules_mapping``), and it refuses an adapter with
    any other module (``LoRAModel.from_local_checkpoint``). The LM head and embeddings are
    left out because vLLM takes LoRA on them only for some architectures and PPO does not
    need them."""
    hf_model = transformer_of(model) if isinstance(model, PeftModel) else model
    body = getattr(hf_model, hf_model.base_model_prefix)
    names = set()
    for name, module in body.named_modules():
        parts = name.split(".")
        if not isinstance(module, torch.nn.Linear) or any(p.startswith("lora_") for p in parts):
            continue  # an adapter's own A and B matrices
        if parts[-1] == "base_layer":  # a layer PEFT already wraps: named by its wrapper
            parts.pop()
        names.add(parts[-1])
    if not names:
        raise ValueError(f"{type(hf_model).__name__} has no linear layers for LoRA")
    return sorted(names)


def lora_config(
    r: int, alpha: int, target_modules: str, model: PreTrainedModel | PeftModel | None = None
) -> LoraConfig:
    """A LoRA config vLLM can serve: no dropout; targets ``"auto"`` (what
    :func:`lora_target_modules` finds in ``model``), ``"all-linear"`` (PEFT's rule) or a
    comma list."""
    targets: str | list[str] = target_modules
    if target_modules == "auto":
        if model is None:
            raise ValueError("lora target_modules 'auto' needs the model")
        targets = lora_target_modules(model)
    elif target_modules != "all-linear":
        targets = [t.strip() for t in target_modules.split(",") if t.strip()]
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets)


def new_lora_reward_model(
    base: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    r: int = 8,
    alpha: int = 16,
    target_modules: str = "auto",
    max_length: int = 256,
    seed: int = 0,
    adapter_name: str = ADAPTER_NAME,
    base_model_path: str | None = None,
) -> LoraRewardModel:
    """A freshly initialised adapter (a no-op: LoRA's B starts at zero) and head on ``base``.

    Initialisation draws from a private RNG seeded with ``seed``: the caller's torch random
    stream is left alone, and the same seed gives the same starting point.
    """
    lora = lora_config(r, alpha, target_modules, base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(base, PeftModel):
            base.add_adapter(adapter_name, lora)
            peft_model = base
        else:
            peft_model = get_peft_model(base, lora, adapter_name=adapter_name)
        hidden = transformer_of(peft_model).config.hidden_size
        head = torch.nn.Linear(hidden, 1)
        torch.nn.init.normal_(head.weight, std=1 / (hidden + 1) ** 0.5)
        torch.nn.init.zeros_(head.bias)
    return LoraRewardModel(peft_model, adapter_name, head, tokenizer, max_length, base_model_path)


def read_card(version_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(version_dir) / CARD_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{version_dir} is not a reward model directory ({exc})") from exc


def attach_reward_model(
    base: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    version_dir: Path,
    *,
    adapter_name: str = ADAPTER_NAME,
) -> LoraRewardModel:
    """Load a ``lora`` reward model version onto ``base`` (PPO's entry point).

    ``base`` is the base model already in memory, plain or a ``PeftModel`` holding other
    adapters; the reward adapter is added to it under ``adapter_name`` (no copy of the
    base is made) and the head is loaded beside. The base must be the one the version was
    trained on (same architecture and weights), and ``tokenizer`` its tokenizer.
    """
    version_dir = Path(version_dir)
    card = read_card(version_dir)
    if card.get("kind") != "lora":
        raise ValueError(f"{version_dir} holds a {card.get('kind')!r} reward model, not an adapter")
    if isinstance(base, PeftModel):
        base.load_adapter(str(version_dir), adapter_name=adapter_name, is_trainable=False)
        peft_model = base
    else:
        peft_model = PeftModel.from_pretrained(base, str(version_dir), adapter_name=adapter_name)
    hidden = transformer_of(peft_model).config.hidden_size
    if card.get("hidden_size") not in (None, hidden):
        raise ValueError(
            f"reward head expects hidden size {card['hidden_size']}, base has {hidden}"
        )
    head = torch.nn.Linear(hidden, 1)
    head.load_state_dict(load_file(str(version_dir / HEAD_NAME)))
    head.requires_grad_(False)
    return LoraRewardModel(
        peft_model,
        adapter_name,
        head,
        tokenizer,
        int(card.get("max_length", 256)),
        card.get("base_model"),
    )


def load_seq_cls_model(path: Path, max_length: int = 256) -> SequenceClassifierRewardModel:
    """A sequence-classification directory (a configured model or a saved version)."""
    tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(str(path)))
    model = AutoModelForSequenceClassification.from_pretrained(
        str(path), num_labels=1, dtype=torch.float32
    )
    use_cpu_attention(model)
    model.eval()
    return SequenceClassifierRewardModel(model, tokenizer, max_length)


def load_reward_model(version_dir: Path, *, base_model: Path | None = None) -> RewardModel:
    """A saved version, standalone: ``lora`` versions load their base (``base_model``, or the
    path recorded in the card) and attach to it; ``seq_cls`` versions load whole."""
    version_dir = Path(version_dir)
    card = read_card(version_dir)
    if card.get("kind") == "seq_cls":
        return load_seq_cls_model(version_dir, int(card.get("max_length", 256)))
    base_path = base_model or card.get("base_model")
    if not base_path:
        raise ValueError(f"{version_dir}: no base model recorded; pass base_model")
    base, tokenizer = load_base_model(Path(base_path))
    return attach_reward_model(base, tokenizer, version_dir)
