"""Offline evaluation of a PPO candidate against the stable policy, and the gate.

On held-out prompts (never trained on: split by prompt hash), both policies answer the same
prompts with the same sampling seed. Measured, for each: the reward (model score + rules),
answer length in tokens and words, distinct-1/2 (share of unique n-grams over all answers;
a collapsing policy repeats itself); for the candidate also the mean sequence KL to the
reference on its own answers and the win rate (share of prompts where the reward prefers
the candidate's answer, ties half). :func:`gate` turns the numbers into a verdict with the
reason recorded either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from trainer.ppo.config import KLEstimator, PPOConfig
from trainer.ppo.core import kl_penalty, masked_mean
from trainer.ppo.models import PolicyModels, TokenBatch
from trainer.ppo.rollout.base import Sampler, Which, render_prompts


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique word n-grams / all word n-grams over ``texts`` (0 when there are none)."""
    grams = [
        tuple(words[i : i + n])
        for words in (t.split() for t in texts)
        for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


def win_rate(candidate: torch.Tensor, stable: torch.Tensor) -> float:
    """Share of rows where ``candidate > stable``, ties counted half."""
    if candidate.numel() == 0:
        return 0.0
    wins = (candidate > stable).float() + 0.5 * (candidate == stable).float()
    return float(wins.mean())


def _answer_stats(tokens: Sequence[Sequence[int]], texts: Sequence[str], rewards: torch.Tensor):
    return {
        "reward": float(rewards.mean()),
        "length_tokens": sum(len(t) for t in tokens) / max(1, len(tokens)),
        "length_words": sum(len(t.split()) for t in texts) / max(1, len(texts)),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
    }


@torch.no_grad()
def sequence_kl(models: PolicyModels, batch: TokenBatch, estimator: KLEstimator = "k1") -> float:
    """Mean over rows of the summed per-token KL(actor || reference) on ``batch``."""
    logprobs, _ = models.actor_critic.actor(batch)
    ref = models.reference_logprobs(batch)
    kl = kl_penalty(logprobs, ref, estimator)
    kl = torch.where(batch.mask.bool(), kl, torch.zeros_like(kl))
    return float(masked_mean(kl.sum(-1), torch.ones(len(batch), device=kl.device)))


EXAMPLES = 8  # held-out prompts shown side by side (the console's Training page)


def side_by_side(
    conversations: Sequence[Any],
    answers: dict[str, list[str]],
    rewards: dict[str, torch.Tensor],
    limit: int = EXAMPLES,
) -> list[dict[str, Any]]:
    """The first ``limit`` held-out prompts with the stable and the candidate answer and
    the reward model's score of each: what an operator reads before promoting."""
    return [
        {
            "prompt": conversation[-1]["content"],
            "stable": answers["stable"][i],
            "candidate": answers["candidate"][i],
            "stable_reward": float(rewards["stable"][i]),
            "candidate_reward": float(rewards["candidate"][i]),
        }
        for i, conversation in enumerate(conversations[:limit])
    ]


def evaluate(
    models: PolicyModels,
    sampler: Sampler,
    reward_fn,
    conversations: Sequence[Any],
    stable: Which,
    ppo: PPOConfig,
) -> dict[str, Any]:
    """Candidate (the actor as last synced) vs ``stable`` on held-out ``conversations``."""
    prompt_ids = render_prompts(models.tokenizer, conversations)
    seed = ppo.seed + 99_991  # the same draws for both policies, unlike any training seed
    out: dict[str, Any] = {"prompts": len(conversations), "stable": str(stable)}
    rewards: dict[str, torch.Tensor] = {}
    answers: dict[str, list[str]] = {}
    for name, which in (("candidate", "current"), ("stable", stable)):
        samples = sampler.sample(
            prompt_ids,
            which=which,
            max_new_tokens=ppo.max_new_tokens,
            temperature=ppo.temperature,
            seed=seed,
        )
        texts = models.tokenizer.batch_decode(samples.response_ids, skip_special_tokens=True)
        rewards[name] = reward_fn(conversations, texts)["total"].float()
        out[name] = _answer_stats(samples.response_ids, texts, rewards[name])
        if name == "candidate":
            pad = models.tokenizer.pad_token_id or 0
            batch = TokenBatch.build(prompt_ids, samples.response_ids, pad, models.device)
            out["kl_to_reference"] = sequence_kl(models, batch, ppo.kl_estimator)
        answers[name] = texts
    out["examples"] = side_by_side(conversations, answers, rewards)
    out["win_rate"] = win_rate(rewards["candidate"], rewards["stable"])
    out["reward_gain"] = out["candidate"]["reward"] - out["stable"]["reward"]
    stable_d2 = out["stable"]["distinct_2"]
    out["distinct_2_ratio"] = out["candidate"]["distinct_2"] / stable_d2 if stable_d2 else 1.0
    return out
