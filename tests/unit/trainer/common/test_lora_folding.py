"""FoldedLoraLinear on hand-sized tensors: LoRA's gradients, and no folded copy of the
weight kept between the forward and the backward."""

from __future__ import annotations

import torch

from trainer.common.lora_folding import FoldedLoraLinear


def _inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 6, generator=g, requires_grad=True)
    weight = torch.randn(4, 6, generator=g)
    bias = torch.randn(4, generator=g)
    lora_a = torch.randn(2, 6, generator=g, requires_grad=True)
    lora_b = torch.randn(4, 2, generator=g, requires_grad=True)
    return x, weight, bias, lora_a, lora_b


def test_gradients_are_loras_own():
    """``x W^T + s (x A^T) B^T`` through autograd and through the folded function agree in
    value and in the gradients of x, A and B."""
    x, weight, bias, lora_a, lora_b = _inputs()
    grad_out = torch.linspace(-1, 1, 3 * 5 * 4).reshape(3, 5, 4)
    scaling = 2.0

    y = FoldedLoraLinear.apply(x, weight, bias, lora_a, lora_b, scaling)
    y.backward(grad_out)
    folded = (y.detach(), x.grad, lora_a.grad, lora_b.grad)

    x2, a2, b2 = (t.detach().clone().requires_grad_(True) for t in (x, lora_a, lora_b))
    y2 = x2 @ weight.T + bias + scaling * (x2 @ a2.T) @ b2.T
    y2.backward(grad_out)
    for mine, theirs in zip(folded, (y2.detach(), x2.grad, a2.grad, b2.grad), strict=True):
        torch.testing.assert_close(mine, theirs)


def test_the_backward_keeps_the_base_weight_not_a_folded_copy():
    """What autograd keeps from forward to backward is the frozen weight itself (the same
    storage): a copy per layer would hold a whole extra model per micro-batch in flight."""
    x, weight, bias, lora_a, lora_b = _inputs()
    y = FoldedLoraLinear.apply(x, weight, bias, lora_a, lora_b, 2.0)
    saved = y.grad_fn.saved_tensors
    weight_sized = [t for t in saved if t.shape == weight.shape]
    assert [t.data_ptr() for t in weight_sized] == [weight.data_ptr()]
