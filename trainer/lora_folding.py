"""No-gradient passes with a LoRA adapter folded into the base weights.

A LoRA layer computes ``W x + s * B (A x)``: a full product, two thin ones (rank ``r``,
which run far below the CPU's matrix-product speed) and a scaled add over the whole
output. A pass that needs no gradient (scoring a rollout, the reward model, the decode
loop) can instead fold the adapter once, ``W' = W + s * B A``, and run each layer as one
product: on the demo model that takes a sixth off every such pass.

PEFT's ``merge_adapter`` / ``unmerge_adapter`` fold in place, and unmerging subtracts
``s * B A`` again: each round trip would leave a rounding error in the base weights, and
the frozen reference (the base, adapters disabled) must stay the base model bit for bit.
:func:`folded` never writes the base weights. It swaps each layer's weight tensor for a
folded copy, runs the body with every adapter disabled (each LoRA layer then calls only
its base layer), and puts the very same tensors back afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from peft import PeftModel


def _foldable_layers(peft_model: PeftModel, adapter: str) -> list[torch.nn.Module] | None:
    """The LoRA layers that carry ``adapter``, or None when one of them cannot be folded
    into a plain weight (DoRA's magnitude vector, a LoRA bias, a non-linear layer type)."""
    layers = []
    for module in peft_model.modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or adapter not in lora_a:
            continue
        plain = (
            hasattr(module, "get_delta_weight")
            and isinstance(getattr(module, "base_layer", None), torch.nn.Linear)
            and not getattr(module, "use_dora", {}).get(adapter, False)
            and not getattr(module, "lora_bias", {}).get(adapter, False)
        )
        if not plain:
            return None
        layers.append(module)
    return layers


@contextlib.contextmanager
def folded(peft_model: PeftModel, adapter: str) -> Iterator[None]:
    """Run the body with ``adapter`` folded into the base weights (no gradient may flow).

    Inside, the model computes what it computes with ``adapter`` active, up to float
    rounding (``x W'^T`` instead of ``x W^T + s (x A^T) B^T``). An adapter that cannot be
    folded (see :func:`_foldable_layers`) is simply made active instead.
    """
    if torch.is_grad_enabled():
        raise RuntimeError("folded() is for no-gradient passes: the folded weights are copies")
    layers = _foldable_layers(peft_model, adapter)
    if layers is None:
        with active(peft_model, adapter):
            yield
        return
    # Normal tensors even under inference_mode: they become Parameters' data for a while.
    with torch.inference_mode(False), torch.no_grad():
        weights = [layer.base_layer.weight for layer in layers]
        copies = [layer.base_layer.weight + layer.get_delta_weight(adapter) for layer in layers]
    originals = [w.data for w in weights]
    try:
        for weight, copy in zip(weights, copies, strict=True):
            weight.data = copy
        with peft_model.disable_adapter():
            yield
    finally:
        for weight, original in zip(weights, originals, strict=True):
            weight.data = original


@contextlib.contextmanager
def active(peft_model: PeftModel, adapter: str) -> Iterator[None]:
    """Run the body with ``adapter`` active (as LoRA layers), then the previous one again."""
    previous = peft_model.active_adapter
    if previous != adapter:
        peft_model.set_adapter(adapter)
    try:
        yield
    finally:
        if previous != adapter:
            peft_model.set_adapter(previous)


def applied(peft_model: PeftModel, adapter: str) -> contextlib.AbstractContextManager[None]:
    """Run the body with ``adapter`` on the base: :func:`folded` when no gradient can flow,
    :func:`active` when one may."""
    return active(peft_model, adapter) if torch.is_grad_enabled() else folded(peft_model, adapter)
