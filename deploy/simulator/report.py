"""What a simulation measured: per-minute tables and the final JSON summary.

Contract. A :class:`Recorder` collects one :class:`Observation` per answer served (its
time on the run's clock, the policy version that served it, its length in words, and the
thumb once the API accepted it with 202) plus error counts by kind. From it:

* :func:`window_stats` and :func:`format_window`: the per-minute table, one row per
  policy version: served, rated, thumbs-up rate with a 95 % Wilson interval, mean answer
  length in words, and that version's registry state at the end of the minute;
* :func:`build_summary`: the final :class:`Summary` (``to_dict()`` is the JSON): times from
  the first accepted rating to the first candidate / canary / promotion, thumbs-up rate of
  the base vs the final stable version (with intervals), KL of the stable to the base (the
  registry's ``metrics.evaluation.kl_to_reference`` of that version; 0 for the base
  itself), promotions, rollbacks, rejections, totals and errors.

Registry facts come in as plain values (:class:`RegistryFacts`); with no admin access they
are None and the summary says why (``registry_note``). Nothing here does I/O except
writing the table to the stream it is given.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TextIO

Z95 = 1.959963984540054


def wilson(ups: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion ``ups / n`` (None when ``n`` is 0)."""
    if n <= 0:
        return None
    if not 0 <= ups <= n:
        raise ValueError(f"ups must be in [0, n]; got {ups} of {n}")
    p = ups / n
    z2 = z * z
    denominator = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Observation:
    t: float
    """Seconds since the run started, when the answer arrived."""
    version: str
    words: int
    rating: Literal["up", "down"] | None = None
    """Set once ``POST /v1/feedback`` answered 202."""


@dataclass
class Recorder:
    observations: list[Observation] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    turns: int = 0
    chats: int = 0
    preferences: int = 0
    first_rating_t: float | None = None

    def served(self, t: float, version: str, words: int) -> Observation:
        obs = Observation(t, version, words)
        self.observations.append(obs)
        self.chats += 1
        return obs

    def rated(self, obs: Observation, rating: Literal["up", "down"], t: float) -> None:
        obs.rating = rating
        if self.first_rating_t is None or t < self.first_rating_t:
            self.first_rating_t = t

    def error(self, kind: str) -> None:
        self.errors[kind] += 1


@dataclass
class VersionStats:
    version: str
    served: int = 0
    rated: int = 0
    ups: int = 0
    words: int = 0

    def add(self, obs: Observation) -> None:
        self.served += 1
        self.words += obs.words
        if obs.rating is not None:
            self.rated += 1
            self.ups += obs.rating == "up"

    @property
    def up_rate(self) -> float | None:
        return self.ups / self.rated if self.rated else None

    @property
    def interval(self) -> tuple[float, float] | None:
        return wilson(self.ups, self.rated)

    @property
    def mean_words(self) -> float | None:
        return self.words / self.served if self.served else None

    def to_dict(self) -> dict[str, Any]:
        ci = self.interval
        return {
            "version": self.version,
            "served": self.served,
            "rated": self.rated,
            "ups": self.ups,
            "up_rate": _rounded(self.up_rate),
            "up_rate_ci95": None if ci is None else [_rounded(ci[0]), _rounded(ci[1])],
            "mean_words": _rounded(self.mean_words, 2),
        }


def _rounded(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def window_stats(
    observations: list[Observation], t0: float = -math.inf, t1: float = math.inf
) -> dict[str, VersionStats]:
    """Per version, the answers served in [t0, t1)."""
    out: dict[str, VersionStats] = {}
    for obs in observations:
        if t0 <= obs.t < t1:
            out.setdefault(obs.version, VersionStats(obs.version)).add(obs)
    return out


HEADER = (
    f"{'minute':>6}  {'version':<14} {'served':>6} {'rated':>6} {'up-rate':>7} "
    f"{'95% CI':<15} {'words':>6}  state"
)


def format_window(
    minute: int, stats: dict[str, VersionStats], states: dict[str, str] | None
) -> list[str]:
    """The table rows of one minute (``states``: version -> registry state, or None when
    the registry is not tracked). A minute with no traffic still gets a row."""
    rows = []
    for version in sorted(stats):
        s = stats[version]
        ci = s.interval
        rate = "-" if s.up_rate is None else f"{s.up_rate:.3f}"
        ci_text = "-" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"
        words = "-" if s.mean_words is None else f"{s.mean_words:.1f}"
        state = "?" if states is None else states.get(version, "-")
        rows.append(
            f"{minute:>6}  {version:<14} {s.served:>6} {s.rated:>6} {rate:>7} "
            f"{ci_text:<15} {words:>6}  {state}"
        )
    if not rows:
        rows.append(f"{minute:>6}  {'(no traffic)':<14} {0:>6} {0:>6}")
    return rows


def print_window(
    out: TextIO | None,
    minute: int,
    stats: dict[str, VersionStats],
    states: dict[str, str] | None,
    registry_line: str | None,
) -> None:
    if out is None:
        return
    lines = format_window(minute, stats, states)
    if registry_line:
        lines.append(f"{'':>6}  registry: {registry_line}")
    print("\n".join(lines), file=out, flush=True)


# --- the summary ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegistryEvent:
    t: float
    """Seconds since the run started."""
    event: str
    """candidate, canary, promotion, rollback, restore or rejection."""
    version: str


@dataclass
class RegistryFacts:
    """What the admin API told us; ``tracked`` False (and ``note`` why) without access."""

    tracked: bool
    note: str | None = None
    events: list[RegistryEvent] = field(default_factory=list)
    final_stable: str | None = None
    final_canary: str | None = None
    states: dict[str, str] = field(default_factory=dict)
    kl_to_reference: dict[str, float | None] = field(default_factory=dict)
    """Per version, ``metrics.evaluation.kl_to_reference`` as registered (None: absent)."""


@dataclass
class Summary:
    started_at: str
    duration_s: float
    stopped_by: str
    first_rating_s: float | None
    registry_tracked: bool
    registry_note: str | None
    time_to_first_candidate_s: float | None
    time_to_first_canary_s: float | None
    time_to_first_promotion_s: float | None
    promotions: int | None
    rollbacks: int | None
    rejections: int | None
    base: dict[str, Any]
    final_stable: dict[str, Any] | None
    kl_stable_to_base: float | None
    versions: dict[str, dict[str, Any]]
    registry_states: dict[str, str] | None
    events: list[dict[str, Any]]
    totals: dict[str, int]
    errors: dict[str, int]
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _first(events: list[RegistryEvent], kind: str) -> RegistryEvent | None:
    return next((e for e in sorted(events, key=lambda e: e.t) if e.event == kind), None)


# Long only in lines: one Summary field per line.
def build_summary(
    recorder: Recorder,
    registry: RegistryFacts,
    *,
    started_at: str,
    duration_s: float,
    stopped_by: str,
    base_version: str = "base",
    config: dict[str, Any] | None = None,
) -> Summary:
    """The run's summary. Times are seconds from the first accepted rating (from the start
    of the run when nothing was rated)."""
    per_version = window_stats(recorder.observations)
    origin = recorder.first_rating_t if recorder.first_rating_t is not None else 0.0

    def since_origin(kind: str) -> float | None:
        if not registry.tracked:
            return None
        e = _first(registry.events, kind)
        return None if e is None else round(e.t - origin, 2)

    def count(kind: str) -> int | None:
        if not registry.tracked:
            return None
        return sum(1 for e in registry.events if e.event == kind)

    base = per_version.get(base_version, VersionStats(base_version)).to_dict()
    final_stable = kl = None
    if registry.final_stable is not None:
        v = registry.final_stable
        final_stable = per_version.get(v, VersionStats(v)).to_dict()
        kl = 0.0 if v == base_version else registry.kl_to_reference.get(v)
    ratings = sum(s.rated for s in per_version.values())
    return Summary(
        started_at=started_at,
        duration_s=round(duration_s, 2),
        stopped_by=stopped_by,
        first_rating_s=_rounded(recorder.first_rating_t, 2),
        registry_tracked=registry.tracked,
        registry_note=registry.note,
        time_to_first_candidate_s=since_origin("candidate"),
        time_to_first_canary_s=since_origin("canary"),
        time_to_first_promotion_s=since_origin("promotion"),
        promotions=count("promotion"),
        rollbacks=count("rollback"),
        rejections=count("rejection"),
        base=base,
        final_stable=final_stable,
        kl_stable_to_base=kl,
        versions={v: s.to_dict() for v, s in sorted(per_version.items())},
        registry_states=dict(registry.states) if registry.tracked else None,
        events=[
            {"t_s": round(e.t - origin, 2), "event": e.event, "version": e.version}
            for e in sorted(registry.events, key=lambda e: e.t)
        ],
        totals={
            "turns": recorder.turns,
            "chats": recorder.chats,
            "ratings": ratings,
            "ups": sum(s.ups for s in per_version.values()),
            "preferences": recorder.preferences,
            "errors": sum(recorder.errors.values()),
        },
        errors=dict(sorted(recorder.errors.items())),
        config=config or {},
    )
