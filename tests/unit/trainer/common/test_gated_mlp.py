"""The gated MLP's SiLU product: three tensors kept for the backward instead of four, the
same numbers and gradients bit for bit, and which MLPs switch."""

from __future__ import annotations

import copy

import torch

from tests.fixtures.tiny_llama import tiny_llama
from trainer.common.gated_mlp import fuse_gated_mlps, silu_and_mul


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
