"""PPO rounds on the demo model against real Postgres (and the real broker for the event).

The rounds that are about learning optimise the reward model learned from simulated live
feedback (``learned_reward``: concise over verbose, honest over fabricated, found from
ratings of the demo model's own answers) with no rule terms, and must raise both that
reward and the hidden preference itself (the simulated users' judgement, which the reward
model never sees) within the KL budget; one round trains its reward model itself, from the
feedback in Postgres. The rounds that check plumbing exactly (failures, aborts, resume to
the same adapter, torchrun, the loop) keep a flat reward model (score 0) plus a rule
(``length_penalty``): what they check does not depend on the reward, and a flat model
needs no training. Rounds use the ``hf`` sampler (bit-reproducible) unless a test is about
vLLM rollouts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from deploy.local.broker import free_port
from deploy.policies import registry as policy_registry
from feedback.datasets import Watermark
from feedback.ingest.writer import store_events
from schemas.events import PolicyCandidate
from schemas.topics import POLICY
from tests.fixtures.broker import consume_events
from tests.fixtures.learned_reward import (
    LearnedReward,
    heldout_prompts,
    liked_share,
    register_learned_reward_model,
    simulated_feedback,
    store_feedback,
)
from tests.fixtures.postgres import make_feedback
from tests.fixtures.ppo import CONCISE, SMALL_PPO, log_traffic, register_flat_reward_model
from trainer.common import artifacts
from trainer.common.artifacts import MANIFEST_NAME
from trainer.ppo.core import logprobs_from_logits
from trainer.ppo.models import PolicyModels, TokenBatch
from trainer.ppo.rollout.base import AdapterSyncError, render_prompts
from trainer.ppo.rollout.hf import HFSampler
from trainer.reward import registry as reward_registry
from trainer.reward.rules import rule
from trainer.rounds import records as round_records
from trainer.rounds.config import RoundConfig
from trainer.rounds.training_round import _prompts, run_round, shared_sampler

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[4]


@rule("test_nan")
def _nan_rule(messages, answer: str) -> float:
    """A broken reward term: NaN for every answer."""
    return math.nan


def _config_maker(url: str, state: Path, base: Path, rules: list | None):
    """``make(**overrides)``: a small round's config (``ppo={...}`` overrides PPO fields)."""

    def make(**overrides) -> RoundConfig:
        ppo = dataclasses.replace(SMALL_PPO, **overrides.pop("ppo", {}))
        fields = {
            "database_url": url,
            "state_dir": state,
            "base_model": base,
            "kafka_bootstrap": None,
            "update_reward_model": False,
            "rules": rules,
            "rollout_backend": "hf",
            "iterations": 3,
            "prompt_pool": 300,
            "eval_prompts": 32,
            "gate_min_win_rate": 0.0,
            "gate_max_kl": 100.0,
            "gate_min_distinct_ratio": 0.0,
            "progress": False,
            "num_threads": 2,
            "ppo": ppo,
        }
        return RoundConfig(**{**fields, **overrides})

    return make


@pytest.fixture
def ppo_config(conn: psycopg.Connection, migrated_url: str, tmp_path: Path, demo_model_dir: Path):
    """A database with logged traffic and a flat reward model (plus the CONCISE rules); a
    small round's config. For the plumbing tests (see module docstring)."""
    state = tmp_path / "state"
    log_traffic(conn, 300)
    register_flat_reward_model(conn, state, demo_model_dir)
    return _config_maker(migrated_url, state, demo_model_dir, CONCISE)


@pytest.fixture
def learned_config(
    conn: psycopg.Connection,
    migrated_url: str,
    tmp_path: Path,
    demo_model_dir: Path,
    learned_reward: LearnedReward,
):
    """A database with logged traffic and the reward model learned from simulated feedback
    (rm-0001); no rule terms: the reward PPO optimises is that model's score alone."""
    state = tmp_path / "state"
    log_traffic(conn, 300)
    register_learned_reward_model(conn, state, learned_reward)
    return _config_maker(migrated_url, state, demo_model_dir, [])


def _versions(conn: psycopg.Connection) -> list[str]:
    return [v.version for v in policy_registry.list_versions(conn)]


def test_reference_logprobs_are_the_base_models_exactly(
    conn: psycopg.Connection, tmp_path: Path, demo_model_dir: Path
):
    """The reference is the base with adapters disabled: bit-identical log-probs, while the
    actor (a non-zero policy adapter) really differs."""
    rm = reward_registry.get_version(
        conn, register_flat_reward_model(conn, tmp_path / "state", demo_model_dir)
    )
    models = PolicyModels.load(demo_model_dir, Path(rm.path), seed=3)
    with torch.no_grad():  # make the policy adapter non-trivial, as after training
        for name, p in models.peft_model.named_parameters():
            if ".policy." in name and "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    prompts = render_prompts(
        models.tokenizer,
        [[{"role": "user", "content": q}] for q in ("What is 3 plus 4?", "Who are you?")],
    )
    answers = [models.tokenizer("Seven.", add_special_tokens=False)["input_ids"], [5, 6, 7, 8]]
    batch = TokenBatch.build(prompts, answers, pad_id=models.tokenizer.pad_token_id)

    reference = models.reference_logprobs(batch)
    plain = AutoModelForCausalLM.from_pretrained(str(demo_model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = plain.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state
        index = batch.positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        base_logits = plain.lm_head(hidden.gather(1, index))
        base = logprobs_from_logits(base_logits, batch.response_ids)
        full = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    mask = batch.mask.bool()
    assert torch.equal(reference[mask], base[mask])
    # ... and the same numbers as the ordinary full forward pass, up to float rounding.
    full_lp = logprobs_from_logits(full[:, :-1], batch.input_ids[:, 1:])
    rows = [full_lp[i, batch.positions[i, : int(batch.mask[i].sum())]] for i in range(2)]
    torch.testing.assert_close(torch.cat(rows), reference[mask], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        actor, _ = models.actor_critic.actor(batch)
    assert (actor[mask] - reference[mask]).abs().max() > 1e-3


LEARNING_PPO = {
    "rollout_batch_size": 32,
    "mini_batch_size": 16,
    "ppo_epochs": 4,
    "max_new_tokens": 48,
    "actor_lr": 1e-3,
    "kl_mode": "adaptive",
    "init_kl_coef": 0.05,
    "target_kl": 6.0,
}
"""PPO that moves the demo model within a few iterations (the learned reward is noisy: a
rollout's scores spread over several units); the answers are short, 48 tokens cut few."""

LEARNING_EVAL = {"heldout_fraction": 0.3, "eval_prompts": 128}
"""About 100 of the logged prompts held out for the evaluation (0.1 leaves about 30, too
few to tell a reward gain from the noise of this reward), about 200 left to train on."""


def _assert_learned(conn: psycopg.Connection, config: RoundConfig, result) -> None:
    """The learned reward rose (first iterations to last; held out, against the base), the
    hidden preference with it (on fresh prompts), the KL to the reference stayed under the
    target and the answers did not collapse."""
    steps = result.steps
    trace = [(round(s["reward_raw"], 3), round(s["kl_ref"], 2)) for s in steps]
    start = sum(s["reward_raw"] for s in steps[:2]) / 2
    end = sum(s["reward_raw"] for s in steps[-3:]) / 3
    assert end >= start + MIN_REWARD_GAIN, trace
    assert all(s["kl_ref"] < config.ppo.target_kl for s in steps), trace
    evaluation = result.metrics["evaluation"]
    assert evaluation["reward_gain"] >= MIN_REWARD_GAIN, evaluation
    assert evaluation["win_rate"] > 0.5, evaluation
    assert evaluation["kl_to_reference"] < config.ppo.target_kl, evaluation
    assert evaluation["distinct_2_ratio"] >= 0.8, evaluation
    rm = reward_registry.get_version(conn, result.metrics["reward_model_version"])
    candidate = Path(policy_registry.get(conn, result.candidate_version).adapter_uri)
    base_liked, liked = _liked_shares(config, Path(rm.path), candidate)
    print(
        f"learned reward {trace}; held out {evaluation['reward_gain']:+.3f} on "
        f"{evaluation['prompts']} prompts (win rate {evaluation['win_rate']:.3f}, distinct-2 "
        f"ratio {evaluation['distinct_2_ratio']:.3f}); liked {base_liked:.3f} -> {liked:.3f}"
    )
    assert liked >= base_liked + MIN_LIKED_GAIN, (base_liked, liked, trace)


MIN_REWARD_GAIN = 2.0
"""In the learned model's units: on its held-out feedback liked answers score about +8.5 and
disliked ones about -7, so +2 is about an eighth of the answers turned (measured: +4.5 to
+5.8, first iterations to last and held out, with either sampler)."""
MIN_LIKED_GAIN = 0.2
"""Of the share of answers the simulated users like (the base: 0.52 on these prompts;
measured after PPO: 0.90-0.92)."""
LIKED_PROMPTS = 128


def _liked_shares(config: RoundConfig, reward_dir: Path, candidate: Path) -> tuple[float, float]:
    """The hidden preference's own measure on fresh prompts, base vs candidate: the share of
    answers the simulated users like, sampled with the same seed (transformers sampler)."""
    models = PolicyModels.load(config.base_model, reward_dir, policy_init=candidate)
    sampler = HFSampler(models)
    generation = models.peft_model.get_base_model().generation_config
    prompts = heldout_prompts(LIKED_PROMPTS)
    kwargs = {"max_new_tokens": config.ppo.max_new_tokens}
    base = liked_share(sampler, models.tokenizer, generation, prompts, "base", **kwargs)
    trained = liked_share(sampler, models.tokenizer, generation, prompts, "current", **kwargs)
    return base, trained


def test_a_round_learns_the_learned_reward_and_registers_a_candidate_with_its_records(
    conn: psycopg.Connection, learned_config, broker
):
    """PPO on the reward model learned from simulated feedback (transformers rollouts)
    raises that reward and the users' hidden preference, and registers the candidate with
    every record: registry row, adapter files, round, iterations, event."""
    config = learned_config(
        iterations=6, kafka_bootstrap=broker.bootstrap, ppo=LEARNING_PPO, **LEARNING_EVAL
    )
    result = run_round(config, trigger="test")

    assert result.outcome == "registered", result.reason
    version = result.candidate_version
    assert version == f"ppo-{result.round_id:04d}"
    record = policy_registry.get(conn, version)
    assert record.state == "candidate"
    assert record.parent_version == "base"
    assert record.reward_model_version == "rm-0001"
    assert record.training_round == result.round_id
    assert set(record.metrics["evaluation"]) >= {"win_rate", "kl_to_reference", "candidate"}
    # The adapter on disk is complete and checksummed, and it is the trained one.
    path = Path(record.adapter_uri)
    assert artifacts.verify_dir(path)
    assert record.checksum == hashlib.sha256((path / MANIFEST_NAME).read_bytes()).hexdigest()
    weights = load_file(str(path / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in weights.items())
    # The round and every iteration are recorded.
    training_round = round_records.get_round(conn, result.round_id)
    assert training_round.status == "registered"
    assert training_round.candidate_version == version
    assert training_round.reward_model_version == "rm-0001"
    steps = round_records.steps(conn, result.round_id)
    assert [i for i, _ in steps] == list(range(6))
    for _, metrics in steps:
        assert {
            "reward_raw",
            "kl_ref",
            "kl_coef",
            "clip_fraction",
            "approx_kl",
            "entropy",
            "policy_loss",
            "value_loss",
            "explained_variance",
            "response_length",
            "rollout_tokens_per_s",
            "sampler_logprob_gap",
        } <= set(metrics)
    # Nothing of the run is left behind; the candidate event went out.
    assert not (config.state_dir / "ppo_runs" / f"round-{result.round_id}").exists()
    events = [
        e
        for e in consume_events(broker.bootstrap, POLICY, expected=1, timeout=30)
        if isinstance(e, PolicyCandidate) and e.version == version
    ]
    assert len(events) == 1
    assert events[0].training_round == result.round_id
    assert events[0].checksum == record.checksum
    _assert_learned(conn, config, result)


def test_a_round_trains_its_reward_model_from_the_feedback_and_ppo_optimises_it(
    conn: psycopg.Connection, migrated_url: str, tmp_path: Path, demo_model_dir: Path
):
    """``update_reward_model``: a round on a database with feedback and no reward model
    version yet first trains one (the simulated users' ratings of the demo model's answers,
    read from Postgres), records it on the round, and PPO optimises that model: with no rule
    terms every reward the round logs and evaluates is its score, and the candidate carries
    its version."""
    store_feedback(conn, simulated_feedback(demo_model_dir))  # also the traffic PPO samples
    assert reward_registry.list_versions(conn) == []
    make = _config_maker(migrated_url, tmp_path / "state", demo_model_dir, [])
    config = make(update_reward_model=True, iterations=2, eval_prompts=16)
    result = run_round(config)

    assert result.outcome == "registered", result.reason
    (rm,) = reward_registry.list_versions(conn)  # made by the round
    assert rm.status == "current" and rm.parent_version is None
    assert rm.train_stats["train_pairs"] > 0 and rm.train_stats["train_labels"] > 0
    assert rm.metrics["pairwise_accuracy"] >= 0.8, rm.metrics  # it found the preference
    training_round = round_records.get_round(conn, result.round_id)
    assert training_round.reward_model_version == rm.version
    assert training_round.watermark["feedback"] >= rm.watermark["feedback"] > 0
    assert result.metrics["reward_model_version"] == rm.version
    assert policy_registry.get(conn, result.candidate_version).reward_model_version == rm.version
    # Operators read why in one line: trigger, parent, the reward model's evidence, verdict.
    assert result.reason == training_round.reason
    assert result.reason.startswith("trigger: manual; parent base; reward model rm-0001 (")
    assert "held-out pairs" in result.reason and "gate passed: win rate" in result.reason
    # The reward is the model's score alone, and it is that model's: the base's held-out
    # answers, sampled again as the evaluation sampled them, score what the round recorded.
    for step in result.steps:
        assert step["reward_raw"] == pytest.approx(step["reward_model"], abs=1e-5)
    evaluation = result.metrics["evaluation"]
    _, heldout = _prompts(conn, config, Watermark(**training_round.watermark))
    models = PolicyModels.load(config.base_model, Path(rm.path))
    samples = HFSampler(models).sample(
        render_prompts(models.tokenizer, heldout),
        which="base",
        max_new_tokens=config.ppo.max_new_tokens,
        temperature=config.ppo.temperature,
        seed=config.ppo.seed + 99_991,
    )
    texts = models.tokenizer.batch_decode(samples.response_ids, skip_special_tokens=True)
    rescored = float(models.reward.score(heldout, texts).mean())
    print(
        f"{rm.version} trained in the round: held-out pairwise accuracy "
        f"{rm.metrics['pairwise_accuracy']}, AUC {rm.metrics['auc']}; the base's held-out "
        f"reward {evaluation['stable']['reward']:+.3f}, rescored {rescored:+.3f}"
    )
    assert rescored == pytest.approx(evaluation["stable"]["reward"], abs=1e-3)
    assert abs(rescored) > 1e-3  # a trained head, not a flat one


def test_a_candidate_that_fails_the_gate_is_not_registered(conn, ppo_config):
    # k3: after one update the candidate's KL estimate is positive (k1's mean can be < 0).
    config = ppo_config(
        iterations=1, gate_min_win_rate=1.0, gate_max_kl=1e-9, ppo={"kl_estimator": "k3"}
    )
    result = run_round(config)
    assert result.outcome == "rejected"
    assert "KL to reference" in result.reason
    assert _versions(conn) == ["base"]
    training_round = round_records.get_round(conn, result.round_id)
    assert training_round.status == "rejected" and training_round.reason == result.reason
    assert training_round.metrics["evaluation"]["prompts"] > 0
    assert not list((ppo_config().state_dir / "policies").glob("*"))


def test_a_runaway_kl_aborts_the_round(conn, ppo_config):
    # Iteration 0 samples from the untouched actor (KL exactly 0); after one update it is
    # not, and k3 (unlike k1, whose sample mean can be negative) is positive then.
    result = run_round(ppo_config(iterations=3, abort_kl=1e-6, ppo={"kl_estimator": "k3"}))
    assert result.outcome == "aborted"
    assert "KL to the reference" in result.reason and "abort_kl" in result.reason
    training_round = round_records.get_round(conn, result.round_id)
    assert training_round.status == "aborted" and "abort_kl" in training_round.reason
    assert _versions(conn) == ["base"]


def test_nan_rewards_abort_the_round_before_any_update(conn, ppo_config):
    result = run_round(ppo_config(rules=[{"name": "test_nan"}]))
    assert result.outcome == "aborted"
    assert "non-finite reward scores at iteration 0" in result.reason
    assert round_records.get_round(conn, result.round_id).status == "aborted"
    assert round_records.steps(conn, result.round_id) == []
    assert _versions(conn) == ["base"]


def test_a_corrupted_checkpoint_is_refused(conn, ppo_config):
    config = ppo_config(iterations=3, stop_after_iterations=1)
    first = run_round(config)
    assert first.outcome == "stopped"
    state = config.state_dir / "ppo_runs" / f"round-{first.round_id}" / "checkpoint" / "state.pt"
    with open(state, "r+b") as f:
        f.seek(100)
        f.write(b"\x00garbage\x00")
    second = run_round(dataclasses.replace(config, stop_after_iterations=None))
    assert second.round_id == first.round_id
    assert second.outcome == "failed"
    assert "does not match its sha256" in second.reason
    assert round_records.get_round(conn, first.round_id).status == "failed"
    assert _versions(conn) == ["base"]


# --- the CLI: kill and resume, torchrun ---------------------------------------------------------


def _cli(config: RoundConfig, *extra: str) -> list[str]:
    ppo = config.ppo
    return [
        sys.executable, "-m", "deploy.cli", "train", "ppo",
        "--database-url", config.database_url,
        "--state-dir", str(config.state_dir),
        "--base-model", str(config.base_model),
        "--no-update-reward-model",
        "--rules", json.dumps(CONCISE),
        "--rollout-backend", "hf",
        "--iterations", str(config.iterations),
        "--eval-prompts", "16",
        "--gate-min-win-rate", "0", "--gate-max-kl", "100", "--gate-min-distinct-ratio", "0",
        "--rollout-batch-size", str(ppo.rollout_batch_size),
        "--mini-batch-size", str(ppo.mini_batch_size),
        "--max-new-tokens", str(ppo.max_new_tokens),
        "--actor-lr", str(ppo.actor_lr), "--critic-lr", str(ppo.critic_lr),
        "--lr-warmup-iterations", "0", "--init-kl-coef", str(ppo.init_kl_coef),
        "--no-progress", "--num-threads", "1",
        *extra,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "ALIGNLOOP_KAFKA_BOOTSTRAP": ""}


def _adapter(conn: psycopg.Connection, version: str) -> dict[str, torch.Tensor]:
    return load_file(
        str(Path(policy_registry.get(conn, version).adapter_uri) / "adapter_model.safetensors")
    )


def test_killed_trainer_resumes_to_the_same_adapter(
    conn: psycopg.Connection, ppo_config, tmp_path: Path
):
    """SIGKILL after iteration 2 of 6, run again: the round resumes from its checkpoint and
    registers exactly the adapter an uninterrupted run of the same round produces."""
    config = ppo_config(iterations=6)
    proc = subprocess.Popen(_cli(config), env=_env(), cwd=ROOT, stdout=subprocess.PIPE)
    deadline = time.monotonic() + 600
    round_id = None
    while time.monotonic() < deadline:
        running = round_records.running_round(conn)
        if running is not None and len(round_records.steps(conn, running.id)) >= 2:
            round_id = running.id
            break
        assert proc.poll() is None, "trainer ended before it could be killed"
        time.sleep(0.2)
    assert round_id is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert round_records.get_round(conn, round_id).status == "running"
    assert _versions(conn) == ["base"]  # nothing registered by the killed run

    resumed = subprocess.run(_cli(config), env=_env(), cwd=ROOT, capture_output=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    assert b"resuming" in resumed.stderr
    finished = round_records.get_round(conn, round_id)
    assert finished.status == "registered"
    assert [i for i, _ in round_records.steps(conn, round_id)] == list(range(6))

    # The same round, uninterrupted: same data, reward model and parent, new state directory.
    reference_config = dataclasses.replace(config, state_dir=tmp_path / "state-b")
    straight = subprocess.run(
        _cli(reference_config), env=_env(), cwd=ROOT, capture_output=True, timeout=900
    )
    assert straight.returncode == 0, straight.stderr.decode()[-3000:]
    a = _adapter(conn, finished.candidate_version)
    b = _adapter(conn, round_records.last_round(conn).candidate_version)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_round_runs_under_torchrun_with_two_processes(conn: psycopg.Connection, ppo_config):
    """DDP on gloo: two ranks, each with half of every rollout batch; gradients averaged,
    so both ranks end with the same weights; rank 0 alone registers."""
    config = ppo_config(iterations=2)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2"]  # fmt: skip
    argv = _cli(config)
    run = subprocess.run(
        [*torchrun, "-m", *argv[2:]], env=_env(), cwd=ROOT, capture_output=True, timeout=900
    )
    stderr = run.stderr.decode()
    assert run.returncode == 0, stderr[-4000:]
    finished = round_records.last_round(conn)
    assert finished.status == "registered"
    assert sorted(_versions(conn)) == ["base", finished.candidate_version]
    digests = {
        line.split("policy sha256 ")[1].strip()
        for line in stderr.splitlines()
        if "policy sha256 " in line
    }
    ranks = {
        line.split("rank ")[1].split()[0]
        for line in stderr.splitlines()
        if "policy sha256 " in line
    }
    assert ranks == {"0", "1"}
    assert len(digests) == 1, "the ranks' policy adapters differ: gradients were not synced"
    steps = round_records.steps(conn, finished.id)
    assert [m["episodes"] for _, m in steps] == [16, 16]


def _check_the_vllm_stream(sampler, config: RoundConfig, engine_pids: list[int]) -> None:
    """The engine runs on its own cores; while it generates, the trainer keeps off them
    and afterwards it has every core. Its stream answers every prompt once, and a consumer
    that stops early leaves no request running in the engine."""
    assert engine_pids
    split = (os.cpu_count() or 1) >= 2
    engine_cores = set().union(*(os.sched_getaffinity(p) for p in engine_pids))
    every_core = os.sched_getaffinity(0)
    tokenizer = AutoTokenizer.from_pretrained(config.base_model)
    questions = [[{"role": "user", "content": f"q {i}"}] for i in range(12)]
    prompts = render_prompts(tokenizer, questions)
    stream = sampler.stream(prompts, max_new_tokens=8, temperature=1.0, seed=1)
    rows = [d.index for finished in stream for d in finished]
    assert sorted(rows) == list(range(12))
    assert os.sched_getaffinity(0) == every_core  # the engine is idle: every core again
    stream = sampler.stream(prompts, max_new_tokens=40, temperature=1.0, seed=2)
    next(stream)
    assert sampler.llm.llm_engine.has_unfinished_requests()  # the longer answers
    if split:
        assert engine_cores and engine_cores < every_core
        for task in Path("/proc/self/task").iterdir():
            # Every thread of the trainer (torch's workers too) is off the engine's cores.
            assert not engine_cores & os.sched_getaffinity(int(task.name)), task.name
    stream.close()  # the consumer gives up: the other requests are aborted
    assert not sampler.llm.llm_engine.has_unfinished_requests()
    assert os.sched_getaffinity(0) == every_core
    again = sampler.sample(prompts, max_new_tokens=8, temperature=1.0, seed=1)
    assert len(again.response_ids) == 12


def _child_pids(pid: int) -> list[str]:
    out: list[str] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:  # the process ended
        return out
    for task in tasks:
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:  # the thread (or process) ended while being read
            continue
        for child in children:
            out += [child, *_child_pids(int(child))]
    return out


def test_ppo_with_vllm_rollouts_learns_the_reward_within_the_kl_budget(conn, learned_config):
    """The main path: rollouts from vLLM with the actor hot-loaded every iteration, on the
    reward model learned from simulated feedback.

    PPO must raise the learned reward clearly, from the first iterations to the last and on
    held-out prompts against the base, and with it the share of answers the simulated users
    like (fresh prompts). The KL to the reference stays under the configured target, and the
    answers do not collapse (the gate: distinct-2 within 20% of the base's)."""
    config = learned_config(
        rollout_backend="vllm",
        iterations=6,
        gate_min_win_rate=0.5,
        gate_max_kl=6.0,
        gate_min_distinct_ratio=0.8,
        ppo=LEARNING_PPO,
        **LEARNING_EVAL,
    )
    before = set(_child_pids(os.getpid()))
    sampler = shared_sampler(config)
    try:
        result = run_round(config, sampler=sampler)
        engine = [int(p) for p in set(_child_pids(os.getpid())) - before]
        _check_the_vllm_stream(sampler, config, engine)
        # An engine that cannot take the adapter in time is a clear error, not a hang.
        sampler.options = dataclasses.replace(sampler.options, sync_timeout_s=1e-4)
        rm = reward_registry.current_version(conn)
        models = PolicyModels.load(config.base_model, Path(rm.path))
        with pytest.raises(AdapterSyncError, match=r"took over 0.0001 s"):
            sampler.sync(models, "late")
    finally:
        cores = os.sched_getaffinity(0)
        sampler.close()
    assert os.sched_getaffinity(0) >= cores  # closing gives the trainer its cores back
    assert result.outcome == "registered", result.reason
    assert len(result.steps) == 6
    # The sampler's log-probs (vLLM, bfloat16) stay close to the trainer's.
    assert all(s["sampler_logprob_gap"] < 0.05 for s in result.steps)
    _assert_learned(conn, config, result)


def test_the_training_loop_starts_a_round_when_enough_ratings_arrived(
    conn: psycopg.Connection, ppo_config
):
    """``alignloop train loop`` waits while too few new ratings exist, runs a round once
    they do, and stops cleanly on SIGTERM."""
    config = ppo_config(iterations=1)
    port = free_port()
    argv = [*_cli(config), "--min-new-ratings", "5", "--max-interval-s", "3600", "--poll-s", "0.5"]
    argv += ["--metrics-port", str(port)]
    argv[argv.index("ppo")] = "loop"
    proc = subprocess.Popen(argv, env=_env(), cwd=ROOT, stderr=subprocess.PIPE)
    try:
        time.sleep(8)  # started, polled a few times: 0 new ratings is no reason to train
        assert proc.poll() is None
        assert round_records.last_round(conn) is None
        responses = [r for (r,) in conn.execute("SELECT response_id FROM interactions LIMIT 6")]
        store_events(conn, [make_feedback(r, "up") for r in responses])
        deadline = time.monotonic() + 600
        finished = None
        while time.monotonic() < deadline and finished is None:
            last = round_records.last_round(conn)
            finished = last if last is not None and last.status != "running" else None
            time.sleep(0.5)
        assert finished is not None, "no round finished"
        assert finished.status == "registered", finished.reason
        assert finished.trigger.startswith("first round: 6 new ratings")
        time.sleep(3)  # no new ratings since: no second round
        assert round_records.last_round(conn).id == finished.id
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert 'alignloop_training_rounds_total{outcome="registered"} 1.0' in metrics
        assert 'alignloop_ppo_iteration_metric{metric="kl_ref"}' in metrics
        assert "alignloop_ppo_episodes_total 16.0" in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    assert b"training loop stopped" in stderr
