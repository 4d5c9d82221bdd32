"""The CPU attention implementation: a hand case, transformers' sdpa's numbers in float32
(prefill with padding, causal without a mask, a decode step, gradients), float32 products
under bfloat16 autocast, and which models switch to it."""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tests.fixtures.tiny_llama import tiny_llama
from trainer.common.cpu_attention import NAME, cpu_sdpa_attention, use_cpu_attention

# Four query heads over two KV heads, as a grouped-query Llama layer.
LAYER = types.SimpleNamespace(num_key_value_groups=2, is_causal=True, layer_idx=0)


def _qkv(batch: int, q_len: int, kv_len: int, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(0)
    shapes = ((batch, 4, q_len, 8), (batch, 2, kv_len, 8), (batch, 2, kv_len, 8))
    return [torch.randn(s, generator=g).to(dtype).requires_grad_(grad) for s in shapes]


def _padded_mask(batch: int, q_len: int, kv_len: int) -> torch.Tensor:
    """Causal over the last ``q_len`` positions, row 0 left-padded by 2 (as the decode
    loop pads prompts): ``[B, 1, Lq, Lk]`` booleans."""
    causal = torch.ones(kv_len, kv_len, dtype=torch.bool).tril()[kv_len - q_len :]
    mask = causal.expand(batch, 1, q_len, kv_len).clone()
    mask[0, :, :, :2] = False
    mask[0, :, : max(0, 2 - (kv_len - q_len)), :] = True  # padding queries: see everything
    return mask


def test_hand_case_two_query_heads_on_one_kv_head():
    """One KV head for two query heads; keys ``[0, ln 3]``, values ``[4, 8]``, scale 1:
    the query 1 weighs the keys 1/4, 3/4 (7); the query 0 evenly (6); masking the
    second key leaves its value alone (4)."""
    layer = types.SimpleNamespace(num_key_value_groups=2, is_causal=True)
    query = torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1)
    key = torch.tensor([0.0, math.log(3.0)]).reshape(1, 1, 2, 1)
    value = torch.tensor([4.0, 8.0]).reshape(1, 1, 2, 1)
    out, weights = cpu_sdpa_attention(layer, query, key, value, None, scaling=1.0)
    assert weights is None
    torch.testing.assert_close(out.reshape(2), torch.tensor([7.0, 6.0]))
    first_only = torch.tensor([True, False]).reshape(1, 1, 1, 2)
    out, _ = cpu_sdpa_attention(layer, query, key, value, first_only, scaling=1.0)
    torch.testing.assert_close(out.reshape(2), torch.tensor([4.0, 4.0]))


@pytest.mark.parametrize(
    "q_len, kv_len, masked",
    [(6, 6, True), (6, 6, False), (1, 7, True)],
    ids=["padded prefill", "causal, no mask", "decode step"],
)
def test_float32_numbers_and_gradients_are_sdpas(q_len, kv_len, masked):
    """In float32 the result and the gradients of query, key and value are those of
    transformers' sdpa (which copies the KV heads out to the query heads)."""
    mask = _padded_mask(3, q_len, kv_len) if masked else None
    ours_in = _qkv(3, q_len, kv_len, grad=True)
    theirs_in = [t.detach().clone().requires_grad_(True) for t in ours_in]
    ours, _ = cpu_sdpa_attention(LAYER, *ours_in, mask, scaling=0.3)
    theirs, _ = sdpa_attention_forward(LAYER, *theirs_in, mask, scaling=0.3)
    assert ours.shape == (3, q_len, 4, 8)
    torch.testing.assert_close(ours, theirs)
    upstream = torch.linspace(-1, 1, ours.numel()).reshape(ours.shape)
    ours.backward(upstream)
    theirs.backward(upstream)
    for mine, other in zip(ours_in, theirs_in, strict=True):
        torch.testing.assert_close(mine.grad, other.grad)


def test_bfloat16_autocast_computes_in_float32():
    """Under CPU bfloat16 autocast, bfloat16 inputs give the float32 attention of those
    very inputs (sdpa's own would round its products and output to bfloat16)."""
    mask = _padded_mask(2, 5, 5)
    query, key, value = _qkv(2, 5, 5, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, _ = cpu_sdpa_attention(LAYER, query, key, value, mask, scaling=0.3)
        stock, _ = sdpa_attention_forward(LAYER, query, key, value, mask, scaling=0.3)
    exact, _ = sdpa_attention_forward(
        LAYER, query.float(), key.float(), value.float(), mask, scaling=0.3
    )
    assert ours.dtype == torch.float32 and stock.dtype == torch.bfloat16
    torch.testing.assert_close(ours, exact)
    assert (stock.float() - exact).abs().max() > (ours - exact).abs().max()


def test_the_backward_keeps_the_inputs_not_the_float32_output():
    """With a gradient, the attention core is recomputed in the backward: what the graph
    keeps is the bfloat16 inputs (no float32 copy of them, no output), and the gradients
    are those of the pass that keeps everything, bit for bit."""
    mask = _padded_mask(2, 5, 5)
    inputs = _qkv(2, 5, 5, dtype=torch.bfloat16, grad=True)
    kept: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ours, _ = cpu_sdpa_attention(LAYER, *inputs, mask, scaling=0.3)
    kept_floats = [t for t in kept if t.is_floating_point()]
    assert {t.dtype for t in kept_floats} == {torch.bfloat16}
    assert {t.data_ptr() for t in kept_floats} <= {t.data_ptr() for t in inputs}
    upstream = torch.linspace(-1, 1, ours.numel()).reshape(ours.shape)
    ours.backward(upstream)

    plain_in = [t.detach().clone().requires_grad_(True) for t in inputs]
    plain = F.scaled_dot_product_attention(
        *(t.float() for t in plain_in), attn_mask=mask, scale=0.3, enable_gqa=True
    )
    plain.transpose(1, 2).backward(upstream)
    for mine, other in zip(inputs, plain_in, strict=True):
        assert torch.equal(mine.grad, other.grad)


def test_an_additive_bfloat16_mask_masks_as_the_boolean_one():
    """A float mask (0 where attended, the dtype's minimum elsewhere) in bfloat16, as some
    mask builders make for a bfloat16 model, masks the float32 products the same."""
    mask = _padded_mask(2, 5, 5)
    additive = torch.zeros(mask.shape, dtype=torch.bfloat16).masked_fill(
        ~mask, torch.finfo(torch.bfloat16).min
    )
    query, key, value = _qkv(2, 5, 5, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        boolean, _ = cpu_sdpa_attention(LAYER, query, key, value, mask, scaling=0.3)
        added, _ = cpu_sdpa_attention(LAYER, query, key, value, additive, scaling=0.3)
    torch.testing.assert_close(added, boolean)


def test_an_sdpa_model_switches_and_computes_the_same_logits():
    """A model on sdpa takes the implementation (its logits unchanged in float32, left
    padding included); an eager one keeps its own."""
    stock, switched = tiny_llama("sdpa"), tiny_llama("sdpa")
    assert use_cpu_attention(switched)
    assert switched.config._attn_implementation == NAME
    ids = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(1))
    attention = torch.ones_like(ids)
    attention[0, :3] = 0
    with torch.no_grad():
        want = stock(input_ids=ids, attention_mask=attention).logits
        got = switched(input_ids=ids, attention_mask=attention).logits
    keep = attention.bool()
    torch.testing.assert_close(got[keep], want[keep])

    eager = tiny_llama("eager")
    assert not use_cpu_attention(eager)
    assert eager.config._attn_implementation == "eager"
