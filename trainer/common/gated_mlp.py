"""The gated MLP's SiLU product, keeping three tensors for its backward instead of four.

A Llama-style MLP computes ``down(silu(gate(x)) * up(x))``. Autograd keeps, per token and
layer, ``gate(x)`` (for the SiLU's backward), ``silu(gate(x))`` and ``up(x)`` (for the
product's) and the product (for ``down``'s): four tensors of the MLP's width, the widest a
layer keeps. :class:`SiluAndMul` keeps ``gate(x)`` and ``up(x)`` and computes the SiLU again
in the backward, an elementwise pass: three tensors instead of four, and the same gradients
bit for bit (the backward runs autograd's own operations in autograd's order). Measured:
docs/benchmarks.md, "Fewer activations kept for the update: the memory target at SmolLM2 by
default".

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


def _gated_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(silu_and_mul(self.gate_proj(x), self.up_proj(x)))


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
