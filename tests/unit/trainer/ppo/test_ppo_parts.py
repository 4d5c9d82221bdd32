"""The small pure pieces around the PPO loop, each against a hand-worked case."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import torch

from schemas.config_flags import add_config_flags, config_from_namespace
from trainer.common.malloc_tuning import keep_freed_memory
from trainer.ppo.evaluation import distinct_n, gate, win_rate
from trainer.ppo.models import TokenBatch
from trainer.ppo.rollout.base import inverse_cdf_sample, split_cpus
from trainer.rounds.config import RoundConfig
from trainer.rounds.training_round import iteration_prompts


def test_token_batch_layout_by_hand():
    # Row 0: prompt [5, 6, 7], response [8, 9]; row 1: prompt [5], response [4, 3, 2].
    batch = TokenBatch.build([[5, 6, 7], [5]], [[8, 9], [4, 3, 2]], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 4, 3, 2, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # The hidden state at index prompt_len - 1 + j predicts response token j.
    assert batch.positions.tolist() == [[2, 3, 4], [0, 1, 2]]
    assert batch.response_ids.tolist() == [[8, 9, 0], [4, 3, 2]]
    assert batch.mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    # The positions really point at the token before each response token.
    for row in range(2):
        for j in range(int(batch.mask[row].sum())):
            before = batch.input_ids[row, batch.positions[row, j] + 1]
            assert before == batch.response_ids[row, j]


def test_token_batch_select_and_errors():
    batch = TokenBatch.build([[1, 2], [3], [4]], [[5], [6, 7], []], pad_id=0)
    sub = batch.select(torch.tensor([2, 0]))
    assert sub.input_ids.tolist() == [[4, 0, 0], [1, 2, 5]]
    assert sub.mask.tolist() == [[0], [1]]  # cut to the mini-batch's longest response
    assert sub.positions.tolist() == [[0], [1]]
    short = batch.select(torch.tensor([2]))  # and to its longest row
    assert short.input_ids.tolist() == [[4]] and short.positions.tolist() == [[0]]
    with pytest.raises(ValueError, match="at least one token"):
        TokenBatch.build([[]], [[1]], pad_id=0)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        TokenBatch.build([[1], [2]], [[1]], pad_id=0)


def test_length_chunks_put_short_rows_together():
    batch = TokenBatch.build([[1, 2, 3], [1], [1, 2]], [[4, 4], [4], [4, 4, 4]], pad_id=0)
    # row lengths 5, 2, 5: the short row first, ties in row order
    assert [c.tolist() for c in batch.length_chunks(2)] == [[1, 0], [2]]


def test_inverse_cdf_sample_picks_the_token_whose_probability_mass_holds_the_draw():
    # probabilities 0.2 | 0.5 | 0.0 | 0.3: cumulative 0.2, 0.7, 0.7, 1.0
    logprobs = torch.tensor([[0.2, 0.5, 0.0, 0.3]]).log().expand(6, -1)
    uniform = torch.tensor([0.0, 0.19, 0.2, 0.69, 0.7, 0.999])
    assert inverse_cdf_sample(logprobs, uniform).tolist() == [0, 0, 1, 1, 3, 3]
    # Unnormalised (a truncated distribution): the draw is scaled to the total mass.
    half = torch.tensor([[0.1, 0.1]]).log()
    assert inverse_cdf_sample(half, torch.tensor([0.49])).tolist() == [0]
    assert inverse_cdf_sample(half, torch.tensor([0.51])).tolist() == [1]


def test_inverse_cdf_sample_follows_the_distribution():
    logprobs = torch.log_softmax(torch.tensor([1.0, 0.0, 2.0, -1.0]), dim=-1)
    draws = torch.rand(200_000, generator=torch.Generator().manual_seed(0))
    picked = inverse_cdf_sample(logprobs.expand(len(draws), -1), draws)
    frequencies = torch.bincount(picked, minlength=4).float() / len(draws)
    torch.testing.assert_close(frequencies, logprobs.exp(), atol=4e-3, rtol=0)


def test_distinct_n_by_hand():
    texts = ["a b a b", "a b c"]
    # unigrams: a b a b a b c -> 3 unique of 7; bigrams: ab ba ab | ab bc -> 3 unique of 5
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    assert distinct_n(["one"], 2) == 0.0


def test_win_rate_counts_ties_half():
    candidate = torch.tensor([1.0, 2.0, 3.0, 0.0])
    stable = torch.tensor([0.0, 2.0, 4.0, -1.0])
    assert win_rate(candidate, stable) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert win_rate(torch.zeros(0), torch.zeros(0)) == 0.0


def _evaluation(**overrides):
    base = {"win_rate": 0.7, "kl_to_reference": 2.0, "distinct_2_ratio": 0.95, "reward_gain": 0.4}
    return {**base, **overrides}


def test_gate_passes_and_names_every_failure():
    config = RoundConfig(gate_min_win_rate=0.5, gate_max_kl=5.0, gate_min_distinct_ratio=0.8)
    ok, reason = gate(_evaluation(), config)
    assert ok and reason.startswith("passed")
    ok, reason = gate(_evaluation(win_rate=0.4, kl_to_reference=7.5, distinct_2_ratio=0.5), config)
    assert not ok
    assert "win rate 0.400" in reason and "KL to reference 7.500" in reason
    assert "distinct-2 ratio 0.500" in reason


def test_iteration_prompts_are_a_pure_function_of_the_iteration():
    pool = list(range(100))
    first = iteration_prompts(pool, 3, 10, seed=1)
    assert first == iteration_prompts(pool, 3, 10, seed=1)
    assert first != iteration_prompts(pool, 4, 10, seed=1)
    assert len(set(first)) == 10  # without replacement while the pool is large enough
    assert len(iteration_prompts(pool[:4], 0, 10, seed=1)) == 10  # with, when it is not


def test_auto_rollouts_use_vllm_with_a_gpu_and_transformers_on_cpu():
    assert RoundConfig().rollout_backend == "auto"
    assert RoundConfig().rollouts == ("vllm" if torch.cuda.is_available() else "hf")
    assert RoundConfig(rollout_backend="vllm").rollouts == "vllm"
    assert RoundConfig(rollout_backend="hf").rollouts == "hf"


def test_round_config_validation_and_fingerprint():
    with pytest.raises(ValueError, match="rollout_backend"):
        RoundConfig(rollout_backend="tgi")
    with pytest.raises(ValueError, match="critic_init"):
        RoundConfig(critic_init="random")
    a, b = RoundConfig(), RoundConfig(progress=False, metrics_port=9)
    assert a.fingerprint() == b.fingerprint()  # how it runs, not what it computes
    assert a.fingerprint() != RoundConfig(iterations=3).fingerprint()
    assert RoundConfig(database_url="postgresql://u:secret@h/db").to_json()["database_url"] is None


def test_flags_cover_nested_ppo_config():
    parser = argparse.ArgumentParser()
    add_config_flags(parser, RoundConfig)
    values = vars(
        parser.parse_args(
            [
                "--iterations",
                "3",
                "--rollout-batch-size",
                "32",
                "--mini-batch-size",
                "8",
                "--no-whiten-advantages",
                "--rules",
                '[{"name": "empty_answer"}]',
            ]
        )
    )
    config = config_from_namespace(RoundConfig, values)
    assert config.iterations == 3
    assert config.ppo.rollout_batch_size == 32 and config.ppo.mini_batch_size == 8
    assert config.ppo.whiten_advantages is False
    assert config.rules == [{"name": "empty_answer"}]
    with pytest.raises(ValueError, match="mini_batch_size"):
        config_from_namespace(RoundConfig, {**values, "mini_batch_size": 7})


def test_cpus_split_between_the_rollout_engine_and_the_trainer():
    cores = sorted(os.sched_getaffinity(0))
    split = split_cpus(0)
    if len(cores) < 2:
        assert split is None
        return
    engine, trainer = split
    assert engine and trainer and not engine & trainer
    assert sorted(engine | trainer) == cores and len(engine) == len(cores) // 2
    assert split_cpus(1) == ({cores[0]}, set(cores[1:]))
    assert split_cpus(len(cores)) is None  # every core for the engine: no pinning


def test_glibc_keeps_freed_memory_after_tuning():
    """On glibc both thresholds are taken; a large block freed and allocated again then
    comes back from the heap (the RSS does not drop on free)."""
    import ctypes

    assert keep_freed_memory(1 << 28) is True
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)  # touch every page
    before = _rss_kib()
    libc.free(block)
    assert _rss_kib() > before - (size >> 10) // 2  # not handed back to the OS


def _rss_kib() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])
