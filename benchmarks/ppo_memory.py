"""Where a PPO iteration's training memory goes: per phase, heap in use against heap held.

``benchmarks/ppo.py`` reports one number per run, the training-only peak RSS. This profile
says what that peak is made of, for alignloop alone, in one process set up as that
benchmark's alignloop child (same models, prompts, hyperparameters and glibc settings):

1. **phases**: around each decode (``HFSampler._generate``), scoring pass
   (``PPOTrainer._score_tokens``) and update (``PPOTrainer._update``), glibc's heap in use
   (``mallinfo2``: bytes of live blocks) and heap held (the main arena's size), and the
   RSS, at entry and exit. In use rising across an update and staying up is a cache
   (oneDNN keeps a compiled kernel per product shape); held rising while in use falls back
   is fragmentation (the heap top cannot come down past a live block);
2. **rss**: at the end, anonymous and file-backed RSS against after the model load (file
   pages are library code paged in by first use: counted in RSS, shared, and reclaimable);
3. **activations**: the tensors one training micro-batch keeps for its backward (a
   ``saved_tensors_hooks`` census of one forward, parameters left out), per token, grouped
   by dtype and width: what a micro-batch of ``micro_batch_size`` rows costs.

glibc only (``mallinfo2``); elsewhere the heap figures are null.

    ./dev bench ppo_memory --scaled-model 512,10 --rollout-batch-size 64 \\
        --mini-batch-size 16 [--micro-batch-size 4] [--precision bfloat16]
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import functools
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import ppo as bench_ppo
from benchmarks.models import model_dir

MB = 1 << 20


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _mallinfo() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):  # not glibc, or glibc < 2.33
        return None
    return libc.mallinfo2


MALLINFO = _mallinfo()


def heap_mb() -> dict[str, float | None]:
    """The heap in use (live blocks, mmap-served ones included) and held (main arena)."""
    if MALLINFO is None:
        return {"in_use": None, "held": None}
    info = MALLINFO()
    return {
        "in_use": round((info.uordblks + info.hblkhd) / MB, 1),
        "held": round((info.arena + info.hblkhd) / MB, 1),
    }


def rss_mb() -> dict[str, float]:
    """VmRSS, RssAnon and RssFile of this process, in MB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = round(int(line.split()[1]) / 1024, 1)
    return out


def record_phases(timeline: list[dict[str, Any]]) -> None:
    """Wrap the trainer's three phases so that each call appends its heap and RSS at entry
    and exit to ``timeline`` (a profiler's wrapping: the methods are the trainer's own)."""
    from trainer.ppo.rollout.hf import HFSampler
    from trainer.ppo.trainer import PPOTrainer

    def wrap(cls: type, name: str, phase: str) -> None:
        method = getattr(cls, name)

        @functools.wraps(method)
        def recorded(*args: Any, **kwargs: Any) -> Any:
            entry = {**heap_mb(), "rss": rss_mb()}
            try:
                return method(*args, **kwargs)
            finally:
                timeline.append(
                    {"phase": phase, "enter": entry, "exit": {**heap_mb(), "rss": rss_mb()}}
                )

        setattr(cls, name, recorded)

    wrap(HFSampler, "_generate", "decode")
    wrap(PPOTrainer, "_score_tokens", "score")
    wrap(PPOTrainer, "_update", "update")


def saved_activations(
    model: Path, reward_dir: Path, rows: int, prompt: int, answer: int, precision: str
) -> dict[str, Any]:
    """What one training forward of ``rows`` rows of ``prompt + answer`` random tokens keeps
    for its backward, per token, parameters left out."""
    import torch

    from trainer.common.device import resolve_device
    from trainer.ppo.models import PolicyModels, TokenBatch

    models = PolicyModels.load(model, reward_dir, critic="shared").to(
        resolve_device("auto"), precision
    )
    params = {p.untyped_storage().data_ptr() for p in models.peft_model.parameters()}
    params |= {p.untyped_storage().data_ptr() for p in models.actor_critic.parameters()}
    generator = torch.Generator().manual_seed(0)
    vocab = models.peft_model.get_input_embeddings().weight.shape[0]

    def ids(n: int) -> list[list[int]]:
        return torch.randint(3, vocab, (rows, n), generator=generator).tolist()

    batch = TokenBatch.build(ids(prompt), ids(answer), 0, models.device)
    seen: set[int] = set()
    groups: collections.Counter[str] = collections.Counter()

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in seen and key not in params:
            seen.add(key)
            groups[f"{str(t.dtype).removeprefix('torch.')}[{t.shape[-1] if t.dim() else 1}]"] += (
                storage.nbytes()
            )
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        models.actor_critic(batch, None, entropy_grad=False)
    tokens = rows * (prompt + answer)
    total = sum(groups.values())
    return {
        "rows": rows,
        "tokens": tokens,
        "total_mb": round(total / MB, 1),
        "kb_per_token": round(total / tokens / 1024, 1),
        "by_dtype_and_width_kb_per_token": {
            key: round(n / tokens / 1024, 1) for key, n in groups.most_common() if n >= MB // 4
        },
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="demo", help="demo, smollm2 or a model directory")
    ap.add_argument("--scaled-model", metavar="HIDDEN,LAYERS", help="as benchmarks/ppo.py")
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--rollout-batch-size", type=int, default=64)
    ap.add_argument("--mini-batch-size", type=int, default=16)
    ap.add_argument("--micro-batch-size", type=int, default=0, help="0: PPOConfig's default")
    ap.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="PPOConfig.activation_checkpointing (bench ppo's flag of the same name)",
    )
    ap.add_argument(
        "--checkpoint-every",
        type=int,
        default=1,
        metavar="N",
        help="PPOConfig.checkpoint_every (bench ppo's flag of the same name)",
    )
    ap.add_argument(
        "--shared-prefix-min-tokens",
        type=int,
        default=bench_ppo.PPOConfig.shared_prefix_min_tokens,
        metavar="N",
        help="PPOConfig.shared_prefix_min_tokens (bench ppo's flag of the same name)",
    )
    ap.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    args.micro_batch_size = args.micro_batch_size or bench_ppo.PPOConfig.micro_batch_size
    work = Path(tempfile.mkdtemp(prefix="alignloop-bench-ppo-memory-"))
    args.model = Path(model_dir(args.model))
    if args.scaled_model:
        args.model = bench_ppo.scaled_model(args.model, args.scaled_model, work / "model")
    args.precision = bench_ppo.resolved_precision(args.model, args.precision)
    reward_dir, _ = bench_ppo._setup(args.model, work, "small")
    timeline: list[dict[str, Any]] = []
    record_phases(timeline)
    child = argparse.Namespace(
        **vars(args),
        reward_dir=reward_dir,
        rollout="hf",
        lr=bench_ppo.FIXED["actor_lr"],
        critic="shared",
        reward="small",
        save_policy=None,
        system_prompt=None,
        work=work,
    )
    run = bench_ppo.run_alignloop(child)
    at_end = {"rss": rss_mb(), "heap": heap_mb()}
    # A micro-batch as the run's: answers of the run's mean length after a 13-token prompt.
    mean_answer = max(1, round(run["tokens_generated"] / run["episodes"]))
    activations = saved_activations(
        args.model, reward_dir, args.micro_batch_size, 13, mean_answer, args.precision
    )
    result = {
        "config": {
            "model": str(args.model if not args.scaled_model else f"llama {args.scaled_model}"),
            "policy_parameters": run["policy_parameters"],
            "precision": args.precision,
            "rollout_batch_size": args.rollout_batch_size,
            "mini_batch_size": args.mini_batch_size,
            "micro_batch_size": args.micro_batch_size,
            "activation_checkpointing": args.activation_checkpointing,
            "checkpoint_every": args.checkpoint_every,
            "shared_prefix_min_tokens": args.shared_prefix_min_tokens,
            "iterations": args.iterations,
        },
        "episodes_per_s": round(run["episodes_per_s"], 2),
        "training_peak_rss_mb": run["training_peak_rss_mb"],
        "rss_after_models_load_mb": run["rss_mb"]["after_models_load"],
        "at_end_mb": at_end,
        "phases": timeline,
        "saved_for_backward": activations,
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
