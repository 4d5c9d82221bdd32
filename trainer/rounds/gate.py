"""The registration gate of a training round: accept or reject a candidate on its offline
evaluation (:func:`trainer.ppo.evaluation.evaluate`) against the round's bars."""

from __future__ import annotations

from typing import Any

from trainer.rounds.config import RoundConfig


def gate(metrics: dict[str, Any], config: RoundConfig) -> tuple[bool, str]:
    """Accept or reject a candidate on its evaluation; the reason says which bars it missed."""
    problems = []
    if metrics["win_rate"] < config.gate_min_win_rate:
        problems.append(
            f"win rate {metrics['win_rate']:.3f} against the stable policy < "
            f"{config.gate_min_win_rate}"
        )
    if metrics["kl_to_reference"] > config.gate_max_kl:
        problems.append(f"KL to reference {metrics['kl_to_reference']:.3f} > {config.gate_max_kl}")
    if metrics["distinct_2_ratio"] < config.gate_min_distinct_ratio:
        problems.append(
            f"distinct-2 ratio {metrics['distinct_2_ratio']:.3f} < "
            f"{config.gate_min_distinct_ratio} (answers lost diversity)"
        )
    if problems:
        return False, "; ".join(problems)
    return True, (
        f"passed: win rate {metrics['win_rate']:.3f}, reward gain "
        f"{metrics['reward_gain']:+.3f}, KL {metrics['kl_to_reference']:.3f}, distinct-2 ratio "
        f"{metrics['distinct_2_ratio']:.3f}"
    )
