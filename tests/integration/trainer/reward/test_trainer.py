"""The reward model trained on live-like feedback with a hidden preference.

Simulated users (``tests.fixtures.reward_feedback``) rate the demo model's own sampled
answers: concise over verbose, honest "I don't know" over fabrication. The events go
through the ingestor's writer into a fresh database, and a round must find the preference
on held-out prompts, resume after a SIGKILL to the same result, refuse a worse model, and
refuse a corrupted checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
import torch
from safetensors.torch import load_file

from feedback.db import connect, migrate
from feedback.ingest.writer import prepare_session, store_events
from tests.fixtures.postgres import create_database, drop_database
from tests.fixtures.reward_feedback import corpus_answers, feedback_events, sampled_answers
from trainer.reward import registry
from trainer.reward.checkpoints import CheckpointCorrupted
from trainer.reward.cli import reward_main
from trainer.reward.config import RewardConfig
from trainer.reward.model import attach_reward_model, load_base_model, load_reward_model
from trainer.reward.trainer import RUN_DIR_NAME, RewardRoundResult, train_reward_model
from trainer.rounds.cli import train_main

pytestmark = pytest.mark.slow

N_PROMPTS = 300
STEPS = 30


@pytest.fixture(scope="module")
def events(demo_model_dir: Path) -> list:
    prompts, first, second = sampled_answers(demo_model_dir, N_PROMPTS)
    return feedback_events(prompts, first, second)


def _database_with(events: list) -> str:
    url = create_database()
    with connect(url, autocommit=True) as conn:
        migrate(conn)
        prepare_session(conn)
        store_events(conn, events)
    return url


def _config(url: str, state_dir: Path, base: Path, **overrides: object) -> RewardConfig:
    config = RewardConfig(
        database_url=url,
        state_dir=state_dir,
        base_model=base,
        steps=STEPS,
        batch_size=8,
        checkpoint_every=5,
        progress=False,
    )
    return replace(config, **overrides)


@pytest.fixture(scope="module")
def trained(
    events: list, demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RewardConfig, RewardRoundResult]]:
    """One uninterrupted round from scratch (the reference for the other tests)."""
    url = _database_with(events)
    try:
        config = _config(url, tmp_path_factory.mktemp("state"), demo_model_dir)
        yield config, train_reward_model(config)
    finally:
        drop_database(url)


def test_learns_the_hidden_preference(trained: tuple[RewardConfig, RewardRoundResult]) -> None:
    config, result = trained
    assert result.outcome == "registered", result.reason
    metrics = result.metrics
    assert metrics is not None
    assert metrics["n_pairs"] >= 30
    assert metrics["pairwise_accuracy"] >= 0.85
    assert metrics["auc"] >= 0.85
    assert metrics["reward"]["up"]["mean"] > metrics["reward"]["down"]["mean"]
    assert result.version is not None and result.version.status == "current"
    assert result.version.version == "rm-0001"
    assert not (Path(config.state_dir) / RUN_DIR_NAME).exists()  # the run is cleaned up
    registry.verified_path(result.version)


def test_scoring_on_a_shared_base(trained: tuple[RewardConfig, RewardRoundResult]) -> None:
    """PPO's path: attach the version to a base that already holds another adapter."""
    from peft import LoraConfig, get_peft_model

    config, result = trained
    assert result.version is not None
    path = Path(result.version.path)
    conversation = [{"role": "user", "content": "What is the capital of Kalomoria?"}]
    unanswerable = [{"role": "user", "content": "What did I eat for breakfast?"}]
    conversations = [conversation, conversation, unanswerable, unanswerable]
    answers = [
        "Rafos.",
        "Great question! Rafos. I hope this helps, let me know if you need anything else!",
        "I don't know what you ate for breakfast; you haven't told me.",
        "You ate pancakes for breakfast.",
    ]
    standalone = load_reward_model(path).score(conversations, answers)
    assert standalone[0] > standalone[1] and standalone[2] > standalone[3]

    base, tokenizer = load_base_model(Path(config.base_model))
    policy = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]), adapter_name="policy")
    n_params = sum(p.numel() for p in base.parameters())
    rm = attach_reward_model(policy, tokenizer, path)
    assert rm.peft_model is policy  # no second model
    assert sum(p.numel() for p in base.parameters()) - n_params < 200_000  # only an adapter
    assert torch.allclose(rm.score(conversations, answers), standalone, atol=1e-5)
    assert policy.active_adapter == "policy"  # scoring gives the policy its adapter back


def test_list_and_show(trained: tuple[RewardConfig, RewardRoundResult], capsys) -> None:
    config, _ = trained
    # the fixture's database is still alive while the module's tests run
    assert reward_main(["--database-url", config.database_url, "list"]) == 0
    assert "rm-0001" in capsys.readouterr().out
    assert reward_main(["--database-url", config.database_url, "show", "rm-0001"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["status"] == "current" and shown["files"] == "ok"
    assert shown["watermark"]["interactions"] == 2 * N_PROMPTS
    assert reward_main(["--database-url", config.database_url, "show", "rm-0999"]) == 1


def test_gate_refuses_a_worse_model(trained: tuple[RewardConfig, RewardRoundResult]) -> None:
    config, first = trained
    worse = replace(
        config, steps=1, warm_start=False, min_pairwise_accuracy=0.0, min_auc=0.0, fresh=True
    )
    result = train_reward_model(worse)
    assert result.outcome == "rejected"
    assert "worse than rm-0001" in result.reason
    assert result.parent_metrics == first.metrics  # compared on the same held-out data
    assert result.version is not None  # a rejected round still writes its version
    with connect(config.database_url, autocommit=True) as conn:
        current = registry.current_version(conn)
        rejected = registry.get_version(conn, result.version.version)
    assert current is not None and current.version == "rm-0001"
    assert rejected is not None and rejected.status == "rejected"
    assert rejected.parent_version == "rm-0001" and rejected.reason == result.reason


def _wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, timeout: float) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted((run_dir / "checkpoints").glob("step-*"))
        if found:
            return found[-1]
        assert proc.poll() is None, "training ended before a checkpoint was seen"
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


def test_killed_run_resumes_to_the_same_result(
    trained: tuple[RewardConfig, RewardRoundResult], events: list, tmp_path: Path
) -> None:
    reference_config, reference = trained
    url = _database_with(events)  # same rows as the reference's database
    try:
        config = replace(reference_config, database_url=url, state_dir=tmp_path)
        args = ["--database-url", url, "--state-dir", str(tmp_path)]
        args += ["--base-model", str(config.base_model), "--steps", str(STEPS)]
        args += ["--batch-size", "8", "--checkpoint-every", "5", "--no-progress"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "deploy.cli", "train", "reward", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            _wait_for_checkpoint(tmp_path / RUN_DIR_NAME, proc, timeout=120)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        with psycopg.connect(url) as conn:
            assert registry.list_versions(conn) == []

        resumed = train_reward_model(config)
        assert 0 < resumed.stats["resumed_from_step"] < STEPS
        assert resumed.stats["watermark"] == reference.stats["watermark"]
        assert resumed.outcome == "registered"
        assert resumed.metrics == reference.metrics
        assert resumed.version is not None and reference.version is not None  # both registered
        mine = load_file(str(Path(resumed.version.path) / "head.safetensors"))
        theirs = load_file(str(Path(reference.version.path) / "head.safetensors"))
        assert torch.allclose(mine["weight"], theirs["weight"], atol=1e-6)
    finally:
        drop_database(url)


def test_corrupted_checkpoint_is_refused(
    trained: tuple[RewardConfig, RewardRoundResult], events: list, tmp_path: Path, capsys
) -> None:
    reference_config, _ = trained
    url = _database_with(events)
    try:
        config = replace(reference_config, database_url=url, state_dir=tmp_path)
        stopped = train_reward_model(replace(config, stop_after_steps=5))
        assert stopped.outcome == "stopped" and stopped.version is None
        (checkpoint,) = sorted((tmp_path / RUN_DIR_NAME / "checkpoints").glob("step-*"))
        state = checkpoint / "state.pt"
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0xFF
        state.write_bytes(bytes(data))

        with pytest.raises(CheckpointCorrupted, match="refusing to resume"):
            train_reward_model(config)
        args = ["reward", "--database-url", url, "--state-dir", str(tmp_path)]
        args += ["--base-model", str(config.base_model), "--steps", str(STEPS), "--no-progress"]
        args += ["--batch-size", "8", "--checkpoint-every", "5"]
        assert train_main(args) == 1
        assert "is corrupted" in capsys.readouterr().err
        with psycopg.connect(url) as conn:
            assert registry.list_versions(conn) == []
    finally:
        drop_database(url)


def test_warm_start_continues_the_current_version(
    trained: tuple[RewardConfig, RewardRoundResult],
) -> None:
    config, first = trained
    with connect(config.database_url, autocommit=True) as conn:
        prepare_session(conn)
        store_events(conn, feedback_events(*corpus_answers(80, seed=3), seed=3))
    result = train_reward_model(replace(config, steps=10, fresh=True))
    assert result.outcome == "registered", result.reason
    assert result.stats["warm_start"] is True
    assert (
        0 < result.stats["new_examples"] < first.stats["train_pairs"] + first.stats["train_labels"]
    )
    assert result.stats["replayed_examples"] > 0
    assert result.metrics is not None and result.metrics["pairwise_accuracy"] >= 0.85
    with connect(config.database_url, autocommit=True) as conn:
        current = registry.current_version(conn)
        statuses = {v.version: v.status for v in registry.list_versions(conn)}
    assert current is not None and current.parent_version == "rm-0001"
    assert statuses["rm-0001"] == "previous"


def test_sequence_classification_model_instead_of_an_adapter(
    demo_model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    seq_cls = tmp_path / "seq-cls"
    AutoModelForSequenceClassification.from_pretrained(
        str(demo_model_dir), num_labels=1
    ).save_pretrained(str(seq_cls))
    AutoTokenizer.from_pretrained(str(demo_model_dir)).save_pretrained(str(seq_cls))
    url = _database_with(feedback_events(*corpus_answers(100, seed=4), seed=4))
    try:
        config = _config(url, tmp_path / "state", demo_model_dir, seq_cls_model=seq_cls)
        result = train_reward_model(
            replace(config, base_model=None, steps=5, min_auc=0.0, min_pairwise_accuracy=0.0)
        )
        assert result.outcome == "registered", result.reason
        assert result.version is not None and result.version.kind == "seq_cls"
        conversations = [[{"role": "user", "content": "What is 2 plus 2?"}]]
        loaded = load_reward_model(registry.verified_path(result.version))
        assert loaded.kind == "seq_cls"
        assert loaded.score(conversations, ["4."]).shape == (1,)
    finally:
        drop_database(url)
