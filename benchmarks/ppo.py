"""PPO speed and memory on the demo model, against Hugging Face TRL's PPOTrainer.

One fixed configuration (the demo model, the same 256 prompts from the demo world, rollout
batch 256, mini-batch 64 (InstructGPT's, and PPOConfig's default), one PPO epoch, 48 new
tokens, temperature 1, lr 1e-5, KL coefficient 0.05, seed 0; each side gets every core,
torch's default of one thread per core) is trained by

* **alignloop**: :class:`trainer.ppo.trainer.PPOTrainer` on one base with policy, critic and
  reward LoRA adapters; rollouts from vLLM with the actor hot-loaded every iteration
  (``--rollout vllm``) or from the training model's own decode loop (``--rollout hf``); the
  default, ``auto``, is alignloop's: vLLM with a GPU, ``hf`` on CPU;
  reward = a reward model version (a LoRA adapter + head on the base, scoring 0) plus the
  rule terms of ``tests/fixtures/ppo.CONCISE`` (no filler), so the reward gain is real;
* **TRL** 1.12's four-model PPOTrainer (``benchmarks/trl_ppo_baseline.py``: policy,
  reference, value and reward models, ``transformers`` generation), in its own virtualenv.

Each side runs in a fresh child process (its peak RSS is its own), alternating
alignloop / TRL for ``--rounds`` rounds (these 2 shared cores swing by 2x between runs);
figures are medians. Prints one JSON object: ``rollout_tokens_per_s``, ``episodes_per_s``,
``seconds_per_round`` (the round's PPO iterations), ``peak_rss_mb`` (the trainer process),
``total_peak_rss_mb`` (trainer + rollout engine processes), ``reward_start``,
``reward_end``, ``final_kl``, the memory breakdown, TRL's figures and the ratios
(``speedup_episodes_per_s``, ``peak_rss_ratio``, ``total_peak_rss_ratio``).

``--rollout-batch-size`` / ``--mini-batch-size`` / ``--threads`` change the configuration
for both sides; ``--scaled-model HIDDEN,LAYERS`` trains a randomly initialised Llama of
that width and depth (the demo tokenizer and chat template) instead of the demo model, to
see where model memory, not the Python/torch floor, dominates. ``--quick``: one round of
two iterations.

    python -m benchmarks.ppo [--quick] [--rounds 3] [--rollout auto|vllm|hf] [--no-trl]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FIXED = {
    "prompts": 256,
    "rollout_batch_size": 256,
    "mini_batch_size": 64,
    "ppo_epochs": 1,
    "max_new_tokens": 48,
    "temperature": 1.0,
    "actor_lr": 1e-5,
    "init_kl_coef": 0.05,
    "seed": 0,
    "threads": 0,  # torch's default: one per core
}


def log(msg: str) -> None:
    print(f"bench ppo: {msg}", file=sys.stderr, flush=True)


def _mb(n_bytes: float) -> float:
    return round(n_bytes / 2**20, 1)


def _rss_mb(field: str = "VmRSS", pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        for task in Path(f"/proc/{current}/task").iterdir():
            children = (task / "children").read_text().split()
            out += [int(c) for c in children]
            todo += [int(c) for c in children]
    return out


# --- alignloop's side (child process) ---------------------------------------------------------


def run_alignloop(args: argparse.Namespace) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from tests.fixtures.ppo import CONCISE
    from trainer.common.device import resolve_device
    from trainer.common.malloc_tuning import keep_freed_memory
    from trainer.demo.corpus import sample_prompts
    from trainer.ppo.config import PPOConfig
    from trainer.ppo.models import PolicyModels
    from trainer.ppo.rollout.hf import HFSampler
    from trainer.ppo.rollout.vllm import VllmOptions, VllmSampler
    from trainer.ppo.trainer import PPOTrainer
    from trainer.reward.rules import ComposedReward, build_rules

    keep_freed_memory()  # as alignloop train ppo / train loop do
    rss = {"after_imports": _rss_mb()}
    device = resolve_device("auto")  # as a round's PPOConfig.device defaults to
    models = PolicyModels.load(args.model, args.reward_dir, seed=FIXED["seed"]).to(device)
    rss["after_models_load"] = _rss_mb()
    if args.rollout == "vllm":
        sampler = VllmSampler(args.model, Path(args.work) / "sync", VllmOptions())
    else:
        sampler = HFSampler(models)
    rss["after_sampler_start"] = _rss_mb()
    config = PPOConfig(
        rollout_batch_size=args.rollout_batch_size,
        mini_batch_size=args.mini_batch_size,
        ppo_epochs=FIXED["ppo_epochs"],
        max_new_tokens=FIXED["max_new_tokens"],
        temperature=FIXED["temperature"],
        actor_lr=FIXED["actor_lr"],
        init_kl_coef=FIXED["init_kl_coef"],
        lr_warmup_iterations=0,
        seed=FIXED["seed"],
    )
    reward_fn = ComposedReward(models.reward, build_rules(CONCISE)).components
    trainer = PPOTrainer(config, models, sampler, reward_fn)
    prompts = [[{"role": "user", "content": p.text}] for p in sample_prompts(0, FIXED["prompts"])]
    batch = config.rollout_batch_size
    steps = []
    started = time.perf_counter()
    for it in range(args.iterations):
        rows = prompts[(it * batch) % len(prompts) :][:batch]
        steps.append(trainer.iteration(rows, it))
        step = steps[-1]
        log(
            f"alignloop iteration {it}: {step['seconds']:.2f} s (rollout {step['rollout_s']:.2f}"
            f", scoring {step['score_s']:.2f} of it overlapped, update {step['update_s']:.2f}),"
            f" reward {step['reward_raw']:+.3f}, KL {step['kl_ref']:.3f}"
        )
    seconds = time.perf_counter() - started
    # The engine's processes (vLLM on CPU: engine core + model worker): each one's peak,
    # summed (an upper bound: their peaks need not coincide).
    engine_rss = round(sum(_rss_mb("VmHWM", p) for p in _descendants(os.getpid())), 1)
    peak = _rss_mb("VmHWM")
    gpu = {}
    if device.type == "cuda":  # the trainer process's own peak (the engine's: nvidia-smi)
        gpu = {
            "device": torch.cuda.get_device_name(device),
            "peak_gpu_allocated_mb": _mb(torch.cuda.max_memory_allocated(device)),
            "peak_gpu_reserved_mb": _mb(torch.cuda.max_memory_reserved(device)),
        }
    sampler.close()
    params = models.parameter_bytes()
    trainable = sum(p.numel() * p.element_size() for p in models.trainable_parameters())
    episodes = args.iterations * batch
    tokens = sum(s["rollout_tokens"] for s in steps)
    rollout_seconds = sum(s["rollout_s"] for s in steps)
    return {
        "episodes": episodes,
        "seconds": seconds,
        "episodes_per_s": episodes / seconds,
        "rollout_tokens_per_s": tokens / rollout_seconds,
        "peak_rss_mb": peak,
        "rollout_engine_peak_rss_mb": engine_rss,
        "total_peak_rss_mb": round(peak + engine_rss, 1),
        "rss_mb": rss,
        "memory_breakdown_mb": {
            "process_and_libraries": rss["after_imports"],
            "base_model": _mb(params["base"]),
            "adapters_and_heads": _mb(sum(v for k, v in params.items() if k != "base")),
            "optimizer_state": _mb(2 * trainable),  # AdamW: two moments per trainable value
            "activations_and_other": round(
                peak - rss["after_sampler_start"] - _mb(2 * trainable), 1
            ),
            "sampler_in_process": round(rss["after_sampler_start"] - rss["after_models_load"], 1),
            "rollout_engine_processes": engine_rss,
        },
        "reward_start": steps[0]["reward_raw"],
        "reward_end": steps[-1]["reward_raw"],
        "final_kl": steps[-1]["kl_ref"],
        "trainer_device": str(device),
        **gpu,
        "sampler_logprob_gap": statistics.mean(s["sampler_logprob_gap"] for s in steps),
        "seconds_split": {
            name: round(sum(s[name] for s in steps), 2)
            for name in ("sync_s", "rollout_s", "score_s", "update_s")
        },
    }


# --- the parent: set up, alternate, summarise -------------------------------------------------


def _child(args: argparse.Namespace, work: Path, reward_dir: Path) -> dict:
    cmd = [
        sys.executable, "-m", "benchmarks.ppo", "--child",
        "--model", str(args.model), "--reward-dir", str(reward_dir), "--work", str(work),
        "--rollout", args.rollout, "--iterations", str(args.iterations),
        "--rollout-batch-size", str(args.rollout_batch_size),
        "--mini-batch-size", str(args.mini_batch_size), "--threads", str(args.threads),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, check=True)
    return json.loads(out.stdout.splitlines()[-1])  # vLLM logs to stdout too


def _trl(args: argparse.Namespace, prompts_file: Path) -> dict:
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "trl_ppo_baseline.py"),
        "--model", str(args.model), "--prompts", str(prompts_file),
        "--episodes", str(args.iterations * args.rollout_batch_size),
        "--batch-size", str(args.rollout_batch_size),
        "--mini-batch-size", str(args.mini_batch_size),
        "--ppo-epochs", str(FIXED["ppo_epochs"]),
        "--max-new-tokens", str(FIXED["max_new_tokens"]),
        "--temperature", str(FIXED["temperature"]), "--lr", str(FIXED["actor_lr"]),
        "--kl-coef", str(FIXED["init_kl_coef"]), "--seed", str(FIXED["seed"]),
        "--threads", str(args.threads),
    ]  # fmt: skip
    out = subprocess.run(cmd, stdout=subprocess.PIPE, check=True)
    return json.loads(out.stdout.splitlines()[-1])  # vLLM logs to stdout too


def _setup(model: Path, work: Path) -> tuple[Path, Path]:
    """The flat reward model version and the prompts file (TRL's format)."""
    from tests.fixtures.ppo import flat_reward_model
    from trainer.demo.corpus import sample_prompts

    reward_dir = work / "reward"
    reward_dir.mkdir()
    flat_reward_model(model).save(reward_dir)
    prompts_file = work / "prompts.jsonl"
    with open(prompts_file, "w") as f:
        for p in sample_prompts(0, FIXED["prompts"]):
            f.write(json.dumps({"messages": [{"role": "user", "content": p.text}]}) + "\n")
    return reward_dir, prompts_file


def scaled_model(demo: Path, spec: str, out: Path) -> Path:
    """A randomly initialised Llama ``HIDDEN,LAYERS`` wide and deep (MLP 2.75x, head dim 64,
    4 KV heads) with the demo model's tokenizer, chat template and generation config."""
    import shutil

    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    hidden, layers = (int(x) for x in spec.split(","))
    config = AutoConfig.from_pretrained(demo)
    config.hidden_size, config.num_hidden_layers = hidden, layers
    config.intermediate_size = int(hidden * 2.75) // 64 * 64
    config.num_attention_heads, config.num_key_value_heads = hidden // 64, 4
    config.head_dim = 64
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    for path in demo.iterdir():  # tokenizer, chat template, generation config
        if path.is_file() and not (out / path.name).exists() and path.suffix != ".safetensors":
            shutil.copy(path, out / path.name)
    log(f"scaled model {spec}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="one round of two iterations")
    ap.add_argument("--rounds", type=int, default=3, help="alternating alignloop/TRL rounds")
    ap.add_argument("--iterations", type=int, default=4, help="PPO iterations (x64 episodes)")
    ap.add_argument(
        "--rollout",
        choices=("auto", "vllm", "hf"),
        default="auto",
        help="as RoundConfig.rollout_backend: auto = vllm with a GPU, hf on CPU",
    )
    ap.add_argument("--no-trl", action="store_true", help="skip the TRL baseline")
    ap.add_argument("--rollout-batch-size", type=int, default=FIXED["rollout_batch_size"])
    ap.add_argument("--mini-batch-size", type=int, default=FIXED["mini_batch_size"])
    ap.add_argument(
        "--threads", type=int, default=FIXED["threads"], help="per process (0: one per core)"
    )
    ap.add_argument(
        "--scaled-model", metavar="HIDDEN,LAYERS", help="a random-init Llama of this size"
    )
    ap.add_argument("--model", type=Path, help="default: the cached demo model")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--reward-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_alignloop(args)))
        return 0
    if args.quick:
        args.rounds, args.iterations = 1, 2
    from trainer.rounds.config import RoundConfig

    args.rollout = RoundConfig(rollout_backend=args.rollout).rollouts
    if args.model is None:
        from tests.fixtures.model import demo_model_cache_dir
        from trainer.demo.model import bootstrap_demo_model

        args.model = bootstrap_demo_model(demo_model_cache_dir())

    work = Path(tempfile.mkdtemp(prefix="alignloop-bench-ppo-"))
    if args.scaled_model:
        args.model = scaled_model(Path(args.model), args.scaled_model, work / "model")
    reward_dir, prompts_file = _setup(args.model, work)
    ours, theirs = [], []
    for r in range(args.rounds):
        log(f"round {r + 1}/{args.rounds}: alignloop ({args.rollout} rollouts)")
        ours.append(_child(args, work, reward_dir))
        if not args.no_trl:
            log(f"round {r + 1}/{args.rounds}: TRL PPOTrainer")
            theirs.append(_trl(args, prompts_file))

    def median(rows: list[dict], key: str) -> float:
        return round(statistics.median(row[key] for row in rows), 3)

    result = {
        "config": {
            **FIXED,
            "rollout_batch_size": args.rollout_batch_size,
            "mini_batch_size": args.mini_batch_size,
            "threads": args.threads,
            "iterations": args.iterations,
            "rollout": args.rollout,
            "model": args.scaled_model or "demo",
        },
        "rounds": args.rounds,
        "rollout_tokens_per_s": median(ours, "rollout_tokens_per_s"),
        "episodes_per_s": median(ours, "episodes_per_s"),
        "seconds_per_round": median(ours, "seconds"),
        "peak_rss_mb": median(ours, "peak_rss_mb"),
        "rollout_engine_peak_rss_mb": median(ours, "rollout_engine_peak_rss_mb"),
        "total_peak_rss_mb": median(ours, "total_peak_rss_mb"),
        "reward_start": round(ours[-1]["reward_start"], 4),
        "reward_end": round(ours[-1]["reward_end"], 4),
        "final_kl": round(ours[-1]["final_kl"], 4),
        "sampler_logprob_gap": round(ours[-1]["sampler_logprob_gap"], 5),
        "memory_breakdown_mb": ours[-1]["memory_breakdown_mb"],
        "seconds_split": ours[-1]["seconds_split"],
        "per_round_episodes_per_s": [round(o["episodes_per_s"], 2) for o in ours],
    }
    if theirs:
        trl_added = [t["peak_rss_mb"] - t["rss_mb"]["after_imports"] for t in theirs]
        our_added = [o["peak_rss_mb"] - o["rss_mb"]["after_imports"] for o in ours]
        result["trl"] = {
            "version": theirs[0]["trl_version"],
            "episodes_per_s": median(theirs, "episodes_per_s"),
            "rollout_tokens_per_s": median(theirs, "rollout_tokens_per_s"),
            "peak_rss_mb": median(theirs, "peak_rss_mb"),
            "after_imports_rss_mb": median([t["rss_mb"] for t in theirs], "after_imports"),
            "per_round_episodes_per_s": [round(t["episodes_per_s"], 2) for t in theirs],
        }
        # Alternating rounds: the ratio of each pair, then the median (run-to-run noise).
        result["speedup_episodes_per_s"] = round(
            statistics.median(
                o["episodes_per_s"] / t["episodes_per_s"] for o, t in zip(ours, theirs, strict=True)
            ),
            2,
        )
        result["peak_rss_ratio"] = round(
            statistics.median(
                o["peak_rss_mb"] / t["peak_rss_mb"] for o, t in zip(ours, theirs, strict=True)
            ),
            3,
        )
        result["total_peak_rss_ratio"] = round(
            statistics.median(
                o["total_peak_rss_mb"] / t["peak_rss_mb"] for o, t in zip(ours, theirs, strict=True)
            ),
            3,
        )
        # Peak RSS above each process's own after-imports baseline: what training adds.
        result["training_memory_ratio"] = round(
            statistics.median(a / b for a, b in zip(our_added, trl_added, strict=True)), 3
        )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
