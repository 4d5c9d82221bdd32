"""What PPO samples rollouts from: the :class:`Sampler` interface and what every
sampler shares.

One interface, two samplers (one module each): :class:`~trainer.ppo.rollout.hf.HFSampler`,
a decode loop on the training model itself (bit-reproducible for a seed; the CPU default
and what each rank uses under ``torchrun``), and
:class:`~trainer.ppo.rollout.vllm.VllmSampler`, an in-process vLLM engine with the actor
hot-loaded as a LoRA adapter (the GPU default). ``RoundConfig.rollouts`` picks one
(``auto``: vLLM with a GPU, HF on CPU).

Both **stream**: :meth:`Sampler.stream` yields each response as soon as it is finished, so
the trainer scores the early (short) responses while long ones are still being generated;
:meth:`Sampler.sample` collects the stream into prompt order.

Either way the sampler's own log-probs come back beside the tokens. A sampler that is
another engine (vLLM: bf16 kernels, other attention code and batch shapes) is never trained
on: the trainer recomputes log-probs with its own model and logs the mean absolute gap (a
growing gap is a silent source of off-policy error). A sampler that *is* the training model
(:attr:`Sampler.is_training_model`: the HF decode loop) computed them with the very weights
PPO trains; in float32 they are the training pass's up to rounding, so the trainer takes
them (and, with a shared critic, the values the decode loop also read off the same hidden
states) instead of a second pass over the rollout (``PPOConfig.recompute_logprobs``). Under
bfloat16 autocast a decode step and a full pass round differently: the first iteration
recomputes them for the update's first mini-batch and measures the gap there, and the
trainer keeps them (for that iteration's other rows and from then on) only if it was under
``PPOConfig.sampler_logprob_tolerance``.

Which policy to sample: ``"current"`` (the actor as of the last sync), ``"base"`` (no
adapter: the reference), or a path to a PEFT adapter directory (another version, e.g. the
stable policy in the offline evaluation).
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from trainer.ppo.models import PolicyModels

log = logging.getLogger(__name__)

Which = str | Path
"""``"current"``, ``"base"``, or an adapter directory."""


class AdapterSyncError(RuntimeError):
    """The actor's adapter could not be written or loaded into the sampler in time."""


@dataclass
class Samples:
    """One response per prompt: token ids (ending with EOS when the model stopped) and the
    sampler's log-prob of each token."""

    response_ids: list[list[int]]
    sampler_logprobs: list[list[float]]
    seconds: float

    @property
    def tokens(self) -> int:
        return sum(len(r) for r in self.response_ids)


@dataclass
class Finished:
    """One finished response: the row of the prompt it answers, its tokens, the sampler's
    log-prob of each token and, where the sampler is the training model with a shared
    critic, the critic's value of the state before each token (else None)."""

    index: int
    response_ids: list[int]
    sampler_logprobs: list[float]
    values: list[float] | None = None


class Sampler(abc.ABC):
    """What PPO samples rollouts from. A sampler implements :meth:`stream`;
    :meth:`sample` is the stream collected into prompt order."""

    is_training_model = False
    """Whether ``"current"`` is sampled by the training model's own weights and passes (its
    log-probs are the actor's, up to the rounding of its precision)."""

    @abc.abstractmethod
    def sync(self, models: PolicyModels, tag: str) -> float:
        """Make ``"current"`` the actor as it is now; returns the seconds it took."""

    @abc.abstractmethod
    def stream(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float,
        seed: int,
        which: Which = "current",
    ) -> Iterator[list[Finished]]:
        """One response per prompt, handed over as soon as they are finished (any order):
        each list holds every response finished since the previous one (so a caller that
        fell behind gets its backlog at once). Sampled reproducibly for ``seed`` as far as
        the sampler can be."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def sample(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float,
        seed: int,
        which: Which = "current",
    ) -> Samples:
        """The whole stream, in prompt order."""
        started = time.perf_counter()
        n = len(prompt_ids)
        responses: list[list[int] | None] = [None] * n
        logprobs: list[list[float]] = [[] for _ in range(n)]
        stream = self.stream(
            prompt_ids,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            which=which,
        )
        for done in (d for finished in stream for d in finished):
            responses[done.index] = done.response_ids
            logprobs[done.index] = done.sampler_logprobs
        missing = [i for i, r in enumerate(responses) if r is None]
        if missing:
            raise RuntimeError(f"the sampler returned no response for rows {missing[:10]}")
        complete = [r for r in responses if r is not None]  # every row, as checked above
        return Samples(complete, logprobs, time.perf_counter() - started)


def render_prompts(
    tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Sequence[dict[str, Any]]]
) -> list[list[int]]:
    """Chat-template token ids of each conversation, ending with the assistant's turn open."""
    out = []
    for messages in conversations:
        turns = [{"role": m["role"], "content": m["content"]} for m in messages]
        ids = tokenizer.apply_chat_template(
            turns, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        out.append(list(ids))
    return out


def eos_token_ids(tokenizer: PreTrainedTokenizerBase, generation_config: Any) -> set[int]:
    """Every token id that ends a response (the tokenizer's EOS and the generation config's)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return ids
