"""Resumable checkpoints of a reward model round: adapter, head, optimizer state, step
and seed, written atomically with a sha256 manifest (:mod:`trainer.common.artifacts`);
a checkpoint whose checksums do not match is refused."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from trainer.common import artifacts
from trainer.reward.model import (
    RewardModel,
)

CHECKPOINT_STATE = "state.pt"


class CheckpointCorrupted(RuntimeError):
    """The run's checkpoint fails its checksums; resuming from it is refused."""


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (hidden temporaries are not listed)."""
    return sorted((run_dir / "checkpoints").glob("step-*"))


def save_checkpoint(
    run_dir: Path, model: RewardModel, optimizer: torch.optim.Optimizer, step: int, seed: int
) -> Path:
    """Write ``step-NNNNNN`` atomically (manifest included), then drop older ones."""
    target = run_dir / "checkpoints" / f"step-{step:06d}"
    state = {
        "step": step,
        "seed": seed,
        "trainable": model.trainable_state(),
        "optimizer": optimizer.state_dict(),
    }
    artifacts.write_dir_atomically(target, lambda d: torch.save(state, d / CHECKPOINT_STATE))
    for older in list_checkpoints(run_dir):
        if older != target:
            shutil.rmtree(older, ignore_errors=True)
    return target


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The saved state, after checking the manifest; a mismatch is refused."""
    try:
        artifacts.verify_dir(path)
    except artifacts.CorruptedDirectory as exc:
        raise CheckpointCorrupted(
            f"checkpoint {path} is corrupted ({exc}); refusing to resume from it. "
            "Delete it, or start over with --fresh."
        ) from exc
    # On the CPU first: a round resumed on another device (or none) still loads it; the
    # model and the optimizer copy the tensors to where their parameters are.
    return torch.load(path / CHECKPOINT_STATE, weights_only=True, map_location="cpu")
