"""The rollout engine's zero warm-up adapter on an architecture whose linear layers are not
named ``*_proj`` (GPT-NeoX: ``query_key_value``, ``dense``, ``dense_h_to_4h``, ...)."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from trainer.ppo.rollout.vllm import write_zero_adapter
from trainer.reward.model import lora_target_modules


def test_the_zero_adapter_covers_what_the_trainer_wraps_and_changes_nothing(tmp_path: Path):
    config = GPTNeoXConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    base = GPTNeoXForCausalLM(config).eval()
    base.save_pretrained(tmp_path / "base")

    write_zero_adapter(tmp_path / "base", tmp_path / "zero", rank=4)

    ids = torch.tensor([[1, 5, 9, 40, 41]])
    with torch.no_grad():
        expected = base(ids).logits
        model = PeftModel.from_pretrained(base, str(tmp_path / "zero"))
        wrapped = {n.rsplit(".", 2)[-2] for n, _ in model.named_modules() if n.endswith("lora_A")}
        assert (
            wrapped
            == set(lora_target_modules(base))
            == {
                "query_key_value",
                "dense",
                "dense_h_to_4h",
                "dense_4h_to_h",
            }
        )
        lora_layers = [n for n, _ in model.named_modules() if n.endswith("lora_A")]
        assert len(lora_layers) == 4 * config.num_hidden_layers
        torch.testing.assert_close(model(ids).logits, expected)
