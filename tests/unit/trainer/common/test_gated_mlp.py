"""The gated MLP's SiLU product: gate and up the only tensors of the MLP's width kept for
the backward (the SiLU and the product computed again), the same numbers and gradients bit
for bit, and which MLPs switch."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tests.fixtures.tiny_llama import tiny_llama
from trainer.common import gated_mlp
from trainer.common.activation_checkpointing import checkpoint_layers
from trainer.common.gated_mlp import fuse_gated_mlps, silu_and_mul
from trainer.common.lora_folding import fold_in_training

IDS = torch.tensor([[3, 7, 1, 9, 4, 4, 2, 8], [5, 1, 1, 6, 2, 0, 0, 0]])
MASK = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])


def _kept(fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    kept: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    return out, kept


def test_hand_case_keeps_gate_and_up_and_gives_autograds_gradients():
    """gate 0 -> silu 0 (slope 1/2), gate ln 3 -> silu (3/4) ln 3; the product's gradient
    for up is silu(gate), for gate up * silu'(gate); only gate and up are kept."""
    gate = torch.tensor([0.0, float(torch.tensor(3.0).log())], requires_grad=True)
    up = torch.tensor([2.0, 4.0], requires_grad=True)
    out, kept = _kept(silu_and_mul, gate, up)
    log3 = float(torch.tensor(3.0).log())
    torch.testing.assert_close(out, torch.tensor([0.0, 0.75 * log3 * 4.0]))
    assert {t.data_ptr() for t in kept} == {gate.data_ptr(), up.data_ptr()}
    out.sum().backward()
    torch.testing.assert_close(up.grad, torch.tensor([0.0, 0.75 * log3]))
    slope = 0.75 * (1 + log3 * 0.25)  # sigmoid(g) (1 + g (1 - sigmoid(g)))
    torch.testing.assert_close(gate.grad, torch.tensor([2.0 * 0.5, 4.0 * slope]))


def test_bfloat16_gradients_are_autograds_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(6, 32, generator=g).bfloat16().requires_grad_(True) for _ in "ab")
    gate2, up2 = (t.detach().clone().requires_grad_(True) for t in (gate, up))
    upstream = torch.randn(6, 32, generator=g).bfloat16()
    out, kept = _kept(silu_and_mul, gate, up)
    out.backward(upstream)
    plain, plain_kept = _kept(lambda a, b: torch.nn.functional.silu(a) * b, gate2, up2)
    plain.backward(upstream)
    assert (len(kept), len(plain_kept)) == (2, 3)
    assert torch.equal(out, plain)
    assert torch.equal(gate.grad, gate2.grad) and torch.equal(up.grad, up2.grad)


def test_a_llama_model_switches_and_computes_the_same_logits_and_gradients():
    model = tiny_llama()
    fused = copy.deepcopy(model)
    assert fuse_gated_mlps(fused) == model.config.num_hidden_layers
    assert fuse_gated_mlps(fused) == model.config.num_hidden_layers  # idempotent
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    for m in (model, fused):
        m.zero_grad()
        m(input_ids=ids).logits.square().mean().backward()
    assert torch.equal(model(input_ids=ids).logits, fused(input_ids=ids).logits)
    for (name, p), q in zip(model.named_parameters(), fused.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


def test_an_mlp_with_another_activation_is_left_alone():
    model = tiny_llama()
    for layer in model.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()
    assert fuse_gated_mlps(model) == 0


def _lora_llama(fused: bool, folded: bool) -> torch.nn.Module:
    """A tiny Llama with LoRA on the MLP's up and down projections (down keeps the product
    for its LoRA gradients), adapters non-zero so every gradient is."""
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["up_proj", "down_proj"])
    )
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    fold_in_training(model, enabled=folded)
    if fused:
        fuse_gated_mlps(model)
    return model.eval()


def _loss(model: torch.nn.Module) -> torch.Tensor:
    logits = model(input_ids=IDS, attention_mask=MASK, use_cache=False).logits
    return (logits.float().log_softmax(-1)[..., 0] * MASK).sum()


@pytest.mark.parametrize("folded", [False, True], ids=["peft", "folded-lora"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["float32", "bf16-autocast"])
def test_the_product_is_freed_after_the_forward_and_the_gradients_are_the_same(
    monkeypatch: pytest.MonkeyPatch, folded: bool, dtype: torch.dtype | None
):
    products: list[weakref.ref[torch.Tensor]] = []

    def spy(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        product = silu_and_mul(gate, up)
        products.append(weakref.ref(product))
        return product

    monkeypatch.setattr(gated_mlp, "silu_and_mul", spy)
    plain, fused = _lora_llama(False, folded), _lora_llama(True, folded)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        plain_loss, loss = _loss(plain), _loss(fused)
    layers = plain.config.num_hidden_layers
    # While the graph is alive, nothing holds a layer's product: down computes it again.
    assert len(products) == layers and all(ref() is None for ref in products)
    plain_loss.backward()
    loss.backward()
    assert torch.equal(plain_loss, loss)
    grads = {n: p.grad for n, p in fused.named_parameters() if p.grad is not None}
    assert len(grads) == 2 * 2 * layers  # A and B of up and down in every layer
    for name, p in plain.named_parameters():
        if p.grad is not None:
            assert torch.equal(p.grad, grads[name]), name


def test_a_checkpointed_layer_keeps_its_product_to_itself(monkeypatch: pytest.MonkeyPatch):
    """Inside a checkpointed layer the product's hooks stand aside (the checkpoint's own
    must see every saved tensor, in the forward and in the replay), and the gradients are
    the same as without checkpointing."""
    hooked = 0
    real = gated_mlp.recomputed_product

    def spy(*args: torch.Tensor):
        nonlocal hooked
        hooked += 1
        return real(*args)

    monkeypatch.setattr(gated_mlp, "recomputed_product", spy)
    plain, checkpointed = _lora_llama(True, True), _lora_llama(True, True)
    checkpoint_layers(checkpointed)
    plain_loss = _loss(plain)
    assert hooked == plain.config.num_hidden_layers
    loss = _loss(checkpointed)
    loss.backward()  # replays each layer's forward
    assert hooked == plain.config.num_hidden_layers
    plain_loss.backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name
