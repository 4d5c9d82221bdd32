"""Rollouts sampled on the training model itself: a decode loop over ``transformers``'
forward and KV cache with the policy adapter active, on the models' device and under
their precision policy. No second process; bit-reproducible for a seed (the draws come
from a CPU generator, so a seed draws the same numbers on every device). The CPU default,
the path of exact-reproducibility tests, and what each rank uses under ``torchrun``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from trainer.common import cpu_attention
from trainer.ppo.models import POLICY, PolicyModels
from trainer.ppo.rollout.base import Finished, Sampler, Which, eos_token_ids
from trainer.ppo.rollout.kv_cache import reserved_cache


def inverse_cdf_sample(logprobs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One token per row of ``logprobs`` ``[B, V]``, given one uniform draw per row
    ``[B]`` in [0, 1): the first token whose cumulative probability passes
    ``uniform * total``. The same distribution as ``torch.multinomial``, which draws one
    exponential per vocabulary entry, a cost at every step (measured: docs/benchmarks.md,
    "Figures quoted in code")."""
    cdf = logprobs.exp().cumsum(-1)
    target = uniform.to(cdf.dtype).unsqueeze(-1) * cdf[:, -1:]
    picked = torch.searchsorted(cdf, target, right=True)[:, 0]
    return picked.clamp(max=cdf.shape[-1] - 1)  # a draw rounded up onto the total


# --- transformers ---------------------------------------------------------------------------


class HFSampler(Sampler):
    """Sampling on the training model itself, with ``transformers``' KV cache (see module
    docstring): a short decode loop rather than ``generate``, because ``generate`` keeps
    computing every row until the longest one ends (most rollouts stop far earlier than
    the longest: docs/benchmarks.md, "Figures quoted in code") and samples by drawing one
    random number per vocabulary entry. Here finished rows leave the batch, cache included,
    and a prompt prefix every row shares (``PPOConfig.shared_prefix_min_tokens``: a system
    prompt) runs once, as one row, its keys and values then copied into every row's cache.
    With a shared critic, each step's value is read off the hidden state the step's logits
    come from (the value head is one dot product per row). The KV cache is reserved for the
    longest answer up front (:mod:`~trainer.ppo.rollout.kv_cache`), not grown by a copy of
    the whole cache per token. On the CPU (in float32, or under bfloat16 autocast where the
    CPU multiplies bfloat16) the loop's layers multiply by their folded weights, and the LM
    head by its weight, laid out once per batch for oneDNN's kernels
    (:mod:`trainer.common.onednn_layout`), faster at a decode step's few rows."""

    is_training_model = True

    def __init__(self, models: PolicyModels) -> None:
        self.models = models
        hf_model = models.peft_model.get_base_model()
        self.eos = eos_token_ids(models.tokenizer, hf_model.generation_config)
        pad = models.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos)
        self._adapters: dict[str, str] = {}
        self._config: Any = hf_model.config

    def _cache_dtype(self) -> torch.dtype | None:
        """float32 where attention runs in float32 on bfloat16 keys
        (:mod:`trainer.common.cpu_attention`): the cache is then cast once per token, as it
        is written, not whole at every step. None (the keys' own dtype) elsewhere."""
        attention = self._config._attn_implementation
        if attention == cpu_attention.NAME and self.models.device.type == "cpu":
            return torch.float32
        return None

    def sync(self, models: PolicyModels, tag: str) -> float:
        del models, tag  # it samples from the training model itself: always in sync
        return 0.0

    def stream(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float,
        seed: int,
        which: Which = "current",
    ) -> Iterator[list[Finished]]:
        """The whole batch, in one list, shortest first: it is generated before any row is
        handed over (the caller switches adapters to score them, and the training model is
        the sampler). One seed for the batch, not one per row: one generator draws for all
        rows."""
        values = which == "current" and self.models.actor_critic.critic_kind == "shared"
        with torch.no_grad(), self._policy(which, rows=len(prompt_ids)):
            rows = self._generate(prompt_ids, max_new_tokens, temperature, seed, values)
        yield sorted(rows, key=lambda row: len(row.response_ids))

    @torch.no_grad()
    def _generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        max_new_tokens: int,
        temperature: float,
        seed: int,
        with_values: bool = False,
    ) -> list[Finished]:
        models = self.models
        device = models.device
        n = len(prompt_ids)
        input_ids, attention, positions, cache = self._prefill_inputs(prompt_ids, max_new_tokens)
        eos = torch.tensor(sorted(self.eos), device=device)
        generator = torch.Generator().manual_seed(seed)
        live = torch.arange(n, device=device)  # the original row of each row still generating
        tokens: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        values: list[list[float]] = [[] for _ in range(n)]
        for step in range(max_new_tokens):
            # The prompts on the first step, then each live row's last token.
            hidden = models.decode_hidden(input_ids, attention, positions, cache)
            logits = models.lm_logits(hidden)
            step_logprobs = torch.log_softmax(logits / temperature, dim=-1)
            uniform = torch.rand(len(live), generator=generator).to(device)
            picked = inverse_cdf_sample(step_logprobs, uniform)
            picked_logprobs = step_logprobs.gather(-1, picked.unsqueeze(-1))[:, 0]
            drawn = zip(live.tolist(), picked.tolist(), picked_logprobs.tolist(), strict=True)
            for row, token, lp in drawn:
                tokens[row].append(token)  # an EOS is part of the response
                logprobs[row].append(lp)
            if with_values:
                step_values = models.actor_critic.values_of(hidden).tolist()
                for row, value in zip(live.tolist(), step_values, strict=True):
                    values[row].append(value)
            going = ~torch.isin(picked, eos)
            if step == max_new_tokens - 1 or not going.any():
                break
            if not going.all():  # finished rows leave the batch and the cache
                keep = going.nonzero()[:, 0]
                cache.batch_select_indices(keep)
                live, attention, positions, picked = (
                    live[keep],
                    attention[keep],
                    positions[keep],
                    picked[keep],
                )
            input_ids = picked.unsqueeze(-1)
            attention = torch.cat([attention, attention.new_ones((len(live), 1))], dim=1)
            positions = positions[:, -1:] + 1
        return [
            Finished(i, tokens[i], logprobs[i], values[i] if with_values else None)
            for i in range(n)
        ]

    def _prefill_inputs(
        self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache]:
        """The first decode step's ``input_ids``, ``attention_mask`` and ``position_ids``,
        and the KV cache it extends. A prefix every prompt shares (a system prompt) is in
        the cache already, run once as one row (:meth:`PolicyModels.decode_prefix`); the
        step runs the rest of each prompt after it, left-padded, so that every row ends
        where generation starts."""
        models, n = self.models, len(prompt_ids)
        shared = models.shared_prompt_prefix(prompt_ids)
        rests = [p[shared:] for p in prompt_ids]
        width = max(len(p) for p in rests)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((n, shared + width), dtype=torch.long)
        attention[:, :shared] = 1
        for i, p in enumerate(rests):
            input_ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            attention[i, shared + width - len(p) :] = 1
        input_ids, attention = input_ids.to(models.device), attention.to(models.device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        # Room after the first write: the prefill's (all of it, or the prefix's alone).
        reserve = max_new_tokens + (width if shared else 0)
        cache = reserved_cache(self._config, reserve, self._cache_dtype())
        if shared:
            models.decode_prefix(prompt_ids[0][:shared], n, cache)
        return input_ids, attention, positions, cache

    def _policy(self, which: Which, rows: int) -> contextlib.AbstractContextManager[None]:
        """The sampling model for a decode loop of ``rows`` rows (no gradient: the adapter
        is folded into copies of the base weights, laid out for so few rows where that
        pays)."""
        if which == "current":
            return self.models.adapter(POLICY, decode_rows=rows)
        if which == "base":
            return self.models.reference()
        path = str(Path(which))
        name = self._adapters.get(path)
        if name is None:
            name = f"eval{len(self._adapters)}"
            self.models.peft_model.load_adapter(path, adapter_name=name, is_trainable=False)
            self._adapters[path] = name
        return self.models.adapter(name, decode_rows=rows)

    def close(self) -> None:
        for name in self._adapters.values():
            self.models.peft_model.delete_adapter(name)
        self._adapters.clear()
        self.models.use(POLICY)
