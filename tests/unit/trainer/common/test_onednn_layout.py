"""Linear layers multiplying by weights laid out for oneDNN, on hand-sized tensors: the same
products up to rounding, the laid-out copy (not the layer's weight) is what is read, and
every layer has its own forward back afterwards."""

from __future__ import annotations

import pytest
import torch

from serving.engine import cpu_multiplies_bf16
from trainer.common.onednn_layout import (
    MAX_ROWS,
    is_laid_out,
    laid_out_copy,
    layout_pays,
    multiplying_by,
)

pytestmark = pytest.mark.skipif(
    not layout_pays(torch.zeros(1), None, 1), reason="this torch has no oneDNN linear ops"
)


def _linear(seed: int, bias: bool = True) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(24, 40, bias=bias)


def test_the_layout_is_a_reorder_of_the_same_bits():
    weight = _linear(0).weight.detach()
    assert torch.equal(laid_out_copy(weight, 4).to_dense(), weight)


@pytest.mark.parametrize("bias", [True, False])
def test_a_laid_out_layer_computes_its_product_up_to_rounding(bias: bool):
    """Rows from 1 to past the layout's hint, in a 3-D batch: ``x W^T + b`` within float32
    rounding; after the body the layer's own forward, and exactly ``F.linear``, again."""
    linear = _linear(1, bias)
    x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = torch.nn.functional.linear(x, linear.weight, linear.bias)
        with multiplying_by([(linear, laid_out_copy(linear.weight, 4))]):
            for rows in (1, 4, 7):
                torch.testing.assert_close(linear(x[:, :rows]), plain[:, :rows])
        assert not is_laid_out(linear)
        assert torch.equal(linear(x), plain)


def test_the_laid_out_copy_is_read_not_the_layers_weight():
    """What :func:`~trainer.common.lora_folding.folded` relies on: the layer multiplies by
    the copy it was handed (there a folded adapter's weight), whatever its ``weight`` holds."""
    linear, other = _linear(3), _linear(4)
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), multiplying_by([(linear, laid_out_copy(other.weight, 5))]):
        out = linear(x)
    expected = torch.nn.functional.linear(x, other.weight, linear.bias)
    torch.testing.assert_close(out, expected.detach())


def test_a_failing_body_still_restores_every_layer():
    layers = [_linear(6), _linear(7)]
    copies = [(layer, laid_out_copy(layer.weight, 2)) for layer in layers]
    with torch.no_grad(), pytest.raises(ValueError, match="boom"), multiplying_by(copies):
        raise ValueError("boom")
    assert all("forward" not in vars(layer) for layer in layers)


def test_refused_where_a_gradient_could_flow_and_where_a_layer_is_already_laid_out():
    linear = _linear(8)
    copy = laid_out_copy(linear.weight, 2)
    with pytest.raises(RuntimeError, match="no-gradient"), multiplying_by([(linear, copy)]):
        pass
    with torch.no_grad(), multiplying_by([(linear, copy)]):
        with pytest.raises(RuntimeError, match="already"), multiplying_by([(linear, copy)]):
            pass
        assert "forward" in vars(linear)  # the outer layout is still in place
    assert "forward" not in vars(linear)


def test_only_float32_weights_in_products_of_few_rows_take_the_layout():
    """No autocast, or bfloat16 autocast where the CPU multiplies bfloat16 natively (the
    decision serving's engine makes); never float16, never a weight already cast."""
    weight = torch.zeros(4, 4)
    assert layout_pays(weight, None, MAX_ROWS)
    assert not layout_pays(weight, None, MAX_ROWS + 1)
    assert not layout_pays(weight.bfloat16(), None, 1)
    assert layout_pays(weight, torch.bfloat16, 1) == cpu_multiplies_bf16()
    assert not layout_pays(weight, torch.bfloat16, MAX_ROWS + 1)
    assert not layout_pays(weight, torch.float16, 1)


@pytest.mark.skipif(not cpu_multiplies_bf16(), reason="this CPU has no bfloat16 products")
@pytest.mark.parametrize("bias", [True, False])
def test_under_bfloat16_autocast_a_laid_out_layer_computes_autocasts_product(bias: bool):
    """The copy is of the weight cast to bfloat16 and the input is cast as autocast casts
    it: a float32 input (the residual stream) and a bfloat16 one (an earlier product's
    output) both give autocast's ``F.linear`` in bfloat16, up to a kernel's rounding."""
    linear = _linear(9, bias)
    x = torch.randn(6, 24, generator=torch.Generator().manual_seed(10))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = linear(x)
        with multiplying_by([(linear, laid_out_copy(linear.weight, 6, torch.bfloat16))]):
            for given in (x, x.bfloat16()):
                out = linear(given)
                assert out.dtype == torch.bfloat16
                torch.testing.assert_close(out, plain)
        assert not is_laid_out(linear)
