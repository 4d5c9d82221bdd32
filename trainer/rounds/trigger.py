"""When the periodic trainer starts a PPO round: enough new feedback, or enough time.

Pure logic, no I/O: the loop measures the inputs (``feedback.datasets.new_ratings_since`` the
last round's watermark, and the time since the last round started) and asks
:func:`should_start`. The answer is the human reason that becomes the round's ``trigger``,
or None for "not yet".

Two ways to start:

* **count**: ``min_new_ratings`` new ratings (thumbs and preferences) since the last round,
  or, before the first round ever, in total;
* **timer**: ``max_interval_s`` since the last round started, with at least
  ``min_ratings_for_timer`` new ratings: a quiet service still gets periodic rounds, but
  never a round on no new feedback at all (it would retrain on the same data). The timer
  needs a previous round to measure from, so the first round always waits for the count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from schemas.config import ConfigBase


@dataclass(frozen=True)
class TriggerConfig(ConfigBase):
    """The scheduler's thresholds."""

    min_new_ratings: int = field(
        default=200,
        metadata={
            "help": "New ratings (thumbs up/down events and preference pairs ingested since "
            "the last round's watermark) that start a round at once. At least 1. Default "
            "200: enough fresh signal for the reward model to move."
        },
    )
    max_interval_s: float = field(
        default=3600.0,
        metadata={
            "help": "Seconds after the last round started when a round starts on fewer "
            "ratings (but at least min_ratings_for_timer). > 0; math.inf turns the timer "
            "off. Default 3600 (hourly)."
        },
    )
    min_ratings_for_timer: int = field(
        default=1,
        metadata={
            "help": "New ratings a timer start still needs: at least 1 (no round on zero new "
            "feedback), at most min_new_ratings. Default 1."
        },
    )

    wait_for_decision: bool = field(
        default=True,
        metadata={
            "help": "No new round while a candidate or canary awaits the controller's "
            "decision: the next round then starts from the policy live users chose (its "
            "parent is the stable of that moment), instead of training a sibling of the "
            "canary on the same parent."
        },
    )

    def checks(self) -> list[tuple[bool, str, str]]:
        return [
            (
                isinstance(self.min_new_ratings, int) and self.min_new_ratings >= 1,
                "min_new_ratings",
                "must be an integer >= 1",
            ),
            (self.max_interval_s > 0, "max_interval_s", "must be > 0 (inf: no timer)"),
            (
                isinstance(self.min_ratings_for_timer, int)
                and 1 <= self.min_ratings_for_timer <= self.min_new_ratings,
                "min_ratings_for_timer",
                f"must be an integer in [1, min_new_ratings={self.min_new_ratings}]",
            ),
        ]


def _ratings(n: int) -> str:
    return f"{n} new rating{'' if n == 1 else 's'}"


def should_start(
    new_ratings: int, seconds_since_last: float | None, config: TriggerConfig
) -> str | None:
    """The reason to start a round now, or None to wait.

    ``new_ratings``: ratings and preferences since the last round's watermark (all of them
    when there was no round). ``seconds_since_last``: since the last round started, None
    when there was none. A negative interval (clock skew) counts as "just now".
    """
    if new_ratings < 0:
        raise ValueError(f"new_ratings must be >= 0, got {new_ratings}")
    if seconds_since_last is not None and math.isnan(seconds_since_last):
        raise ValueError("seconds_since_last is NaN")
    if new_ratings >= config.min_new_ratings:
        reason = f"{_ratings(new_ratings)} >= {config.min_new_ratings}"
        return f"first round: {reason}" if seconds_since_last is None else reason
    if (
        seconds_since_last is not None
        and seconds_since_last >= config.max_interval_s
        and new_ratings >= config.min_ratings_for_timer
    ):
        return f"{seconds_since_last:.0f} s since the last round and {_ratings(new_ratings)}"
    return None
