"""How much each principal's votes may weigh: a cap on one API key's share.

A product key rates on behalf of its own end users (`serving.response_ids` binds each vote
to the key and user that were served), so one key can still send many votes through many
user ids. The canary's comparison (:mod:`deploy.canary.data`) and the reward model's data
(:mod:`trainer.reward.data`) therefore weigh each principal's votes so that no principal
carries more than ``cap`` of the weighted total:

    weight_p = 1                      for a principal within the cap,
    weight_p = cap · T / votes_p      for one above it, where
    T = (votes of the uncapped) / (1 − cap · number capped)

is the weighted total (water-filling: capping one principal lowers the total, which may
push another over the cap, so principals are capped largest first until none is over).
Every capped principal then carries exactly ``cap · T``; the uncapped keep their votes.
The smallest principal is never capped (its votes are what the others are weighed
against), so with one principal every weight is 1, and with a cap below 1/k for k
principals the smallest carries more than the cap.
"""

from __future__ import annotations

from collections.abc import Mapping


def principal_weights(votes: Mapping[str, float], cap: float) -> dict[str, float]:
    """Each principal's weight in [0, 1] (see the module docstring). ``cap`` in (0, 1]:
    1 caps nothing."""
    if not 0.0 < cap <= 1.0:
        raise ValueError(f"cap must lie in (0, 1], not {cap}")
    weights = {p: 1.0 for p in votes}
    if cap >= 1.0 or len(votes) < 2:
        return weights
    order = sorted(votes, key=lambda p: votes[p], reverse=True)
    uncapped = float(sum(votes.values()))
    capped: list[str] = []
    for p in order:
        n_capped = len(capped) + 1
        if n_capped * cap >= 1.0:
            break  # capping this one too would leave no total to weigh against
        rest = uncapped - votes[p]
        if rest <= 0.0:
            break  # the last one: nothing left to weigh it against
        total = rest / (1.0 - cap * n_capped)
        if votes[p] <= cap * total:
            break  # largest first: once one is within the cap, all smaller ones are
        capped.append(p)
        uncapped = rest
    if not capped or uncapped <= 0.0:
        return weights
    total = uncapped / (1.0 - cap * len(capped))
    for p in capped:
        weights[p] = cap * total / votes[p]
    return weights
