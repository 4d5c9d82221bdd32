"""The torch.distributed plumbing of a PPO round: one process, or several under torchrun.

``torchrun --nproc-per-node N alignloop-train ...`` sets ``RANK`` / ``WORLD_SIZE`` /
``MASTER_ADDR``; :meth:`Dist.from_env` then joins the process group: NCCL when the ranks
train on CUDA (each rank on GPU ``LOCAL_RANK``, made its current device first), gloo on the
CPU (:func:`trainer.common.device.distributed_plan`). Each rank samples and scores its own
shard of the rollout batch; the actor-critic is wrapped in ``DistributedDataParallel``
(``device_ids``: the rank's GPU) so gradients are averaged across ranks; the few
statistics that must agree everywhere (reward normalisation moments, the early-stop KL,
the KL controller's input, logged metrics) go through the helpers below. Rank 0 alone
writes checkpoints, database rows and the candidate adapter. Without ``WORLD_SIZE`` (or
with 1) every helper is the identity and nothing is initialised.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as torch_dist

from trainer.common.device import distributed_plan, resolve_device

CLOSE_BARRIER_S = 60
"""How long a closing rank waits for the others on gloo before it closes anyway."""


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where this rank trains: the helpers' collectives run on tensors there (NCCL moves
    only CUDA tensors)."""

    @classmethod
    def from_env(cls, device: str = "auto") -> Dist:
        """This rank's place in the ``torchrun`` job (alone without ``WORLD_SIZE`` > 1) and
        its training device (``device`` as a config's ``device`` field says it)."""
        where = resolve_device(device)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        backend, _ = distributed_plan(where.type == "cuda", world_size, where.index or 0)
        if backend is None:
            return cls(device=where)
        if where.type == "cuda":
            torch.cuda.set_device(where)  # NCCL's communicator binds the current device
        if not torch_dist.is_initialized():
            torch_dist.init_process_group(backend=backend)
        return cls(torch_dist.get_rank(), torch_dist.get_world_size(), where)

    @property
    def device_ids(self) -> list[int] | None:
        """``DistributedDataParallel``'s ``device_ids``: this rank's GPU, None on the CPU."""
        cuda = self.device.type == "cuda"
        return distributed_plan(cuda, self.world_size, self.device.index or 0)[1]

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def shard(self, n: int) -> slice:
        """This rank's slice of ``n`` items (``n`` must divide evenly)."""
        if n % self.world_size:
            raise ValueError(f"{n} items do not split evenly over {self.world_size} ranks")
        per_rank = n // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` (same shape everywhere), concatenated in rank order."""
        if not self.enabled:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        torch_dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def mean(self, value: float) -> float:
        """The mean of a float over ranks."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on one (an early stop all ranks must take)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=self.device)
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def close(self) -> None:
        """Leave the job. On gloo every rank first waits for the others (bounded by
        ``CLOSE_BARRIER_S``). Gloo aborts a process (SIGABRT, "terminate called without an
        active exception") when it destroys its group while a peer's connection is still
        open. A rank that finds a peer gone closes anyway."""
        if self.enabled and torch_dist.is_initialized():
            if torch_dist.get_backend() == "gloo":
                with contextlib.suppress(RuntimeError):
                    torch_dist.monitored_barrier(timeout=timedelta(seconds=CLOSE_BARRIER_S))
            torch_dist.destroy_process_group()
