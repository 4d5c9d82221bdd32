"""A KV cache reserved up front for the decode loop (:class:`~trainer.ppo.rollout.hf.HFSampler`).

``transformers``' ``DynamicCache`` grows each layer's keys and values by concatenation:
every generated token copies the whole cache of every layer into a new, one-token-longer
block. The decode loop knows its longest answer in advance, so each layer here allocates
its keys and values once, prompt plus ``reserve`` tokens long, writes each step's new
token in place and hands attention views of the filled part. Rows that finish still leave
the batch (:meth:`ReservedLayer.batch_select_indices`); a prompt prefix every row shares
is written for one row and then repeated to all (:meth:`ReservedLayer.batch_repeat_interleave`).

``dtype`` is the dtype the cache stores, when it is not the projections' own. On the CPU
under bfloat16 autocast, attention runs in float32 (:mod:`trainer.common.cpu_attention`),
which casts the whole cache of a layer to float32 at every step; a float32 cache is cast
once per token, on the way in, and read as it is.

Measured: docs/benchmarks.md, "A reserved KV cache for the decode loop".
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class ReservedLayer(DynamicLayer):
    """One layer's keys and values ``[B, H, prompt + reserve, D]``, filled left to right.

    ``keys`` / ``values`` are always the views of the filled part, as ``DynamicLayer``'s
    are its whole tensors, so ``transformers``' mask sizes and sequence length read the
    same. Past the reservation (a caller that decodes longer than it said) the buffers
    grow by concatenation, as ``DynamicLayer`` does: slower, never wrong."""

    def __init__(self, reserve: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.reserve = reserve
        self.storage_dtype = dtype
        self.length = 0
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, q, d = key_states.shape
        dtype = self.storage_dtype or key_states.dtype
        self._keys = key_states.new_empty((b, h, q + self.reserve, d), dtype=dtype)
        self._values = value_states.new_empty((b, h, q + self.reserve, d), dtype=dtype)
        self.length = 0
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens' keys and values after the filled part; return the views of
        everything filled so far (the new tokens included)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self._keys is not None and self._values is not None
        start, end = self.length, self.length + key_states.shape[-2]
        if end > self._keys.shape[-2]:  # past the reservation
            self._keys, self._values = _grown(self._keys, end), _grown(self._values, end)
        self._keys[:, :, start:end].copy_(key_states)
        self._values[:, :, start:end].copy_(value_states)
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def get_max_length(self) -> int:
        return -1  # it grows past the reservation if it must

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows ``indices`` (rows that finished leave the batch): new buffers
        as long as the old, into which only the filled part is copied (rows finish at many
        different steps; copying the unfilled reservation each time would cost more than
        the concatenations it saves)."""
        if self.get_seq_length() > 0:
            assert self._keys is not None and self._values is not None
            self._keys = self._select(self._keys, indices)
            self._values = self._select(self._values, indices)
            self.keys = self._keys[:, :, : self.length]
            self.values = self._values[:, :, : self.length]

    def _select(self, buffer: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        kept = buffer.new_empty((len(indices), *buffer.shape[1:]))
        torch.index_select(buffer[:, :, : self.length], 0, indices, out=kept[:, :, : self.length])
        return kept

    def reset(self) -> None:
        self.length = 0
        self._keys = self._values = None
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the decode loop never crops its cache")

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row ``repeats`` times over, in order (a prompt prefix computed once, as one
        row, handed to every row of the batch): the filled part is copied, into buffers as
        long as the old (:meth:`batch_select_indices`)."""
        if self.get_seq_length() > 0:
            assert self._keys is not None
            rows = torch.arange(self._keys.shape[0], device=self._keys.device)
            self.batch_select_indices(rows.repeat_interleave(repeats))


def _grown(buffer: torch.Tensor, length: int) -> torch.Tensor:
    """``buffer`` ``[B, H, L, D]`` extended to ``length`` positions (the new ones unset)."""
    b, h, filled, d = buffer.shape
    return torch.cat([buffer, buffer.new_empty((b, h, length - filled, d))], dim=-2)


def reserved_cache(config: Any, reserve: int, dtype: torch.dtype | None = None) -> DynamicCache:
    """The ``DynamicCache`` ``transformers`` builds for the model ``config``, its full
    attention layers made :class:`ReservedLayer` s with room for ``reserve`` tokens after
    the prompt, storing ``dtype`` (None: the keys' own dtype). Other kinds of layer (a
    sliding window, for one) stay as they are."""
    cache = DynamicCache(config=config)
    cache.layers = [
        ReservedLayer(reserve, dtype) if type(layer) is DynamicLayer else layer
        for layer in cache.layers
    ]
    return cache
