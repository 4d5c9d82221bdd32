"""A shared prompt prefix run once: its length found by hand, the rest's hidden states and
gradients those of the whole pass, and a checkpointed replay reading the same prefix."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import DynamicCache, LlamaConfig, MistralConfig

from tests.fixtures.tiny_llama import tiny_llama
from trainer.common.activation_checkpointing import checkpoint_layers
from trainer.common.cpu_attention import use_cpu_attention
from trainer.common.shared_prefix import (
    SharedPrefixCache,
    common_prefix_length,
    hidden_after_prefix,
    prefix_shareable,
    shared_prefix_length,
)

# Three right-padded rows sharing their first 4 tokens; the last row is the shortest.
IDS = torch.tensor(
    [
        [3, 7, 1, 9, 4, 4, 2, 8, 5],
        [3, 7, 1, 9, 6, 2, 0, 0, 0],
        [3, 7, 1, 9, 4, 1, 6, 6, 0],
    ]
)
MASK = (torch.arange(9) < torch.tensor([[9], [6], [8]])).long()


def test_the_shared_prefix_length_by_hand() -> None:
    assert shared_prefix_length(IDS, MASK, limit=9) == 4
    assert shared_prefix_length(IDS, MASK, limit=3) == 3  # capped by the caller
    assert shared_prefix_length(IDS[[0, 2]], MASK[[0, 2]], limit=9) == 5  # 3 7 1 9 4
    assert shared_prefix_length(IDS[:1], MASK[:1], limit=9) == 0  # one row: nothing shared
    assert shared_prefix_length(IDS, MASK, limit=0) == 0
    # Equal ids on padding are not shared tokens: rows [5, 0] and [5] padded with 0.
    ids, mask = torch.tensor([[5, 0], [5, 0]]), torch.tensor([[1, 1], [1, 0]])
    assert shared_prefix_length(ids, mask, limit=2) == 1
    different = IDS.clone()
    different[1, 0] = 4
    assert shared_prefix_length(different, MASK, limit=9) == 0


def test_the_common_prefix_of_unpadded_prompts_by_hand() -> None:
    prompts = [[3, 7, 1, 9, 4], [3, 7, 1, 9, 6, 2], [3, 7, 1, 9, 4, 1, 6]]
    assert common_prefix_length(prompts, limit=10) == 4
    assert common_prefix_length(prompts, limit=2) == 2  # capped by the caller
    assert common_prefix_length([prompts[0], prompts[2]], limit=10) == 5  # the shorter, whole
    assert common_prefix_length(prompts[:1], limit=10) == 0  # one prompt: nothing shared
    assert common_prefix_length([[5, 1], [6, 1]], limit=10) == 0


def _lora_model(checkpoint_every: int = 0) -> torch.nn.Module:
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    )
    use_cpu_attention(model)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero, so the adapter's gradients reach every layer
            torch.nn.init.normal_(p, std=0.1)
    if checkpoint_every:
        checkpoint_layers(model, checkpoint_every)
    return model.eval()


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    return model.base_model.model.model


def _rest_and_grads(
    model: torch.nn.Module, prefix: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The hidden states of columns ``4:`` (what a caller reading after the prefix needs),
    from the whole pass (``prefix`` 0) or the shared one, and the LoRA gradients of a loss
    on them that weights every row and position differently."""
    model.zero_grad(set_to_none=True)
    backbone = _backbone(model)
    if prefix:
        rest = hidden_after_prefix(backbone, IDS, MASK, prefix)
    else:
        whole = backbone(input_ids=IDS, attention_mask=MASK, use_cache=False)
        rest = whole.last_hidden_state[:, 4:]
    weights = torch.linspace(-1, 1, rest[..., 0].numel()).view_as(rest[..., 0])
    loss = (rest.float().pow(2).sum(-1) * weights * MASK[:, 4:]).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return rest.detach(), grads


@pytest.mark.parametrize("checkpoint_every", [0, 1, 2], ids=["plain", "every", "every-other"])
def test_the_rest_after_a_shared_prefix_is_the_whole_pass(checkpoint_every: int) -> None:
    """Hidden states and gradients (the prefix's summed over the three rows that read it)
    equal the whole pass's up to float32 rounding, checkpointed layers included: their
    replay reads the prefix's keys and values, not a cache it extended."""
    model = _lora_model(checkpoint_every)
    whole, whole_grads = _rest_and_grads(model, 0)
    runs = []
    first_attention = _backbone(model).layers[0].self_attn
    first_attention.register_forward_hook(lambda *_: runs.append(1))
    shared, shared_grads = _rest_and_grads(model, 4)
    # The prefix's pass, the rest's, and (checkpointed) the rest's replay in the backward.
    assert len(runs) == (3 if checkpoint_every else 2)
    valid = MASK[:, 4:].bool()
    torch.testing.assert_close(shared[valid], whole[valid], atol=1e-5, rtol=1e-5)
    assert whole_grads.keys() == shared_grads.keys() and len(whole_grads) == 2 * 3 * 2
    for name, whole_grad in whole_grads.items():
        # float32 rounding, relative to the gradient's scale: each path is about 1e-5 off
        # the float64 gradient of 0.08 at most (an AMX CPU), the two paths at 3e-5 apart;
        # a prefix counted once instead of three times, or misplaced, is off by its size.
        scale = whole_grad.abs().max().item()
        torch.testing.assert_close(
            shared_grads[name], whole_grad, atol=2e-3 * scale, rtol=0, msg=name
        )


def test_the_prefix_runs_as_one_row() -> None:
    model = _lora_model()
    rows: list[tuple[int, int]] = []
    _backbone(model).register_forward_hook(
        lambda m, a, k, o: rows.append(tuple(k["input_ids"].shape)), with_kwargs=True
    )
    with torch.no_grad():
        hidden_after_prefix(_backbone(model), IDS, MASK, 4)
    assert rows == [(1, 4), (3, 5)]  # 4 + 15 token positions instead of 27


def test_only_plain_key_value_caches_are_shared() -> None:
    """A sliding-window layer keeps a cropped cache, whose positions the rest's mask would
    not match: such a model runs every row whole."""
    assert prefix_shareable(LlamaConfig(num_hidden_layers=2))
    assert prefix_shareable(MistralConfig(num_hidden_layers=2, sliding_window=None))
    sliding = MistralConfig(num_hidden_layers=2, sliding_window=4)
    assert not prefix_shareable(sliding)
    with pytest.raises(ValueError, match="plain keys and values"):
        SharedPrefixCache(DynamicCache(config=sliding), rows=2)
