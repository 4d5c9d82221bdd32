"""The simulated users: who sends the next request, who rates, and how.

Contract. :class:`Population` is built from a :class:`PopulationConfig` and is a pure
function of it (its own seeded ``random.Random``; no I/O). Every draw takes the caller's
``random.Random``, so a driver that gives each turn its own seeded generator gets the same
users, thumbs and comparisons whatever order concurrent turns finish in.

* Activity is heavy-tailed: user weights are log-normal (``activity_sigma``; 0 = everyone
  equally active), so a few heavy users send much of the traffic and many light users a
  little, as on a real product. :meth:`Population.pick` draws a user by weight.
* A share ``rate_share`` of users ever rate; a rater rates each answer with probability
  ``rate_prob``. A share ``compare_share`` of users sometimes (``compare_prob`` of their
  turns) asks twice and says which answer they prefer (``POST /v1/preferences``).
* Thumbs follow the hidden preference stochastically: a user likes an answer with
  probability ``score + bias`` (clipped to [0, 1]; ``bias`` ~ Normal(0, ``bias_sd``) per
  user: some users are grumpier than others), then the vote flips with probability
  ``noise`` (misclicks, moods).
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from dataclasses import dataclass
from typing import Literal

Thumb = Literal["up", "down"]


@dataclass(frozen=True)
class PopulationConfig:
    users: int = 200
    rate_share: float = 0.5
    """Share of users who ever rate."""
    rate_prob: float = 0.8
    """Probability that a rater rates a given answer."""
    noise: float = 0.1
    """Probability that a vote is flipped."""
    bias_sd: float = 0.1
    """Standard deviation of the per-user bias added to the liking probability."""
    activity_sigma: float = 1.0
    """Sigma of the log-normal activity weights (0: every user equally active)."""
    compare_share: float = 0.1
    """Share of users who send A-vs-B preferences."""
    compare_prob: float = 0.3
    """Probability that such a user compares two answers on a given turn."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.users < 1:
            raise ValueError(f"users must be at least 1; got {self.users}")
        for name in ("rate_share", "rate_prob", "noise", "compare_share", "compare_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {value}")
        if self.noise > 0.5:
            raise ValueError(f"noise above 0.5 inverts the preference; got {self.noise}")
        if self.bias_sd < 0 or self.activity_sigma < 0:
            raise ValueError("bias_sd and activity_sigma must be >= 0")


@dataclass(frozen=True)
class SimUser:
    id: str
    """Sent as ``user`` on every request, so routing is sticky per simulated user."""
    weight: float
    """Relative activity (the population's weights sum to 1)."""
    rates: bool
    compares: bool
    bias: float


class Population:
    def __init__(self, config: PopulationConfig, *, prefix: str = "sim") -> None:
        self.config = config
        rng = random.Random(f"population-{config.seed}")
        raw = [rng.lognormvariate(0.0, config.activity_sigma) for _ in range(config.users)]
        total = sum(raw)
        width = len(str(config.users - 1))
        self.users: list[SimUser] = [
            SimUser(
                id=f"{prefix}-{config.seed}-{i:0{width}d}",
                weight=w / total,
                rates=rng.random() < config.rate_share,
                compares=rng.random() < config.compare_share,
                bias=rng.gauss(0.0, config.bias_sd) if config.bias_sd > 0 else 0.0,
            )
            for i, w in enumerate(raw)
        ]
        self._cumulative = list(itertools.accumulate(u.weight for u in self.users))

    def pick(self, rng: random.Random) -> SimUser:
        """A user, drawn in proportion to activity."""
        x = rng.random() * self._cumulative[-1]
        i = bisect.bisect_right(self._cumulative, x)
        return self.users[min(i, len(self.users) - 1)]

    def wants_to_rate(self, user: SimUser, rng: random.Random) -> bool:
        return user.rates and rng.random() < self.config.rate_prob

    def wants_to_compare(self, user: SimUser, rng: random.Random) -> bool:
        return user.compares and rng.random() < self.config.compare_prob

    def like_probability(self, user: SimUser, score: float) -> float:
        return min(1.0, max(0.0, score + user.bias))

    def thumb(self, user: SimUser, score: float, rng: random.Random) -> Thumb:
        """The vote of ``user`` on an answer the hidden preference scores ``score``."""
        liked = rng.random() < self.like_probability(user, score)
        if rng.random() < self.config.noise:
            liked = not liked
        return "up" if liked else "down"

    def choose(
        self, user: SimUser, score_a: float, score_b: float, rng: random.Random
    ) -> Literal["a", "b"]:
        """Which of two answers ``user`` prefers: ``a`` with probability
        ``sigmoid((score_a - score_b) / 0.1)`` (Bradley-Terry on the scores; equal scores
        are a coin flip), then flipped with probability ``noise``."""
        p_a = 1.0 / (1.0 + math.exp(-(score_a - score_b) / 0.1))
        a = rng.random() < p_a
        if rng.random() < self.config.noise:
            a = not a
        return "a" if a else "b"

    def top_share(self, fraction: float) -> float:
        """The share of all activity that the most active ``fraction`` of users hold."""
        k = max(1, round(fraction * len(self.users)))
        return sum(sorted((u.weight for u in self.users), reverse=True)[:k])
