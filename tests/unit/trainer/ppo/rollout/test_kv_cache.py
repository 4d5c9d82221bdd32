"""Tests of :mod:`trainer.ppo.rollout.kv_cache`."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM

from tests.fixtures.tiny_llama import tiny_llama
from trainer.common.cpu_attention import use_cpu_attention
from trainer.ppo.rollout.kv_cache import ReservedLayer, reserved_cache


def _kv(*tokens: float, rows: int = 1) -> torch.Tensor:
    """``[rows, 1 head, len(tokens), 1]``: row r holds ``token + 10 r``."""
    t = torch.tensor(tokens).reshape(1, 1, -1, 1)
    return torch.cat([t + 10 * r for r in range(rows)])


def test_tokens_are_written_in_place_and_read_back_in_order():
    layer = ReservedLayer(reserve=2)
    keys, values = layer.update(_kv(1, 2), -_kv(1, 2))  # the prompt
    buffer = keys.untyped_storage().data_ptr()
    keys, values = layer.update(_kv(3), -_kv(3))  # one decoded token
    assert keys.flatten().tolist() == [1, 2, 3]
    assert values.flatten().tolist() == [-1, -2, -3]
    assert layer.get_seq_length() == 3
    # the same buffer, not a new one-token-longer copy
    assert keys.untyped_storage().data_ptr() == buffer
    keys, _ = layer.update(_kv(4), -_kv(4))
    assert keys.flatten().tolist() == [1, 2, 3, 4]
    assert keys.untyped_storage().data_ptr() == buffer


def test_past_the_reservation_it_grows_and_stays_right():
    layer = ReservedLayer(reserve=1)
    layer.update(_kv(1), _kv(1))
    layer.update(_kv(2), _kv(2))  # fills the reservation
    keys, values = layer.update(_kv(3, 4), _kv(3, 4))  # two past it
    assert keys.flatten().tolist() == [1, 2, 3, 4]
    assert values.flatten().tolist() == [1, 2, 3, 4]
    assert layer.get_seq_length() == 4


def test_finished_rows_leave_the_batch():
    layer = ReservedLayer(reserve=3)
    layer.update(_kv(1, 2, rows=3), _kv(1, 2, rows=3))
    layer.batch_select_indices(torch.tensor([0, 2]))
    keys, _ = layer.update(_kv(3, rows=2), _kv(3, rows=2))
    # rows 0 and 2 kept (2 holds +20); the new token is each remaining row's own
    assert keys[:, 0, :, 0].tolist() == [[1, 2, 3], [21, 22, 13]]


def test_a_prefix_written_for_one_row_is_repeated_to_every_row():
    layer = ReservedLayer(reserve=2)
    layer.update(_kv(1, 2), -_kv(1, 2))  # the shared prefix, one row
    layer.batch_repeat_interleave(3)
    keys, values = layer.update(_kv(3, rows=3), -_kv(3, rows=3))  # each row's own token
    assert keys[:, 0, :, 0].tolist() == [[1, 2, 3], [1, 2, 13], [1, 2, 23]]
    assert values[:, 0, :, 0].tolist() == [[-1, -2, -3], [-1, -2, -13], [-1, -2, -23]]
    assert layer.get_seq_length() == 3


def test_a_float32_cache_of_bfloat16_keys_holds_their_exact_values():
    layer = ReservedLayer(reserve=1, dtype=torch.float32)
    k = torch.tensor([1.00390625, 3.0]).reshape(1, 1, 2, 1).bfloat16()
    keys, values = layer.update(k, k)
    assert keys.dtype == values.dtype == torch.float32
    assert keys.flatten().tolist() == k.float().flatten().tolist()


def _tiny_llama() -> LlamaForCausalLM:
    model = tiny_llama("sdpa")
    use_cpu_attention(model)
    return model


def _decode(model: LlamaForCausalLM, cache, steps: int) -> list[torch.Tensor]:
    """Greedy decode of two left-padded prompts; every step's logits."""
    ids = torch.tensor([[0, 5, 6, 7], [9, 10, 11, 12]])
    attention = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(
                input_ids=ids,
                attention_mask=attention,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            ).logits[:, -1]
            out.append(logits)
            ids = logits.argmax(-1, keepdim=True)
            attention = torch.cat([attention, torch.ones(2, 1, dtype=torch.long)], dim=1)
            positions = positions[:, -1:] + 1
    return out


@pytest.mark.parametrize("autocast", [False, True])
def test_a_model_decodes_the_same_through_it(autocast):
    model = _tiny_llama()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        dynamic = _decode(model, DynamicCache(), steps=6)
        storage = torch.float32 if autocast else None
        # a reservation shorter than the decode: the last steps grow it
        reserved = _decode(model, reserved_cache(model.config, 4, storage), steps=6)
    for a, b in zip(dynamic, reserved, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
