"""One yardstick for every side of the PPO comparison: the reward a trained policy earns on
held-out prompts, and how far it moved from the base to earn it.

``benchmarks/ppo.py`` trains alignloop and TRL on the same prompts with the same reward
model, but each side reports the reward of its own training batches, scored its own way
(alignloop renders the answer as a closed chat turn; TRL scores the sampled ids), on
different batches at the start and the end. Neither says whether the policy got better.
This module measures every side's final policy, and the untouched base, the same way, in
one process:

1. **prompts**: ``prompts`` conversations the training never saw (the demo world's
   ``sample_prompts`` with a seed of their own), rendered with the chat template and its
   generation prompt, left-padded;
2. **samples**: ``samples`` answers per prompt from ``transformers`` ``generate`` at the
   training temperature, top-k and top-p off, seeded (the same seed for every policy),
   cut after the first end-of-sequence token (kept, as TRL keeps it);
3. **reward**, two ways, since the two sides train on different readings of the same
   classifier: ``reward_ids``, the classifier on prompt + answer ids as sampled, read at
   the answer's last token (TRL's ``get_reward``: positions from the attention mask); and
   ``reward_rendered``, the answer's text as a closed assistant turn of the chat template,
   re-tokenised (alignloop's reward models, :meth:`trainer.reward.model.RewardModel.score`);
4. **KL**: per answer, the sum over its tokens of ``log pi(y_t) - log pi_ref(y_t)`` at the
   training temperature (the k1 estimator on the policy's own samples), ``pi_ref`` the
   base model.

``evaluate`` returns the mean rewards and KL with their standard errors; a side's **reward
gain** is its mean reward minus the base's, read beside its KL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

EVAL_PROMPT_SEED = 19
"""The held-out prompts' seed (training uses ``sample_prompts(0, ...)``)."""

PolicyKind = Literal["base", "adapter", "full"]


@dataclass(frozen=True)
class EvalSettings:
    """How much to sample: ``prompts`` held-out prompts × ``samples`` answers each, up to
    ``max_new_tokens`` at ``temperature``, from seed ``seed``, ``batch_size`` rows per
    ``generate`` call."""

    prompts: int = 64
    samples: int = 4
    max_new_tokens: int = 48
    temperature: float = 1.0
    seed: int = 0
    batch_size: int = 64


def _mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    n = values.numel()
    mean = float(values.mean())
    stderr = float(values.std(unbiased=True)) / math.sqrt(n) if n > 1 else 0.0
    return mean, stderr


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch (pads at 0), as TRL's forward passes use."""
    return (attention_mask.cumsum(1) - attention_mask.long()).clamp(min=0)


def cut_after_eos(responses: torch.Tensor, eos_id: int) -> torch.Tensor:
    """The mask ``[B, R]`` of each answer's tokens up to and including its first ``eos_id``."""
    is_eos = (responses == eos_id).long()
    after = is_eos.cumsum(1) - is_eos  # end-of-sequence tokens strictly before this one
    return (after == 0).long()


def sequence_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_len: int,
    temperature: float,
) -> torch.Tensor:
    """Log-probs ``[B, R]`` of the tokens after ``prompt_len`` under ``model``."""
    logits = (
        model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=_positions(attention_mask),
        )
        .logits[:, prompt_len - 1 : -1]
        .float()
    )
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    return logprobs.gather(-1, input_ids[:, prompt_len:, None]).squeeze(-1)


def reward_scores(
    reward_model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The classifier's score ``[B]`` at each row's last attended token (a ``transformers``
    sequence classifier: its backbone under ``base_model_prefix``, its head ``score``)."""
    backbone = getattr(reward_model, reward_model.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=_positions(attention_mask)
    ).last_hidden_state
    last = attention_mask.shape[1] - 1 - attention_mask.flip(1).argmax(1)
    rows = torch.arange(hidden.shape[0])
    return reward_model.score(hidden[rows, last]).squeeze(-1).float()


@torch.no_grad()
def evaluate(
    base_dir: Path,
    policy_dir: Path | None,
    kind: PolicyKind,
    reward_dir: Path,
    settings: EvalSettings = EvalSettings(),
) -> dict[str, float]:
    """The held-out reward and KL to the base of one policy (see the module docstring):
    ``base`` (the base itself), ``adapter`` (a PEFT adapter directory on the base) or
    ``full`` (a fully fine-tuned model directory)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from trainer.demo.corpus import sample_prompts
    from trainer.reward.model import load_reward_model

    tokenizer = AutoTokenizer.from_pretrained(base_dir, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    reference = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    if kind == "base":
        policy = reference
    elif kind == "full":
        assert policy_dir is not None
        policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    else:
        from peft import PeftModel

        assert policy_dir is not None
        fresh = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        policy = PeftModel.from_pretrained(fresh, str(policy_dir)).merge_and_unload().eval()
    reward = AutoModelForSequenceClassification.from_pretrained(
        reward_dir, num_labels=1, dtype=torch.float32
    ).eval()

    conversations = [
        [{"role": "user", "content": p.text}]
        for p in sample_prompts(EVAL_PROMPT_SEED, settings.prompts)
    ]
    texts = [
        tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
        for c in conversations
        for _ in range(settings.samples)
    ]
    generator_seed = settings.seed
    rewards, kls, lengths, answers = [], [], [], []
    for start in range(0, len(texts), settings.batch_size):
        enc = tokenizer(
            texts[start : start + settings.batch_size],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
        torch.manual_seed(generator_seed + start)
        out = policy.generate(
            **enc,
            do_sample=True,
            temperature=settings.temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=settings.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
        prompt_len = enc["input_ids"].shape[1]
        answer_mask = cut_after_eos(out[:, prompt_len:], tokenizer.eos_token_id)
        input_ids = out.clone()
        input_ids[:, prompt_len:][answer_mask == 0] = tokenizer.pad_token_id
        attention = torch.cat([enc["attention_mask"], answer_mask], dim=1)
        mine = sequence_logprobs(policy, input_ids, attention, prompt_len, settings.temperature)
        base = sequence_logprobs(reference, input_ids, attention, prompt_len, settings.temperature)
        kls.append(((mine - base) * answer_mask).sum(1))
        rewards.append(reward_scores(reward, input_ids, attention))
        lengths.append(answer_mask.sum(1).float())
        for row, mask in zip(out[:, prompt_len:], answer_mask, strict=True):
            kept = row[mask.bool()]
            kept = kept[kept != tokenizer.eos_token_id]
            answers.append(tokenizer.decode(kept, skip_special_tokens=True))
    reward_mean, reward_err = _mean_and_stderr(torch.cat(rewards))
    as_alignloop = load_reward_model(reward_dir)
    turns = [c for c in conversations for _ in range(settings.samples)]
    rendered_mean, rendered_err = _mean_and_stderr(as_alignloop.score(turns, answers))
    kl_mean, kl_err = _mean_and_stderr(torch.cat(kls))
    return {
        "reward_ids": round(reward_mean, 4),
        "reward_ids_stderr": round(reward_err, 4),
        "reward_rendered": round(rendered_mean, 4),
        "reward_rendered_stderr": round(rendered_err, 4),
        "kl": round(kl_mean, 4),
        "kl_stderr": round(kl_err, 4),
        "answer_tokens": round(float(torch.cat(lengths).mean()), 2),
        "answers": len(texts),
    }
