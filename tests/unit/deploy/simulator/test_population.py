"""The simulated population: shares and skew come out as configured, thumbs follow the
score with the configured noise, and everything is a function of the seed."""

from __future__ import annotations

import math
import random
from collections import Counter
from statistics import NormalDist

import pytest

from deploy.simulator.population import Population, PopulationConfig


def test_rating_and_comparing_shares_as_configured() -> None:
    pop = Population(PopulationConfig(users=4000, rate_share=0.3, compare_share=0.1, seed=1))
    raters = sum(u.rates for u in pop.users) / len(pop.users)
    comparers = sum(u.compares for u in pop.users) / len(pop.users)
    # binomial sd at n=4000 is about 0.007 and 0.005
    assert abs(raters - 0.3) < 0.03 and abs(comparers - 0.1) < 0.02


def test_rate_prob_applies_to_raters_only() -> None:
    pop = Population(PopulationConfig(users=50, rate_share=0.5, rate_prob=0.25, seed=2))
    rng = random.Random(0)
    rater = next(u for u in pop.users if u.rates)
    silent = next(u for u in pop.users if not u.rates)
    share = sum(pop.wants_to_rate(rater, rng) for _ in range(8000)) / 8000
    assert abs(share - 0.25) < 0.02
    assert not any(pop.wants_to_rate(silent, rng) for _ in range(1000))


def test_activity_is_log_normal_skewed() -> None:
    sigma = 1.0
    pop = Population(PopulationConfig(users=5000, activity_sigma=sigma, seed=3))
    assert math.isclose(sum(u.weight for u in pop.users), 1.0)
    # a log-normal's top decile holds 1 - Phi(z_0.9 - sigma) of the mass: 0.389 at sigma 1
    expected = 1 - NormalDist().cdf(NormalDist().inv_cdf(0.9) - sigma)
    assert abs(pop.top_share(0.1) - expected) < 0.03
    uniform = Population(PopulationConfig(users=5000, activity_sigma=0.0, seed=3))
    assert pop.top_share(0.1) > 3 * uniform.top_share(0.1)
    assert uniform.top_share(0.1) == pytest.approx(0.1)


def test_picks_follow_activity() -> None:
    pop = Population(PopulationConfig(users=20, activity_sigma=1.5, seed=4))
    rng = random.Random(5)
    n = 40_000
    counts = Counter(pop.pick(rng).id for _ in range(n))
    heaviest = max(pop.users, key=lambda u: u.weight)
    lightest = min(pop.users, key=lambda u: u.weight)
    assert counts[heaviest.id] / n == pytest.approx(heaviest.weight, abs=0.01)
    assert counts[lightest.id] / n == pytest.approx(lightest.weight, abs=0.005)
    assert counts[heaviest.id] > 5 * max(1, counts[lightest.id])


def test_thumbs_follow_the_score_with_noise() -> None:
    pop = Population(PopulationConfig(users=1, noise=0.1, bias_sd=0.0, seed=6))
    user = pop.users[0]
    rng = random.Random(7)
    n = 20_000
    ups = sum(pop.thumb(user, 0.8, rng) == "up" for _ in range(n)) / n
    # liked with 0.8, flipped with 0.1: 0.8 * 0.9 + 0.2 * 0.1 = 0.74
    assert abs(ups - 0.74) < 0.015
    always = sum(pop.thumb(user, 1.0, rng) == "up" for _ in range(n)) / n
    assert abs(always - 0.9) < 0.01


def test_user_bias_shifts_the_liking() -> None:
    pop = Population(PopulationConfig(users=400, bias_sd=0.2, seed=8))
    grumpy = min(pop.users, key=lambda u: u.bias)
    cheery = max(pop.users, key=lambda u: u.bias)
    assert grumpy.bias < -0.3 and cheery.bias > 0.3
    assert pop.like_probability(grumpy, 0.5) < 0.2 < 0.8 < pop.like_probability(cheery, 0.5)
    assert pop.like_probability(cheery, 0.9) == 1.0  # clipped


def test_comparisons_prefer_the_higher_score() -> None:
    pop = Population(PopulationConfig(users=1, noise=0.0, seed=9))
    rng = random.Random(10)
    user = pop.users[0]
    wins = Counter(pop.choose(user, 0.8, 0.2, rng) for _ in range(2000))
    assert wins["a"] > 0.99 * 2000
    ties = Counter(pop.choose(user, 0.5, 0.5, rng) for _ in range(4000))
    assert abs(ties["a"] / 4000 - 0.5) < 0.04


def test_same_seed_same_population_different_seed_different() -> None:
    a = Population(PopulationConfig(users=30, seed=11)).users
    b = Population(PopulationConfig(users=30, seed=11)).users
    c = Population(PopulationConfig(users=30, seed=12)).users
    assert a == b
    assert [u.weight for u in a] != [u.weight for u in c]
    assert len({u.id for u in a}) == 30


@pytest.mark.parametrize(
    "bad",
    [
        {"users": 0},
        {"rate_share": 1.5},
        {"rate_prob": -0.1},
        {"noise": 0.6},
        {"compare_share": 2.0},
        {"activity_sigma": -1.0},
    ],
)
def test_invalid_configuration_is_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        PopulationConfig(**bad)
