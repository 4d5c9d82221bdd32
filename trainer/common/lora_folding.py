"""LoRA adapters folded into the base weights, for passes with and without a gradient.

A LoRA layer computes ``W x + s * B (A x)``: a full product, two thin ones (rank ``r``,
which run far below the CPU's matrix-product speed) and a scaled add over the whole
output. Folding the adapter, ``W' = W + s * B A`` (a tiny product), makes each layer one
full product instead:

* **no gradient** (scoring a rollout, the reward model, the decode loop): :func:`folded`
  runs a whole pass on folded copies of the weights, faster on the demo model;
* **with a gradient** (the PPO update): :func:`fold_in_training` makes each LoRA linear
  layer compute ``x W'^T`` through :class:`FoldedLoraLinear`, whose backward gives exactly
  LoRA's gradients (``dA = s (g B)^T x``, ``dB = s g^T (x A^T)``, ``dx = g W'``) with two
  thin products fewer than PEFT's forward + autograd and no elementwise passes over the
  output: a faster update on the demo model.

Measured: docs/benchmarks.md, "Figures quoted in code". Both were measured on the CPU
only, so both are used only there (:func:`trainer.common.device.folding_pays`): on another
device :func:`folded` makes the adapter active instead, and the trainer leaves
:func:`fold_in_training` off.

PEFT's ``merge_adapter`` / ``unmerge_adapter`` fold in place, and unmerging subtracts
``s * B A`` again: each round trip would leave a rounding error in the base weights, and
the frozen reference (the base, adapters disabled) must stay the base model bit for bit.
:func:`folded` never writes the base weights. It swaps each layer's weight tensor for a
folded copy, runs the body with every adapter disabled (each LoRA layer then calls only
its base layer), and puts the very same tensors back afterwards.
"""

from __future__ import annotations

import contextlib
import types
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear

from trainer.common.device import folding_pays, module_device
from trainer.common.onednn_layout import laid_out_copy, layout_pays, multiplying_by


def _vanilla(layer: torch.nn.Module, adapter: str) -> bool:
    """Whether ``layer`` is a LoRA linear layer to which ``adapter`` adds exactly
    ``s * B A`` to the weight (no variant such as DoRA, no LoRA bias, no transposed base)."""
    return (
        isinstance(layer, LoraLinear)
        and adapter in layer.lora_A
        and adapter not in layer.lora_variant
        and not getattr(layer, "lora_bias", {}).get(adapter, False)
        and not layer.fan_in_fan_out
    )


def _foldable_layers(peft_model: PeftModel, adapter: str) -> list[LoraLinear] | None:
    """The LoRA layers that carry ``adapter``, or None when one of them is not
    :func:`_vanilla` (it cannot be folded into a plain weight)."""
    layers: list[LoraLinear] = []
    for module in peft_model.modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or adapter not in lora_a:
            continue
        if not isinstance(module, LoraLinear) or not _vanilla(module, adapter):
            return None
        layers.append(module)
    return layers


def _weight(linear: torch.nn.Module) -> torch.Tensor:
    weight = linear.weight
    assert isinstance(weight, torch.Tensor)  # a vanilla LoRA layer's base, A and B are Linear
    return weight


def _plain_bases(
    layers: list[LoraLinear], dtype: torch.dtype | None, rows: int
) -> list[torch.nn.Linear]:
    """The layers' base layers where a pass of ``rows`` rows under ``dtype`` can multiply
    by their weights laid out for oneDNN (:func:`~trainer.common.onednn_layout.layout_pays`),
    each a plain ``nn.Linear`` (not a quantised or otherwise rewritten one); else none."""
    plain = [layer.base_layer for layer in layers if type(layer.base_layer) is torch.nn.Linear]
    if not plain or len(plain) < len(layers) or not layout_pays(plain[0].weight, dtype, rows):
        return []
    return plain


def _base_weight(layer: LoraLinear) -> torch.Tensor:
    return _weight(layer.base_layer)


def fold(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``W + s B A``, in ``dtype`` (None: ``W``'s): the one expression every folding here
    computes, so a no-gradient pass and the update's forward and backward multiply by the
    same weights bit for bit. One ``addmm`` reads ``W`` once; ``W + (B A) s`` would pass
    over a weight-sized tensor three times."""
    with torch.autocast(weight.device.type, enabled=False):
        folded_weight = torch.addmm(weight, lora_b, lora_a, alpha=scaling)
    return folded_weight if dtype is None else folded_weight.to(dtype)


@contextlib.contextmanager
def _weights_swapped(
    peft_model: PeftModel, layers: list[LoraLinear], copies: list[torch.Tensor]
) -> Iterator[None]:
    """Run the body with each layer's base weight tensor holding its copy and every adapter
    disabled (each LoRA layer then calls only its base layer); the very same tensors are
    back afterwards."""
    weights = [_base_weight(layer) for layer in layers]
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
def folded(
    peft_model: PeftModel,
    adapter: str,
    dtype: torch.dtype | None = None,
    layout_rows: int | None = None,
) -> Iterator[None]:
    """Run the body with ``adapter`` folded into the base weights (no gradient may flow).

    Inside, the model computes what it computes with ``adapter`` active, up to float
    rounding (``x W'^T`` instead of ``x W^T + s (x A^T) B^T``). An adapter that cannot be
    folded (see :func:`_foldable_layers`), or one on a device where folding is not the
    faster path (:func:`~trainer.common.device.folding_pays`), is simply made active instead.

    ``dtype``: the body's autocast dtype, when it runs under one. The folded copies are then
    made in that dtype, once: autocast would cast a float32 copy to the very same values in
    every call (it caches casts only of weights that take a gradient), which in a decode
    loop is a pass over every weight per generated token.

    ``layout_rows`` (a decode loop's batch): where that pays
    (:func:`~trainer.common.onednn_layout.layout_pays`: few rows), each folded
    copy is laid out for oneDNN's kernels and the base layers multiply by it instead (their
    weights stay the base's); the folded copy is dropped as soon as it is laid out, so the
    pass holds one copy of the weights, as without it. (The LM head, which is not folded,
    is laid out by its caller: :meth:`trainer.ppo.models.PolicyModels.adapter`.)
    """
    if torch.is_grad_enabled():
        raise RuntimeError("folded() is for no-gradient passes: the folded weights are copies")
    if adapter not in peft_model.peft_config:  # else: silently the base model
        raise KeyError(f"no adapter {adapter!r} on this model")
    layers = None
    if folding_pays(module_device(peft_model)):
        layers = _foldable_layers(peft_model, adapter)
    if layers is None:
        with active(peft_model, adapter):
            yield
        return
    if layout_rows is not None and (bases := _plain_bases(layers, dtype, layout_rows)):
        with _folded_laid_out(peft_model, adapter, layers, bases, layout_rows, dtype):
            yield
        return
    # Normal tensors even under inference_mode: they become Parameters' data for a while.
    # One layer at a time: a float32 copy of every weight at once, cast afterwards, would
    # briefly hold the model twice over (the allocator keeps that high-water mark).
    with torch.inference_mode(False), torch.no_grad():
        copies = [
            fold(
                _base_weight(layer),
                _weight(layer.lora_A[adapter]),
                _weight(layer.lora_B[adapter]),
                layer.scaling[adapter],
                dtype,
            )
            for layer in layers
        ]
    with _weights_swapped(peft_model, layers, copies):
        yield


@contextlib.contextmanager
def _folded_laid_out(
    peft_model: PeftModel,
    adapter: str,
    layers: list[LoraLinear],
    bases: list[torch.nn.Linear],
    rows: int,
    dtype: torch.dtype | None,
) -> Iterator[None]:
    """:func:`folded`'s body on the folded weights (in ``dtype``, as :func:`folded` makes
    them) laid out for oneDNN: one layer at a time, each folded copy laid out and dropped
    (the pass holds one copy of the weights)."""
    laid_out = [
        (
            base,
            laid_out_copy(
                fold(
                    base.weight,
                    _weight(layer.lora_A[adapter]),
                    _weight(layer.lora_B[adapter]),
                    layer.scaling[adapter],
                    dtype,
                ),
                rows,
            ),
        )
        for layer, base in zip(layers, bases, strict=True)
    ]
    with multiplying_by(laid_out), peft_model.disable_adapter():
        yield


@contextlib.contextmanager
def cast_base(peft_model: PeftModel, dtype: torch.dtype | None) -> Iterator[None]:
    """Run the body on the base model (every adapter disabled) with the LoRA layers' base
    weights cast to ``dtype`` once (no gradient may flow): the numbers autocast to ``dtype``
    gives, without casting every weight again in every call (autocast caches casts only of
    weights that take a gradient). With no ``dtype`` (no autocast: nothing to cast), or where
    :func:`folded` would not fold (another device), the adapters are simply disabled."""
    if torch.is_grad_enabled():
        raise RuntimeError("cast_base() is for no-gradient passes: the cast weights are copies")
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLinear)]
    if dtype is None or not (layers and folding_pays(module_device(peft_model))):
        with peft_model.disable_adapter():
            yield
        return
    with torch.inference_mode(False), torch.no_grad():
        copies = [_base_weight(layer).to(dtype) for layer in layers]
    with _weights_swapped(peft_model, layers, copies):
        yield


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


# --- passes with a gradient ---------------------------------------------------------------


class _SharedCast:
    """The autocast-dtype copy of the last input cast, handed to every layer that reads the
    same input while that copy is alive.

    A transformer layer feeds one normalised hidden state to several products (q, k and v;
    gate and up), and each product keeps its input, in the dtype it ran in, for its
    backward (LoRA's ``dA`` and ``dB`` read it). Cast by each, that is one copy kept per
    product; cast once, one copy shared. Weak references only: the cache keeps nothing
    alive (where nothing else keeps the copy, as in a checkpointed forward, the next layer
    casts again), and an input written in place since (its version moved on) is cast again.
    """

    def __init__(self) -> None:
        self._source: weakref.ref[torch.Tensor] | None = None
        self._version = -1
        self._cast: weakref.ref[torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if x.dtype == dtype:
            return x
        cast = self._cast() if self._cast is not None else None
        source = self._source() if self._source is not None else None
        if cast is not None and source is x and x._version == self._version and cast.dtype == dtype:
            return cast
        cast = x.to(dtype)
        self._source, self._version, self._cast = weakref.ref(x), x._version, weakref.ref(cast)
        return cast


_shared_cast = _SharedCast()


class FoldedLoraLinear(torch.autograd.Function):
    """``y = x (W + s B A)^T + bias`` with LoRA's gradients for ``x``, ``A`` and ``B``
    (``W`` and ``bias`` are frozen: no gradient). ``x`` ``[..., in]``, ``W`` ``[out, in]``,
    ``A`` ``[r, in]``, ``B`` ``[out, r]``.

    ``dtype`` (the autocast dtype the layer runs under, or None): the products run in it,
    on ``x`` and the folded weight cast once, as autocast runs a linear layer; each
    gradient comes back in its input's own dtype (float32 for the adapter's weights)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        # Explicit dtypes, not the caller's autocast: the fold itself stays float32.
        with torch.autocast(x.device.type, enabled=False):
            folded_weight = fold(weight, lora_a, lora_b, scaling, dtype)
            x_in = x
            if dtype is not None:
                x_in = _shared_cast(x, dtype)
                bias = None if bias is None else bias.to(dtype)
            # The base weight, not the folded copy, is kept for the backward, which folds
            # again: one more rank-r product per layer instead of a copy of every weight of
            # the model held from each forward to its backward (docs/benchmarks.md, "PPO at
            # scale").
            ctx.save_for_backward(x_in, weight, lora_a, lora_b)
            ctx.scaling, ctx.dtype, ctx.x_dtype = scaling, dtype, x.dtype
            return F.linear(x_in, folded_weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, lora_a, lora_b = ctx.saved_tensors
        needs = ctx.needs_input_grad  # one per argument given (dtype may be left out)
        needs_x, needs_a, needs_b = needs[0], needs[3], needs[4]
        dtype = ctx.dtype or weight.dtype
        grad = grad.to(dtype)
        rows_grad = grad.reshape(-1, grad.shape[-1])  # [N, out]
        rows_x = x.reshape(-1, x.shape[-1])  # [N, in]
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        grad_x = grad_a = grad_b = None
        if needs_x:
            refolded = fold(weight, lora_a, lora_b, ctx.scaling, dtype)
            grad_x = (grad @ refolded).to(ctx.x_dtype)
        if needs_a:
            grad_a = (rows_grad @ b).T.mm(rows_x).mul_(ctx.scaling).to(lora_a.dtype)
        if needs_b:
            grad_b = rows_grad.T.mm(rows_x @ a.T).mul_(ctx.scaling).to(lora_b.dtype)
        return (grad_x, None, None, grad_a, grad_b, None, None)[: len(needs)]


def _folded_training_forward(layer: LoraLinear, x: torch.Tensor, *args: Any, **kwargs: Any):
    """A LoRA linear layer's forward: :class:`FoldedLoraLinear` when a gradient flows through
    one plain active adapter, PEFT's own forward in every other case."""
    adapters = layer.active_adapters
    plain = (
        torch.is_grad_enabled()
        and not (layer.disable_adapters or layer.merged or args or kwargs)
        and len(adapters) == 1
        and _vanilla(layer, adapters[0])
        and not (layer.training and getattr(layer.lora_dropout[adapters[0]], "p", 0.0) > 0)
    )
    if not plain:
        return type(layer).forward(layer, x, *args, **kwargs)
    name = adapters[0]
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    return FoldedLoraLinear.apply(
        x,
        layer.base_layer.weight,
        layer.base_layer.bias,
        layer.lora_A[name].weight,
        layer.lora_B[name].weight,
        layer.scaling[name],
        dtype,
    )


def fold_in_training(peft_model: PeftModel, enabled: bool = True) -> int:
    """Make every LoRA linear layer of ``peft_model`` run through :class:`FoldedLoraLinear`
    when a gradient flows (``enabled=False`` puts PEFT's forward back); returns how many
    layers changed."""
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLinear)]
    for layer in layers:
        if enabled:
            # An instance attribute shadows the class's forward; popping it restores PEFT's.
            layer.forward = types.MethodType(_folded_training_forward, layer)  # type: ignore[method-assign]  # on purpose, per instance
        else:
            layer.__dict__.pop("forward", None)
    return len(layers)
