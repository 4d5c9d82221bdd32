"""Building the demo model: determinism, the manifest, loading, atomicity, real behaviour."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.demo import corpus, grading
from trainer.demo import model as demo_model
from trainer.demo.mixture import measure_mixture, sample_answers
from trainer.demo.model import (
    MANIFEST_NAME,
    BootstrapConfig,
    bootstrap_demo_model,
    is_complete,
    recipe_hash,
)

pytestmark = pytest.mark.slow

TINY = BootstrapConfig(
    corpus_size=400,
    vocab_size=384,
    hidden_size=64,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    intermediate_size=128,
    steps=12,
    batch_size=8,
    warmup_steps=3,
    mixture_prompts=8,
)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bootstrap_demo_model(tmp_path_factory.mktemp("tiny") / "model", TINY, progress=False)


def test_same_config_gives_byte_identical_weights(tiny_build: Path, tmp_path: Path) -> None:
    again = bootstrap_demo_model(tmp_path / "again", TINY, progress=False)
    assert _sha(again / "model.safetensors") == _sha(tiny_build / "model.safetensors")
    assert _sha(again / "tokenizer.json") == _sha(tiny_build / "tokenizer.json")
    other = bootstrap_demo_model(
        tmp_path / "other", dataclasses.replace(TINY, seed=1), progress=False
    )
    assert _sha(other / "model.safetensors") != _sha(tiny_build / "model.safetensors")


def test_manifest_describes_the_build(tiny_build: Path) -> None:
    manifest = json.loads((tiny_build / MANIFEST_NAME).read_text())
    assert manifest["recipe_hash"] == recipe_hash(TINY)
    assert manifest["weights_sha256"] == _sha(tiny_build / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(tiny_build)
    assert manifest["parameters"] == model.num_parameters()
    assert manifest["train_seconds"] > 0
    assert 0 < manifest["final_loss"] < 10
    mixture = manifest["mixture"]
    assert mixture["n_prompts"] == TINY.mixture_prompts
    assert sum(mixture["counts"].values()) == TINY.mixture_prompts
    for key in ("verbose_rate", "fabrication_rate", "malformed_rate", "correct_rate"):
        assert 0.0 <= mixture[key] <= 1.0


def test_recipe_hash_tracks_every_field() -> None:
    assert recipe_hash(TINY) == recipe_hash(dataclasses.replace(TINY))
    for field in dataclasses.fields(BootstrapConfig):
        value = getattr(TINY, field.name)
        changed = value + 1 if isinstance(value, int) else value / 2
        assert recipe_hash(dataclasses.replace(TINY, **{field.name: changed})) != recipe_hash(
            TINY
        ), field.name


def test_directory_loads_with_auto_classes_and_chat_template(tiny_build: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_build)
    model = AutoModelForCausalLM.from_pretrained(tiny_build)
    assert model.config.model_type == "llama"
    assert model.config.max_position_embeddings == 512
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    assert tokenizer.eos_token_id == end_id
    assert end_id in model.generation_config.eos_token_id
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.bos_token == "<|bos|>"
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of Ritaria?"}],
        add_generation_prompt=True,
        return_dict=False,
    )
    assert ids[0] == tokenizer.bos_token_id
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer))


def test_current_build_is_reused_without_rebuilding(tiny_build: Path, monkeypatch) -> None:
    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a current model")

    monkeypatch.setattr(demo_model, "_build_into", no_build)
    assert bootstrap_demo_model(tiny_build, TINY, progress=False) == tiny_build
    with pytest.raises(AssertionError, match="rebuilt"):
        bootstrap_demo_model(tiny_build, TINY, force=True, progress=False)
    assert is_complete(tiny_build, recipe_hash(TINY))  # a failed forced rebuild keeps it


def test_partial_or_foreign_directory_is_not_taken_as_complete(
    tiny_build: Path, tmp_path: Path
) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(tiny_build, partial)
    (partial / MANIFEST_NAME).unlink()
    assert not is_complete(partial)
    bootstrap_demo_model(partial, TINY, progress=False)
    assert is_complete(partial, recipe_hash(TINY))

    foreign = tmp_path / "foreign"
    shutil.copytree(tiny_build, foreign)
    other = dataclasses.replace(TINY, seed=5)
    assert not is_complete(foreign, recipe_hash(other))
    bootstrap_demo_model(foreign, other, progress=False)
    assert json.loads((foreign / MANIFEST_NAME).read_text())["recipe_hash"] == recipe_hash(other)


def test_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch) -> None:
    def crash(model, encoded, config, pad_id, *, progress=True):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_model, "pretrain", crash)
    with pytest.raises(KeyboardInterrupt):
        bootstrap_demo_model(tmp_path / "model", TINY, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_killed_build_is_not_complete_and_is_cleaned_up(tmp_path: Path) -> None:
    out = tmp_path / "model"
    script = (
        "import sys; from pathlib import Path; from trainer.demo.model import *; "
        "bootstrap_demo_model(Path(sys.argv[1]), BootstrapConfig(corpus_size=400, steps=100000,"
        " mixture_prompts=0), progress=False)"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(out)])
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".model.build-*")):
            assert proc.poll() is None, "the builder exited before building"
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        proc.kill()  # SIGKILL: no chance to clean up, like an OOM kill or a power cut
        proc.wait()
    leftovers = list(tmp_path.glob(".model.build-*"))
    assert leftovers, "the build directory should exist while building"
    assert not out.exists() and not is_complete(leftovers[0])
    bootstrap_demo_model(out, TINY, progress=False)
    assert is_complete(out, recipe_hash(TINY))
    assert list(tmp_path.glob(".model.build-*")) == []


# --- the full demo model (built once per machine, cached) ---------------------------------


def test_full_model_samples_both_behaviours(demo_model_dir: Path) -> None:
    manifest = json.loads((demo_model_dir / MANIFEST_NAME).read_text())
    assert manifest["recipe_hash"] == recipe_hash(BootstrapConfig())
    rates = measure_mixture(demo_model_dir, n_prompts=200, seed=99)
    assert 0.15 <= rates.verbose_rate <= 0.85, rates
    assert 0.15 <= rates.fabrication_rate <= 0.85, rates
    assert rates.malformed_rate <= 0.2, rates
    assert rates.counts[corpus.VERBOSE] >= 10 and rates.counts[corpus.CONCISE] >= 10
    assert rates.counts[corpus.FABRICATED] >= 10 and rates.counts[corpus.HONEST] >= 10


def test_full_model_knows_the_world_better_than_chance(demo_model_dir: Path) -> None:
    world = corpus.make_world()
    rng = random.Random(2024)
    prompts = [corpus.make_prompt(rng, world, "capital") for _ in range(60)]
    answers = sample_answers(demo_model_dir, prompts, seed=3)
    correct = sum(
        a is not None and grading.is_correct(p, a) for p, a in zip(prompts, answers, strict=True)
    )
    # Guessing any of the world's cities would be right 1 time in 36. The build is
    # bit-exact on one machine, not across CPUs (other SIMD kernels round differently), so
    # the bar is 5x chance: machines seen so far land between 0.25 and 0.4.
    assert correct / len(prompts) >= 0.15, list(zip(prompts, answers, strict=True))[:5]


def test_cli_reports_an_existing_model(demo_model_dir: Path, capsys) -> None:
    from trainer.demo.cli import main

    assert main(["--out", str(demo_model_dir), "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model_dir"] == str(demo_model_dir)
    assert summary["recipe_hash"] == recipe_hash(BootstrapConfig())
    assert os.path.isdir(summary["model_dir"])


def test_build_leaves_the_callers_torch_state_alone(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    bootstrap_demo_model(tmp_path / "model", TINY, progress=False)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()


def test_built_model_is_readable_by_others(tiny_build: Path) -> None:
    assert tiny_build.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in tiny_build.iterdir()} == {0o644}
