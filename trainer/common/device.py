"""Where training runs and in which precision: one decision, made here, for every trainer.

* **Device** (:func:`resolve_device`): a config's ``device`` field (``auto``, ``cpu``,
  ``cuda``); ``auto`` is CUDA when torch sees a GPU, else the CPU. Under ``torchrun`` a CUDA
  rank takes GPU ``LOCAL_RANK``.
* **Precision** (:func:`autocast`): on CUDA, bfloat16 autocast over float32 weights: every
  parameter, gradient and AdamW moment stays float32 (the master copy), and the matrix
  products run in bfloat16. That is what ``accelerate``'s ``mixed_precision="bf16"`` (TRL's
  trainers) does. Why, and not bfloat16 weights: a LoRA update ``lr * g`` is often below
  bfloat16's resolution of a weight (8 bits of mantissa), so bfloat16 weights would drop
  it; and one set of weights under one autocast policy keeps the frozen reference (the
  base, adapters disabled) the very computation the base model does on that device. On the
  CPU, ``auto`` takes the same bfloat16 autocast for models of 10 M parameters and more
  on CPUs that multiply bfloat16 natively (AVX-512 BF16, AMX), float32 otherwise; a
  config's ``precision`` (``float32``, ``bfloat16``) overrides that (docs/benchmarks.md
  has the measured difference).
* **Folded LoRA** (:func:`folding_pays`): the folded fast path
  (:mod:`trainer.common.lora_folding`) was measured faster on the CPU only; it has not
  been measured on CUDA, so PEFT's own LoRA layers run there until it is.
* **torch.distributed** (:func:`distributed_plan`): NCCL when the ranks' tensors are on
  CUDA (each rank on its own GPU, ``device_ids`` for DDP), gloo when they are on the CPU.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch

from schemas.config import TrainingDevice, TrainingPrecision
from serving.engine import cpu_multiplies_bf16  # serving's engine makes the same decision

log = logging.getLogger(__name__)

MIXED_PRECISION_DTYPE = torch.bfloat16
"""The dtype of CUDA's autocast regions (Ampere and newer run it natively)."""


def resolve_device(
    requested: TrainingDevice | str = "auto",
    *,
    cuda_available: bool | None = None,
    local_rank: int | None = None,
) -> torch.device:
    """The device ``requested`` names on this machine.

    ``auto``: CUDA when available, else the CPU. A CUDA device is GPU ``local_rank``
    (default: ``LOCAL_RANK`` from ``torchrun``, else 0). ``cuda`` without a GPU raises
    ``ValueError`` instead of falling back: a round asked for the GPU must not crawl on the
    CPU unnoticed.
    """
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {requested!r}")
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if requested == "cpu" or (requested == "auto" and not cuda_available):
        return torch.device("cpu")
    if not cuda_available:
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA GPU")
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return torch.device("cuda", local_rank)


CPU_BF16_MIN_PARAMETERS = 10_000_000
"""From this many parameters up, ``auto`` runs a model under bfloat16 autocast on a CPU that
multiplies bfloat16 natively. Measured (docs/benchmarks.md, "bfloat16 on the CPU"): at 31 M
and 135 M parameters the round is 1.6-1.7x faster and no heavier; on the 2 M demo model it is
no faster and oneDNN's bfloat16 kernels cost it 4.6x the training memory."""


def autocast_dtype(
    device: torch.device,
    precision: TrainingPrecision | str = "auto",
    parameters: int | None = None,
) -> torch.dtype | None:
    """The autocast dtype of passes on ``device`` at a config's ``precision``, for a model of
    ``parameters`` parameters: bfloat16 for ``bfloat16``; None (float32, no autocast) for
    ``float32``. ``auto``: bfloat16 on CUDA; on the CPU bfloat16 only for a model of at
    least :data:`CPU_BF16_MIN_PARAMETERS` on a CPU that :func:`cpu_multiplies_bf16`,
    else float32 (also when the size is not given)."""
    if precision not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"precision must be auto, float32 or bfloat16, got {precision!r}")
    if precision == "bfloat16" and device.type == "cpu" and not cpu_multiplies_bf16():
        _warn_emulated_bf16()
    if precision == "bfloat16" or (precision == "auto" and device.type == "cuda"):
        return MIXED_PRECISION_DTYPE
    large = parameters is not None and parameters >= CPU_BF16_MIN_PARAMETERS
    if precision == "auto" and device.type == "cpu" and large and cpu_multiplies_bf16():
        return MIXED_PRECISION_DTYPE
    return None


@functools.cache
def _warn_emulated_bf16() -> None:
    """Once per process: bfloat16 asked for on a CPU that emulates its products."""
    log.warning(
        "precision bfloat16 on a CPU without native bfloat16 products (no AVX-512 BF16, no "
        "AMX): every product is emulated, hundreds of times slower than float32 here "
        "(docs/benchmarks.md, 'A CPU without bfloat16'); precision auto runs float32 on it"
    )


def autocast(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[object]:
    """A forward pass's precision: ``torch.autocast`` to ``dtype`` on ``device``, or nothing
    when ``dtype`` is None. Models keep ``autocast_dtype(device)`` as their policy (tests set
    bfloat16 on the CPU to check the CUDA policy's exactness claims here)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def folding_pays(device: torch.device) -> bool:
    """Whether the folded-LoRA fast path is used on ``device`` (measured on the CPU only)."""
    return device.type == "cpu"


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (the CPU for one without any)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def distributed_plan(
    cuda: bool, world_size: int, local_rank: int = 0
) -> tuple[str | None, list[int] | None]:
    """``(backend, device_ids)`` of a data-parallel run: ``(None, None)`` alone (no process
    group), NCCL with DDP's ``device_ids = [local_rank]`` when the tensors are on CUDA
    (``cuda``), gloo and no ``device_ids`` when they are on the CPU. NCCL cannot move CPU
    tensors, so the backend follows where the tensors are, not whether a GPU exists."""
    if world_size <= 1:
        return None, None
    if cuda:
        return "nccl", [local_rank]
    return "gloo", None
