"""The engine's context window comes from the model's config, capped by the setting."""

from __future__ import annotations

from pathlib import Path

from transformers import GPT2Config, LlamaConfig

from serving.engine import context_window


def test_the_models_own_window_capped_by_the_setting(tmp_path: Path) -> None:
    LlamaConfig(max_position_embeddings=8192).save_pretrained(tmp_path / "long")
    LlamaConfig(max_position_embeddings=512).save_pretrained(tmp_path / "short")
    GPT2Config(n_positions=1024).save_pretrained(tmp_path / "gpt2")  # another name for it
    assert context_window(tmp_path / "long", 4096) == 4096
    assert context_window(tmp_path / "short", 4096) == 512
    assert context_window(tmp_path / "gpt2", 4096) == 1024
    assert context_window(tmp_path / "gpt2", 256) == 256
