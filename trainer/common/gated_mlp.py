"""The gated MLP's SiLU product, keeping two tensors for its backward instead of four.

A Llama-style MLP computes ``down(silu(gate(x)) * up(x))``. Autograd keeps, per token and
layer, ``gate(x)`` (for the SiLU's backward), ``silu(gate(x))`` and ``up(x)`` (for the
product's) and the product (for ``down``'s LoRA gradients): four tensors of the MLP's
width, the widest a layer keeps. Here only ``gate(x)`` and ``up(x)`` are kept:

* :class:`SiluAndMul` computes the SiLU again in its backward, an elementwise pass, with
  autograd's own operations in autograd's order (the same gradients bit for bit);
* the product ``down`` keeps is replaced, through saved-tensor hooks, by a recipe holding
  the ``gate(x)`` and ``up(x)`` already kept, and computed again, with the forward's own
  operations, when ``down``'s backward asks for it. Not inside a checkpointed layer
  (:func:`~trainer.common.activation_checkpointing.inside_checkpoint`), which keeps
  nothing of the layer anyway.

Measured: docs/benchmarks.md, "Fewer activations kept for the update: the memory target at
SmolLM2 by default" (the SiLU) and "A CPU without bfloat16" (the product).

:func:`fuse_gated_mlps` switches every MLP whose ``forward`` is ``transformers``' Llama one
(Llama, Mistral, Qwen2, SmolLM2 and the other copies of it, compared by bytecode) and whose
activation is the SiLU; any other MLP is left as it is.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from transformers.activations import SiLUActivation
from transformers.models.llama.modeling_llama import LlamaMLP

from trainer.common.activation_checkpointing import inside_checkpoint


class SiluAndMul(torch.autograd.Function):
    """``silu(gate) * up``, keeping ``gate`` and ``up`` for the backward."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return grad_gate, grad * F.silu(gate)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``: through :class:`SiluAndMul` where a gradient is recorded."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SiluAndMul.apply(gate, up)
    return F.silu(gate) * up


class _Product:
    """What the down projection keeps instead of the product: its two factors' tensors,
    which :class:`SiluAndMul` keeps anyway, and the shape the product was kept in."""

    __slots__ = ("gate", "shape", "up")

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, shape: torch.Size) -> None:
        self.gate, self.up, self.shape = gate, up, shape


def recomputed_product(
    product: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
) -> torch.autograd.graph.saved_tensors_hooks:
    """Saved-tensor hooks under which any tensor saved that is ``product`` (itself, or a
    contiguous reshape of it: the same memory, the same number of elements) is kept as a
    :class:`_Product` and computed again, ``silu(gate) * up``, when the backward unpacks it.
    ``product`` must be ``silu(gate) * up`` as :func:`silu_and_mul` computed it, so the
    numbers computed again are the same bits. Every other saved tensor is kept as it is."""

    # The product's address, not the product: each saved tensor's record holds these hooks
    # until the backward, and a reference here would keep the product alive through them.
    where = None
    if product.is_contiguous():
        where = (product.data_ptr(), product.numel(), product.dtype)

    def pack(t: torch.Tensor) -> torch.Tensor | _Product:
        same = where == (t.data_ptr(), t.numel(), t.dtype) and t.is_contiguous()
        return _Product(gate, up, t.shape) if same else t

    def unpack(kept: torch.Tensor | _Product) -> torch.Tensor:
        if isinstance(kept, _Product):
            return (F.silu(kept.gate) * kept.up).reshape(kept.shape)
        return kept

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _gated_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    product = silu_and_mul(gate, up)
    if not product.requires_grad or inside_checkpoint():
        return self.down_proj(product)
    with recomputed_product(product, gate, up):
        return self.down_proj(product)


def _is_llama_gated_mlp(module: torch.nn.Module) -> bool:
    forward = getattr(type(module).forward, "__code__", None)
    llama = LlamaMLP.forward.__code__
    return (
        forward is not None
        and (forward.co_code, forward.co_names) == (llama.co_code, llama.co_names)
        and isinstance(getattr(module, "act_fn", None), SiLUActivation | torch.nn.SiLU)
    )


def fuse_gated_mlps(model: torch.nn.Module) -> int:
    """Run every Llama-style SiLU MLP of ``model`` through :func:`silu_and_mul`; returns
    how many. Idempotent (a switched MLP's instance ``forward`` is this module's)."""
    switched = 0
    for module in model.modules():
        if _is_llama_gated_mlp(module):
            module.forward = types.MethodType(_gated_forward, module)
            switched += 1
    return switched
