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


def test_under_bfloat16_the_products_run_in_it_and_the_gradients_come_back_in_float32():
    """With the autocast dtype given, the output is bfloat16 and within bfloat16's rounding
    of the float32 result, and every gradient has its input's dtype and LoRA's value to
    bfloat16 precision."""
    x, weight, bias, lora_a, lora_b = _inputs()
    grad_out = torch.linspace(-1, 1, 3 * 5 * 4).reshape(3, 5, 4)
    y = FoldedLoraLinear.apply(x, weight, bias, lora_a, lora_b, 2.0, torch.bfloat16)
    y.backward(grad_out)
    assert y.dtype == torch.bfloat16
    assert x.grad.dtype == lora_a.grad.dtype == lora_b.grad.dtype == torch.float32
    x2, a2, b2 = (t.detach().clone().requires_grad_(True) for t in (x, lora_a, lora_b))
    y2 = x2 @ weight.T + bias + 2.0 * (x2 @ a2.T) @ b2.T
    y2.backward(grad_out)
    # bfloat16 keeps 8 bits of mantissa: a relative error of a few 1e-3 per product.
    close = {"rtol": 3e-2, "atol": 3e-2 * max(float(y2.abs().max()), 1.0)}
    torch.testing.assert_close(y.float(), y2.detach(), **close)
    grads = zip((x.grad, lora_a.grad, lora_b.grad), (x2.grad, a2.grad, b2.grad), strict=True)
    for mine, theirs in grads:
        scale = float(theirs.abs().max())
        torch.testing.assert_close(mine, theirs, rtol=3e-2, atol=3e-2 * scale)
    # ... and it really ran in bfloat16: float32 gives other numbers.
    assert not torch.equal(y.float(), y2.detach())


def _saved_inputs(y: torch.Tensor, x_shape: torch.Size) -> list[torch.Tensor]:
    return [t for t in y.grad_fn.saved_tensors if t.shape == x_shape]


def test_layers_reading_one_input_keep_one_cast_copy_of_it():
    """q, k and v (gate and up) read the same hidden state: under bfloat16 their backwards
    keep one bfloat16 copy of it between them, not one each, and each layer's gradients are
    what a layer of its own gives."""
    x, weight, bias, lora_a, lora_b = _inputs()
    others = [(weight * k, lora_a.detach() * k, lora_b.detach() * k) for k in (0.5, 2.0)]
    outs = [FoldedLoraLinear.apply(x, weight, bias, lora_a, lora_b, 2.0, torch.bfloat16)]
    for w, a, b in others:
        outs.append(FoldedLoraLinear.apply(x, w, bias, a, b, 2.0, torch.bfloat16))
    kept = {t.data_ptr() for y in outs for t in _saved_inputs(y, x.shape)}
    assert len(kept) == 1
    (kept_x,) = _saved_inputs(outs[0], x.shape)
    assert kept_x.dtype == torch.bfloat16

    sum(y.float().sum() for y in outs).backward()
    shared_grad = x.grad.clone()
    x_alone = x.detach().clone().requires_grad_(True)
    for w, a, b in [(weight, lora_a.detach(), lora_b.detach()), *others]:
        x_own = x_alone * 1.0  # a tensor of its own per layer: nothing to share
        FoldedLoraLinear.apply(x_own, w, bias, a, b, 2.0, torch.bfloat16).float().sum().backward()
    torch.testing.assert_close(shared_grad, x_alone.grad)


def test_an_input_written_in_place_is_cast_again():
    """A cast is shared only while its input is unchanged: written in place in between
    (while the first cast is still kept for a backward), the next layer reads the new
    values."""
    x_leaf, weight, _, lora_a, lora_b = _inputs()
    x = x_leaf * 1.0
    first = FoldedLoraLinear.apply(x, weight, None, lora_a, lora_b, 2.0, torch.bfloat16)
    x.mul_(4.0)
    second = FoldedLoraLinear.apply(x, weight, None, lora_a, lora_b, 2.0, torch.bfloat16)
    torch.testing.assert_close(second.float(), 4.0 * first.float(), rtol=2e-2, atol=2e-2)
