"""What the reward and PPO models take from the base model rather than from constants:
the LoRA targets (only layers vLLM serves LoRA on) and a pad token where there is none."""

from __future__ import annotations

from pathlib import Path

import pytest
from peft import get_peft_model

from tests.fixtures.model_matrix import build_tiny_model
from trainer.reward.model import load_base_model, lora_config, lora_target_modules

PROJECTIONS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Untied embeddings (a separate lm_head Linear) and a tokenizer without a pad token."""
    return build_tiny_model("mistral", tmp_path_factory.mktemp("tiny") / "mistral")


def test_lora_targets_are_the_body_projections_never_the_lm_head(mistral: Path) -> None:
    model, _ = load_base_model(mistral)
    assert isinstance(model.get_output_embeddings(), type(model.model.layers[0].mlp.up_proj))
    assert lora_target_modules(model) == PROJECTIONS
    # ... also once adapters wrap those layers (PPO adds the critic to a PeftModel).
    peft_model = get_peft_model(model, lora_config(4, 8, "auto", model), adapter_name="policy")
    assert lora_target_modules(peft_model) == PROJECTIONS
    peft_model.add_adapter("critic", lora_config(4, 8, "auto", peft_model))
    wrapped = {
        n.split(".lora_")[0].rsplit(".", 1)[-1]
        for n, _ in peft_model.named_parameters()
        if ".critic." in n
    }
    assert wrapped == set(PROJECTIONS)


def test_explicit_targets_still_win() -> None:
    assert lora_config(4, 8, "q_proj, v_proj").target_modules == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match="needs the model"):
        lora_config(4, 8, "auto")


def test_a_tokenizer_without_pad_token_pads_with_its_eos(mistral: Path) -> None:
    _, tokenizer = load_base_model(mistral)
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
