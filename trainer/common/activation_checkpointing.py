"""Activation checkpointing of a ``transformers`` model's decoder layers, in eval mode too.

A training backward needs what every layer's forward computed: per token, every layer's
projections, MLP activations and attention inputs (hundreds of KB per token for a model of
tens of millions of parameters). Checkpointed, a layer keeps only its input; the backward
runs the layer's forward again, one layer at a time, and frees it before the next. The
update's peak then holds one layer's activations instead of all of them, for one more
forward pass of compute (measured: docs/benchmarks.md, "jemalloc and activation
checkpointing: both PPO targets at 31 M").

``transformers``' own switch (``gradient_checkpointing_enable``) applies only to a module in
training mode. The PPO trainer keeps its models in eval mode (no dropout: PPO's ratios
compare like with like), so this wraps each layer's ``forward`` instead: checkpointed
where a gradient is being recorded, untouched under ``torch.no_grad`` (decoding, scoring).
A pass given a KV cache runs as it is (a replay would extend the cache twice), unless the
cache is only read (a shared prompt prefix's, :mod:`trainer.common.shared_prefix`). torch's
non-reentrant checkpoint replays the autocast state of the forward and needs no input to
require a gradient (a frozen base under a LoRA adapter is fine).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

_MARK = "_alignloop_checkpointed"
_depth = 0  # checkpointed forwards running now (the first pass or the backward's replay)


def inside_checkpoint() -> bool:
    """Whether a checkpointed layer's forward is running: its first pass, whose saved
    tensors torch's checkpoint drops, or the replay in the backward, whose saved tensors it
    collects. Code that keeps tensors for the backward its own way (saved-tensor hooks)
    stands aside there: the checkpoint's own hooks must see every tensor saved."""
    return _depth > 0


def _marked(forward: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        global _depth
        _depth += 1
        try:
            return forward(*args, **kwargs)
        finally:
            _depth -= 1

    return run


def _checkpointed(
    forward: Callable[..., Any], replay_state: Callable[[], AbstractContextManager[None]] | None
) -> Callable[..., Any]:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        # A pass that extends a KV cache cannot be replayed: it would extend it twice. One
        # that only reads it (a shared prefix: trainer.common.shared_prefix) can.
        cache = kwargs.get("past_key_values")
        if not torch.is_grad_enabled() or not (
            cache is None or getattr(cache, "replayable", False)
        ):
            return forward(*args, **kwargs)
        replay = replay_state() if replay_state is not None else contextlib.nullcontext()
        return checkpoint(
            _marked(forward),
            *args,
            use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), replay),
            **kwargs,
        )

    setattr(run, _MARK, True)
    return run


def checkpoint_layers(
    model: torch.nn.Module,
    every: int = 1,
    replay_state: Callable[[], AbstractContextManager[None]] | None = None,
) -> int:
    """Checkpoint the decoder layers of ``model`` (each ``GradientCheckpointingLayer``, what
    ``transformers`` checkpoints itself): the first and every ``every``-th one after it
    (1: all of them; 2: every other one, half the replayed forward for about half the
    activations saved). Returns how many layers are checkpointed. Idempotent for one
    ``every``; a layer checkpointed once stays so, with the ``replay_state`` it got.

    ``replay_state``: called as each checkpointed forward runs; the backward replays that
    forward inside the context it returns. It restores what the layer's output depends on
    besides its inputs and weights, where that may change between the forward and the
    backward: which LoRA adapter is active, when passes of two adapters (an actor and a
    critic) run before one backward. Without it the replay runs in the state of the
    backward's time."""
    if every < 1:
        raise ValueError(f"every must be at least 1, not {every}")
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for module in layers[::every]:
        if not getattr(module.forward, _MARK, False):
            module.forward = _checkpointed(module.forward, replay_state)
    return sum(1 for m in layers if getattr(m.forward, _MARK, False))
