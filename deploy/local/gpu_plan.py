"""How ``alignloop up`` shares one GPU between serving, the rollout engine and the trainer.

Three processes put memory on the same GPU: serving's vLLM engine, the trainer's vLLM
rollout engine and the trainer itself (the base model in float32, adapters, AdamW state,
activations). A vLLM engine takes its whole budget at start-up (weights, then as much KV
cache as fits) and its ``gpu_memory_utilization`` is a share of the GPU's total memory for
that engine alone; it refuses to start when less than that is free. Left at vLLM's
default (0.92) the first engine would take the GPU and the second would not start. So each
engine gets an explicit share, and the trainer keeps the rest:

* serving: ``serving_gpu_share`` (0.45): the engine users wait on, with the most KV cache;
* rollout engine: ``rollout_gpu_share`` (0.30): rollout batches are bounded (a few hundred
  rows of at most ``max_model_len`` tokens);
* trainer: the rest (0.25 by default, at least :data:`MIN_TRAINER_SHARE`), for the
  PyTorch caching allocator of the trainer process and each process's CUDA context.

Chosen over vLLM's sleep mode for the rollout engine (freeing its memory between rollouts):
sleeping drops the engine's loaded LoRA adapters and CUDA graphs' memory pools, and waking
costs a reload every iteration, while a fixed share keeps each process's footprint
constant, so a process that outgrows its share fails alone with its own out-of-memory error
instead of starving the others later. :func:`plan` is pure; :mod:`deploy.local.stack` gives
serving its share in ``ALIGNLOOP_ENGINE_GPU_MEMORY_UTILIZATION`` and the trainer its rollout
engine's share as ``--vllm-gpu-memory-utilization``.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_TRAINER_SHARE = 0.1
"""The trainer's process needs its CUDA context (about 0.5 GB) and room for the model it
trains: a plan that leaves it less is refused rather than run out of memory mid-round."""


@dataclass(frozen=True)
class GpuPlan:
    serving: float
    """Serving engine's ``gpu_memory_utilization``."""
    rollout: float
    """Rollout engine's ``gpu_memory_utilization``."""
    trainer: float
    """What is left for the trainer process (not enforced: vLLM's engines take theirs up
    front, so only the trainer itself can run out of it)."""


def plan(serving_share: float, rollout_share: float) -> GpuPlan:
    """The split of one GPU's memory; ``ValueError`` when a share is not in (0, 1) or the
    two engines leave the trainer less than :data:`MIN_TRAINER_SHARE`."""
    for name, share in (("serving", serving_share), ("rollout", rollout_share)):
        if not 0 < share < 1:
            raise ValueError(f"the {name} engine's GPU share must be in (0, 1), got {share}")
    trainer = round(1.0 - serving_share - rollout_share, 6)
    if trainer < MIN_TRAINER_SHARE:
        raise ValueError(
            f"serving ({serving_share}) and rollout ({rollout_share}) GPU shares leave the "
            f"trainer {trainer:.2f} of the GPU; it needs at least {MIN_TRAINER_SHARE}"
        )
    return GpuPlan(serving=serving_share, rollout=rollout_share, trainer=trainer)


def child_settings(gpu: GpuPlan) -> tuple[dict[str, str], list[str]]:
    """Serving's environment and the trainer's extra flags that apply ``gpu``."""
    env = {"ALIGNLOOP_ENGINE_GPU_MEMORY_UTILIZATION": str(gpu.serving)}
    return env, ["--vllm-gpu-memory-utilization", str(gpu.rollout)]
