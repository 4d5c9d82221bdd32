"""Tests of :mod:`trainer.ppo.rollout.hf`."""

from __future__ import annotations

import torch

from trainer.ppo.rollout.hf import inverse_cdf_sample


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
