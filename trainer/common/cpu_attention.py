"""Attention on the CPU in float32, grouped-query heads without copies: a ``transformers``
attention implementation for every model the trainers load.

``transformers``' own ``sdpa`` implementation, on torch's CPU kernels, loses time twice
where this one does not (docs/benchmarks.md, "Attention in float32 on the CPU"):

* **bfloat16**: under CPU bfloat16 autocast, ``scaled_dot_product_attention`` runs in
  bfloat16, and torch's CPU flash-attention kernels are slower in bfloat16 than in
  float32, in the decode step and in the training backward most (``./dev bench
  cpu_attention`` measures both implementations call for call). Attention's products
  are a small share of a layer's FLOPs, so float32 costs the matrix products nothing that
  matters, and its softmax is float32 anyway;
* **grouped-query attention with a mask**: ``transformers`` copies every key and value
  head out to its query heads (``repeat_kv``) whenever a mask is given, which in a decode
  loop is a copy of the whole KV cache per layer per generated token. torch's
  ``enable_gqa`` reads each KV head for its query heads in place; its result is the same.

Where a gradient is recorded, the core runs under a non-reentrant checkpoint and runs again
in the backward (selective recomputation): the graph keeps the inputs as they came, not
their float32 copies, the output and its log-sum-exp; on SmolLM2, 101 instead of 180 KB per
token (docs/benchmarks.md, "Fewer activations kept for the update: the memory target at
SmolLM2 by default").

On any other device, and for the few features this path does not take (ALiBi-style
position biases, the paged cache of continuous batching), the call goes to
``transformers``' ``sdpa`` unchanged. The masks are ``sdpa``'s own.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "alignloop_cpu_sdpa"
"""The attention implementation's name, as ``config._attn_implementation`` holds it."""


def cpu_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``transformers``' attention-function contract: ``query`` ``[B, H, Lq, D]``, ``key``
    and ``value`` ``[B, Hkv, Lk, D]`` (``H`` a multiple of ``Hkv``), ``attention_mask``
    boolean or additive, broadcastable to ``[B, 1, Lq, Lk]``, or None for causal; returns
    ``[B, Lq, H, D]`` in float32 on the CPU, and None for the attention weights."""
    if (
        query.device.type != "cpu"
        or kwargs.get("position_bias") is not None
        or kwargs.get("cache") is not None
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    q_length = query.shape[2]
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    # As transformers: causal only where the mask is implied (no padding) and there is
    # more than one query; one decoded token attends to the whole cache.
    is_causal = bool(is_causal and attention_mask is None and q_length > 1)
    if is_causal and key.shape[2] > q_length:  # as transformers: the first Lq keys
        key, value = key[:, :, :q_length], value[:, :, :q_length]
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()  # an additive mask, in the products' dtype
    attend = functools.partial(
        _float32_attention,
        attention_mask=attention_mask,
        dropout=dropout,
        scaling=scaling,
        is_causal=is_causal,
    )
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        # Recomputed in the backward (selective recomputation): what stays for it is the
        # three inputs as they came, not their float32 copies, the output and its
        # log-sum-exp; the core is a few percent of a layer's products.
        out = checkpoint(attend, query, key, value, use_reentrant=False)
    else:
        out = attend(query, key, value)
    return out.transpose(1, 2).contiguous(), None


def _float32_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
    is_causal: bool,
) -> torch.Tensor:
    """torch's ``scaled_dot_product_attention`` on float32 copies, autocast off: ``[B, H,
    Lq, D]``."""
    with torch.autocast("cpu", enabled=False):
        return F.scaled_dot_product_attention(
            query.float(),
            key.float(),
            value.float(),
            attn_mask=attention_mask,
            dropout_p=dropout,
            scale=scaling,
            is_causal=is_causal,
            enable_gqa=query.shape[1] != key.shape[1],
        )


AttentionInterface.register(NAME, cpu_sdpa_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_cpu_attention(model: PreTrainedModel) -> bool:
    """Give ``model`` (and its sub-models) this implementation where it runs ``sdpa``;
    returns whether it did. Any other implementation (``eager``, flash-attention kernels)
    is left as chosen: it was chosen on purpose, or ``sdpa`` is not supported."""
    if model.config._attn_implementation != "sdpa":
        return False
    model.set_attn_implementation(NAME)
    return True
