"""A prompt prefix every row shares, run once per pass instead of once per row.

Chat templates open every conversation the same way: SmolLM2's puts a 24-token default
system prompt before each user turn (29 % of a bench row's tokens), and a product's own
system prompt is often longer than the question after it. A pass over ``B`` rows that
begin with the same ``P`` tokens computes those ``P`` positions ``B`` times, with the same
result each time: attention is causal, so nothing after the prefix reaches it.

:func:`hidden_after_prefix` runs the prefix once, as one row, and the rest of every row
against its keys and values broadcast to the batch (an ``expand``: no copy until the
attention's concatenation). The numbers are those of the whole pass up to rounding (the
products run at other shapes); a gradient through the prefix is the sum over the rows
that read it, which is what ``expand``'s backward computes. The prefix's cache is read,
never extended (:class:`SharedPrefixCache`), so a checkpointed layer can replay its
forward in the backward (:mod:`trainer.common.activation_checkpointing`).

Rows are right-padded (prompt, response, then pad: :class:`trainer.ppo.models.TokenBatch`),
so every row's prefix starts at column 0 and the rest keeps its absolute positions.

The decode loop's prefill shares the prefix the same way, with a cache it extends
(:class:`~trainer.ppo.rollout.hf.HFSampler`): the prefix runs as one row into the KV
cache, which is then repeated to every row, and each prompt's rest runs after it,
left-padded; :func:`common_prefix_length` finds the prefix among the prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import (
    Cache,
    CacheLayerMixin,
    DynamicLayer,
    LinearAttentionCacheLayerMixin,
)


def common_prefix_length(rows: Sequence[Sequence[int]], limit: int) -> int:
    """How many leading tokens all of ``rows`` (token ids) have in common, at most
    ``limit``; 0 for a single row. What :func:`shared_prefix_length` finds in a batch,
    for prompts not yet in one (a decode loop's)."""
    if len(rows) < 2 or limit < 1:
        return 0
    first, width = rows[0], min(limit, *(len(row) for row in rows))
    for i in range(width):
        if any(row[i] != first[i] for row in rows):
            return i
    return width


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor, limit: int) -> int:
    """How many leading tokens every row of ``input_ids [B, T]`` has in common, all of them
    real tokens (``attention_mask`` 1), at most ``limit`` (the caller keeps the positions it
    reads after the prefix). 0 for a single row: there is nothing to share."""
    if input_ids.shape[0] < 2 or limit < 1:
        return 0
    width = min(limit, input_ids.shape[1])
    same = (input_ids[:, :width] == input_ids[:1, :width]).all(0)
    same &= attention_mask[:, :width].bool().all(0)
    differing = (~same).nonzero()
    return int(differing[0, 0]) if len(differing) else width


class _ReadOnlyLayer(DynamicLayer):
    """One layer's prefix keys and values ``[B, Hkv, P, D]``: ``update`` returns them with
    the new positions' appended, and keeps nothing (a replayed forward sees the same
    prefix)."""

    keys: torch.Tensor
    values: torch.Tensor

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.cat([self.keys, key_states], dim=-2),
            torch.cat([self.values, value_states], dim=-2),
        )


def prefix_shareable(config: PretrainedConfig) -> bool:
    """Whether a model of ``config`` caches plain keys and values in every layer, what
    :class:`SharedPrefixCache` broadcasts (not a sliding window's cropped cache, nor a
    linear-attention state)."""
    layers = DynamicCache(config=config).layers
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


class SharedPrefixCache(Cache):
    """The prefix's keys and values, computed for one row and broadcast to ``rows``: what a
    model's forward over the rest of each row reads as its past. ``replayable``: a forward
    that reads it can run again with the same result
    (:func:`trainer.common.activation_checkpointing.checkpoint_layers` checkpoints it)."""

    replayable = True

    def __init__(self, prefix: DynamicCache, rows: int) -> None:
        layers: list[CacheLayerMixin | LinearAttentionCacheLayerMixin] = []
        for layer in prefix.layers:
            if type(layer) is not DynamicLayer or layer.keys is None or layer.values is None:
                raise ValueError(f"a prefix cache of plain keys and values only, not {layer!r}")
            keys, values = layer.keys, layer.values
            layers.append(
                _ReadOnlyLayer(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1))
            )
        super().__init__(layers=layers)


def hidden_after_prefix(
    backbone: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prefix: int,
) -> torch.Tensor:
    """The final hidden states ``[B, T - prefix, H]`` of columns ``prefix:`` of
    ``input_ids [B, T]`` (their first ``prefix`` tokens the same in every row), from one
    forward of ``backbone`` (a ``transformers`` base model) over the shared prefix as a
    single row and one over the rest of every row. The caller's autocast and adapter
    state apply to both. The model's layers must cache plain keys and values
    (:func:`prefix_shareable`)."""
    cache = DynamicCache(config=backbone.config)
    backbone(input_ids=input_ids[:1, :prefix], past_key_values=cache, use_cache=True)
    past = SharedPrefixCache(cache, input_ids.shape[0])
    return backbone(
        input_ids=input_ids[:, prefix:],
        attention_mask=attention_mask,
        past_key_values=past,
        use_cache=False,
    ).last_hidden_state
