"""Checkpointed decoder layers: the same gradients, fewer tensors kept for the backward,
and passes without a gradient or with a KV cache left as they were."""

from __future__ import annotations

import contextlib

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import DynamicCache

from tests.fixtures.tiny_llama import tiny_llama
from trainer.common.activation_checkpointing import checkpoint_layers
from trainer.common.lora_folding import fold_in_training

IDS = torch.tensor([[3, 7, 1, 9, 4, 4, 2, 8], [5, 1, 1, 6, 2, 0, 0, 0]])
MASK = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])


def _lora_model(folded: bool) -> torch.nn.Module:
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    )
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero, so the adapter's gradients reach every layer
            torch.nn.init.normal_(p, std=0.1)
    fold_in_training(model, enabled=folded)
    return model.eval()


def _loss_and_grads(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=IDS, attention_mask=MASK, use_cache=False).logits
    loss = (logits.float().log_softmax(-1)[..., 0] * MASK).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _bytes_saved_for_backward(model: torch.nn.Module) -> int:
    params = {p.data_ptr() for p in model.parameters()}
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        if t.data_ptr() not in params:
            saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=IDS, attention_mask=MASK, use_cache=False).logits.sum()
    return saved


@pytest.mark.parametrize("every", [1, 2], ids=["every-layer", "every-other-layer"])
@pytest.mark.parametrize("folded", [False, True], ids=["peft", "folded-lora"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["float32", "bf16-autocast"])
def test_gradients_are_the_same_with_and_without_checkpointing(folded, dtype, every) -> None:
    plain, checkpointed = _lora_model(folded), _lora_model(folded)
    assert checkpoint_layers(checkpointed, every) == 2 // every
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss_a, grads_a = _loss_and_grads(plain)
        loss_b, grads_b = _loss_and_grads(checkpointed)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 2 * 3 * 2  # A, B per target
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=0, msg=name)


def test_the_backward_keeps_only_layer_inputs() -> None:
    plain, checkpointed = _lora_model(False), _lora_model(False)
    checkpoint_layers(checkpointed)
    kept_plain = _bytes_saved_for_backward(plain)
    kept = _bytes_saved_for_backward(checkpointed)
    # Two layers' activations against two layer inputs (+ the final norm and head's own).
    assert kept < kept_plain / 2, (kept, kept_plain)


def test_every_other_layer_keeps_what_the_others_do() -> None:
    """Every other layer checkpointed: the first keeps its input only, the second all its
    activations, so the backward keeps less than without checkpointing and more than with
    every layer checkpointed."""
    plain, half, full = _lora_model(False), _lora_model(False), _lora_model(False)
    checkpoint_layers(half, every=2)
    checkpoint_layers(full)
    layers = half.base_model.model.model.layers
    assert [hasattr(layer.forward, "_alignloop_checkpointed") for layer in layers] == [
        True,
        False,
    ]
    kept = [_bytes_saved_for_backward(m) for m in (plain, half, full)]
    assert kept[2] < kept[1] < kept[0], kept
    with pytest.raises(ValueError, match="at least 1"):
        checkpoint_layers(plain, every=0)


def test_wrapping_twice_wraps_once() -> None:
    model = _lora_model(False)
    checkpoint_layers(model)
    forward = model.base_model.model.model.layers[0].forward
    assert checkpoint_layers(model) == 2
    assert model.base_model.model.model.layers[0].forward is forward


def test_a_cached_decode_is_not_replayed() -> None:
    """A pass that extends a KV cache with a gradient on runs as it is: replayed in the
    backward it would append its keys and values a second time."""
    plain, checkpointed = _lora_model(False), _lora_model(False)
    checkpoint_layers(checkpointed)
    lengths = []
    for model in (plain, checkpointed):
        cache = DynamicCache(config=model.config)
        out = model(input_ids=IDS[:1], past_key_values=cache, use_cache=True)
        out.logits.sum().backward()
        lengths.append(cache.get_seq_length())
    assert lengths == [8, 8]
    with torch.no_grad():  # and without a gradient, nothing is checkpointed at all
        torch.testing.assert_close(
            checkpointed(input_ids=IDS, attention_mask=MASK).logits,
            plain(input_ids=IDS, attention_mask=MASK).logits,
        )


def _two_adapter_grads(checkpoint: bool, replay_state: bool) -> dict[str, torch.Tensor]:
    """Gradients of one backward through a pass of the "actor" adapter and then one of the
    "critic" adapter: the backward runs with the critic active."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])
    model = get_peft_model(tiny_llama(), config, "actor")
    model.add_adapter("critic", config)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    model.eval()

    def active_again() -> contextlib.AbstractContextManager[None]:
        name = model.active_adapter

        @contextlib.contextmanager
        def again():
            before = model.active_adapter
            model.set_adapter(name)
            yield
            model.set_adapter(before)

        return again()

    if checkpoint:
        checkpoint_layers(model, replay_state=active_again if replay_state else None)
    loss = torch.zeros(())
    for name in ("actor", "critic"):
        model.set_adapter(name)
        for param_name, p in model.named_parameters():  # set_adapter froze the other one
            p.requires_grad_(".lora_" in param_name)
        logits = model(input_ids=IDS, attention_mask=MASK, use_cache=False).logits
        loss = loss + (logits.float().log_softmax(-1)[..., 0] * MASK).sum()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_the_replay_runs_with_the_adapter_its_forward_ran_with() -> None:
    """A layer checkpointed in the actor's pass is replayed after the critic's pass made the
    critic active: with ``replay_state`` the replay runs the actor again and the gradients
    are those without checkpointing; without it, the actor's layers replay as the critic."""
    plain = _two_adapter_grads(checkpoint=False, replay_state=False)
    restored = _two_adapter_grads(checkpoint=True, replay_state=True)
    assert len(plain) == 2 * 2 * 2 * 2  # adapters, layers, targets, A and B
    for name in plain:
        torch.testing.assert_close(restored[name], plain[name], rtol=0, atol=0, msg=name)
    unrestored = _two_adapter_grads(checkpoint=True, replay_state=False)
    assert any(not torch.equal(unrestored[n], plain[n]) for n in plain)
