"""PPO speed and memory against Hugging Face TRL's PPOTrainer, like for like.

One fixed configuration (``--model``: the demo model, SmolLM2-135M-Instruct or a directory;
the same 256 prompts from the demo world, rollout batch 256, mini-batch 64 (InstructGPT's,
and PPOConfig's default), one PPO epoch, 48 new tokens, temperature 1, lr 1e-5, KL
coefficient 0.05, seed 0; each side gets every core, torch's default of one thread per
core) is trained by

* **alignloop**: :class:`trainer.ppo.trainer.PPOTrainer` on one base with a policy LoRA
  adapter and its critic (``--critic``, a round's default ``auto``); rollouts from vLLM with
  the actor hot-loaded every iteration (``--rollout vllm``) or from the training model's own
  decode loop (``--rollout hf``); the default, ``auto``, is alignloop's: vLLM with a GPU,
  ``hf`` on CPU;
* the reward (``--reward``): ``small`` (default), one small sequence classifier
  (:func:`small_reward_model`, 1.1M parameters with the demo tokenizer) both sides score
  with, TRL's value model a copy of it (TRL's own convention); ``flat``, alignloop a zero-head
  LoRA reward model plus the rule terms of ``tests/fixtures/ppo.CONCISE``, TRL a fresh head
  on the policy's backbone;
* **TRL** 1.12's PPOTrainer (``benchmarks/trl_ppo_baseline.py``, ``transformers``
  generation, in its own virtualenv) in two configurations: ``trl_full`` (full fine-tuning;
  policy, reference, value and reward models) and ``trl_lora`` (its ``peft_config``: a LoRA
  of alignloop's rank, alpha and target modules on the policy; the reference is the policy
  with the adapter disabled), both at TRL's default ``local_rollout_forward_batch_size``.

Both sides: the PPO hyperparameters of :data:`SHARED` (the same values wherever both expose
them; what cannot match is :data:`DIFFERENCES_NOT_REMOVED`, printed with the result) and
the same allocator in every process (``--allocator``; default ``auto``, what alignloop's
trainer runs on: jemalloc preloaded where the machine has it, ``trainer/common/
jemalloc.py``, else glibc with alignloop's settings, ``trainer/common/malloc_tuning.py``)
and the same capacities of torch's caches of oneDNN computations (``--onednn-cache-capacity``;
default what alignloop's trainer keeps, ``trainer/common/onednn_cache.py``).

Each side runs in a fresh child process (its peak RSS is its own), in an order that
alternates every round (alignloop, TRL full, TRL LoRA; then reversed; ...) for ``--rounds``
(at least 3) rounds; these 2 shared cores swing by 2x between runs. Prints one JSON object:
per side (``sides``), per round and as medians, the gradient (optimizer) steps taken, KL
early stops, episodes, tokens generated, episodes/s, rollout tokens/s, peak RSS of the whole
process and training-only (the peak minus the RSS after imports and model load, weights paged
in), reward before/after (each side's own reward: not comparable across sides) and final KL; the
``ratios`` of alignloop's medians to the better TRL configuration's for each metric (and
which one that was); alignloop's headline figures and memory breakdown at the top level.

``--precision`` (default ``auto``: what alignloop's ``auto`` picks for the model on this
machine) runs both sides in float32 or under bfloat16 autocast over float32 weights
(alignloop's ``PPOConfig.precision``, TRL's ``bf16=True``; what each covers differs, see
:data:`PRECISION_DIFFERENCE`). ``--rollout-batch-size`` / ``--mini-batch-size`` /
``--threads`` change the configuration for both sides; ``--micro-batch-size`` alignloop's
rows per forward/backward and ``--activation-checkpointing`` its
``PPOConfig.activation_checkpointing`` (memory against speed; the gradient is unchanged),
``--checkpoint-every N`` its ``checkpoint_every`` (every N-th layer checkpointed);
``--scaled-model HIDDEN,LAYERS`` trains a randomly initialised Llama of that width and
depth (the demo tokenizer and chat template) instead of the demo model, to see where model
memory, not the Python/torch floor, dominates. ``--system-prompt TEXT`` opens every prompt
with that system message on both sides (:func:`conversations`): a product's own
instructions, what a production round's prompts begin with. ``--quick``: two iterations
per run (still every round). ``--no-trl``: alignloop alone.

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
from typing import Any, get_args

from benchmarks.models import model_dir, model_label
from benchmarks.trl_ppo_baseline import page_in  # one definition for both sides
from trainer.common import onednn_cache
from trainer.common.jemalloc import find_jemalloc, preloaded_env
from trainer.ppo.config import CriticKind, PPOConfig
from trainer.rounds.config import RoundConfig

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

# PPO hyperparameters both sides expose, set to the same value on both (issue 19): alignloop's
# defaults where TRL lets them be set, TRL's where alignloop must follow (one learning rate
# for policy and value, no KL early stop: TRL 1.12 has neither a critic rate nor a target KL).
SHARED: dict[str, Any] = {
    "critic_lr": FIXED["actor_lr"],
    "lr_schedule": "constant",  # alignloop: no warm-up; TRL: lr_scheduler_type constant
    "clip_range": 0.2,
    "value_clip_range": 0.2,
    "vf_coef": 0.5,
    "gamma": 1.0,
    "lam": 0.95,
    "kl_mode": "fixed",
    "kl_estimator": "k1",
    "approx_kl_stop": 0.0,  # off: TRL's loop never stops early
    "whiten_advantages": True,  # TRL always whitens advantages
    "lora_r": 8,  # alignloop's PolicyModels.load defaults; TRL's peft_config copies them
    "lora_alpha": 16,
}

ALLOCATORS = {
    "jemalloc": "jemalloc preloaded (LD_PRELOAD) in every process of both sides, at its "
    "defaults (what alignloop's trainer runs on where the machine has it: "
    "trainer/common/jemalloc.py)",
    "glibc": "glibc malloc with the thresholds of trainer/common/malloc_tuning.py "
    "(keep_freed_memory) in every process of both sides",
}

# What stays different, and why (printed with every result).
DIFFERENCES_NOT_REMOVED = {
    "reward_normalization": "alignloop normalises scores by running moments and clips at 5 "
    "(normalize_reward); TRL 1.12 has only whiten_rewards (per-token whitening), left off",
    "gradient_clipping": "alignloop clips the global gradient norm at 1.0 before every step; "
    "TRL 1.12's PPO loop never clips (max_grad_norm is ignored)",
    "micro_batch": "alignloop: config.alignloop_micro_batch_size rows per forward/backward "
    "(PPOConfig.micro_batch_size, 16 by default; the gradient is the mini-batch's); TRL: its "
    "micro-batch is per_device_train_batch_size, and with gradient accumulation > 1 it steps "
    "once per accumulation across mini-batch boundaries, so to take one optimizer step per "
    "mini-batch its micro-batch is the whole mini-batch",
    "rollout_scoring_batch": "TRL at its default local_rollout_forward_batch_size (64); "
    "alignloop scores finished rollouts up to a mini-batch per pass",
    "generation": "alignloop: its own KV-cached decode loop (hf rollouts on CPU), whose "
    "log-probs (and a shared critic's values) it keeps instead of recomputing them; TRL: "
    "transformers generate, then a policy forward for the log-probs",
    "shared_prompt_prefix": "alignloop runs a prompt prefix every row of a scoring or "
    "update pass begins with (at least PPOConfig.shared_prefix_min_tokens, 8, long: "
    "SmolLM2's template's 24-token system prompt; the demo template's is 2 tokens, too short) "
    "once per pass, and each row's rest against its keys and values (prefix_tokens_shared: "
    "the token positions not computed), and once into its decode loop's KV cache, which "
    "every row's prefill then starts from; TRL runs every row whole, in its passes and in "
    "generate",
    "attention": "alignloop: its CPU attention implementation (trainer/common/cpu_attention.py:"
    " float32 products under bfloat16 autocast, grouped-query heads read in place); TRL: "
    "transformers' sdpa as loaded (bfloat16 under autocast in its update, KV heads copied "
    "out per query head when a mask is given)",
}
REWARD_DIFFERENCE = {
    "small": "both sides score with the same small sequence classifier, but not the same "
    "tokens: alignloop renders the conversation with the answer as a closed assistant turn "
    "(the chat template's end-of-turn after it: how its reward trainer trains a reward "
    "model) and re-tokenises it; TRL scores prompt + response ids as sampled. A random "
    "classifier scores those differently where the template closes the turn with tokens of "
    "its own, so reward levels differ across sides (compare each side's own start and end)",
    "flat": "alignloop's reward is the flat reward model plus the concise-answer rule terms "
    "(tests/fixtures/ppo.CONCISE); TRL's is a randomly initialised head on the policy's "
    "backbone, so reward levels are not comparable across sides, only each side's own "
    "start/end",
}
CRITIC_DIFFERENCE = {
    "shared": "alignloop's critic is a value head on the actor's trunk (one backbone pass "
    "for both; the value loss trains the head alone); TRL's value model is a "
    "separate sequence classifier, fully trained in both TRL configurations (peft_config "
    "applies to the policy only)",
    "adapter": "alignloop's critic is its own LoRA adapter + head on the shared base; TRL's "
    "value model is a separate sequence classifier, fully trained in both TRL configurations "
    "(peft_config applies to the policy only)",
}


PRECISION_DIFFERENCE = {
    "float32": "none: float32 throughout on both sides",
    "bfloat16": "alignloop (PPOConfig.precision bfloat16): every pass (decode, reference, "
    "reward, update) under bfloat16 autocast, attention's products in float32. The first "
    "iteration recomputes the actor's log-probs of the update's first mini-batch only and "
    "measures their gap to the decode loop's (sampler_logprob_gap); within "
    "PPOConfig.sampler_logprob_tolerance the decode loop's are taken for every other row "
    "and, from then on, for every row; past it every row's are recomputed, in every "
    "iteration (iterations_recomputing_logprobs), those of the update's first mini-batch "
    "after the first iteration read off its own forward in the update "
    "(PPOConfig.first_mini_batch_from_update; rows_scored_by_update). TRL (bf16=True): "
    "accelerate autocasts only the prepared policy-and-value "
    "wrapper, i.e. the update; its generate, reference, reward and value passes call the "
    "models directly and run in float32 (TRL's own behaviour, not a setting). Both keep "
    "float32 weights, gradients and optimizer state",
}


def differences(
    reward: str, critic: str, precision: str = "float32", checkpointing: bool = False
) -> dict[str, str]:
    """Every difference left between the sides of this run, with the reason."""
    recompute = {
        "activation_checkpointing": "alignloop keeps only each decoder layer's input for the "
        "backward and runs the layer again in it (PPOConfig.activation_checkpointing and "
        "checkpoint_every: which layers); TRL "
        "1.12's PPO loop has no such switch (its gradient_checkpointing argument applies to "
        "Trainer.train, which its PPO loop does not run) and keeps every layer's activations"
    }
    return {
        **(recompute if checkpointing else {}),
        **DIFFERENCES_NOT_REMOVED,
        "reward": REWARD_DIFFERENCE[reward],
        "critic": CRITIC_DIFFERENCE[critic],
        "precision": PRECISION_DIFFERENCE[precision],
        "models_in_memory": "alignloop: one base with the policy adapter (and the critic's "
        "where it has one), the reward model beside it; TRL full: policy, reference, value "
        "and reward models; TRL lora: policy (+adapter, also the reference), value and reward "
        "models",
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
    from trainer.common.jemalloc import jemalloc_loaded
    from trainer.common.malloc_tuning import keep_freed_memory
    from trainer.ppo.models import PolicyModels
    from trainer.ppo.rollout.hf import HFSampler
    from trainer.ppo.rollout.vllm import VllmOptions, VllmSampler
    from trainer.ppo.trainer import PPOTrainer
    from trainer.reward.rules import ComposedReward, build_rules

    keep_freed_memory()  # as alignloop train ppo / train loop do (nothing under jemalloc)
    onednn_cache.bound_computation_caches()  # as they do (the environment's: both sides')
    rss = {"after_imports": _rss_mb()}
    device = resolve_device("auto")  # as a round's PPOConfig.device defaults to
    models = PolicyModels.load(
        args.model,
        args.reward_dir,
        critic=args.critic,
        seed=FIXED["seed"],
        lora_r=SHARED["lora_r"],
        lora_alpha=SHARED["lora_alpha"],
    ).to(device, args.precision)
    reward_model = getattr(models.reward, "model", None)  # a seq_cls reward model's own
    page_in(models.peft_model, *([reward_model] if reward_model is not None else []))
    rss["after_models_load"] = _rss_mb()
    if args.rollout == "vllm":
        sampler = VllmSampler(args.model, Path(args.work) / "sync", VllmOptions())
    else:
        sampler = HFSampler(models)
    rss["after_sampler_start"] = _rss_mb()
    config = PPOConfig(
        rollout_batch_size=args.rollout_batch_size,
        mini_batch_size=args.mini_batch_size,
        micro_batch_size=args.micro_batch_size,
        activation_checkpointing=args.activation_checkpointing,
        checkpoint_every=args.checkpoint_every,
        shared_prefix_min_tokens=args.shared_prefix_min_tokens,
        ppo_epochs=FIXED["ppo_epochs"],
        max_new_tokens=FIXED["max_new_tokens"],
        temperature=FIXED["temperature"],
        actor_lr=args.lr,
        init_kl_coef=FIXED["init_kl_coef"],
        lr_warmup_iterations=0,  # constant rate, as SHARED["lr_schedule"]
        seed=FIXED["seed"],
        critic_lr=args.lr,  # SHARED["critic_lr"]: one rate for both, as TRL
        clip_range=SHARED["clip_range"],
        value_clip_range=SHARED["value_clip_range"],
        vf_coef=SHARED["vf_coef"],
        gamma=SHARED["gamma"],
        lam=SHARED["lam"],
        kl_mode=SHARED["kl_mode"],
        kl_estimator=SHARED["kl_estimator"],
        approx_kl_stop=SHARED["approx_kl_stop"],
        whiten_advantages=SHARED["whiten_advantages"],
    )
    rules = build_rules(CONCISE if args.reward == "flat" else [])  # small: the model alone
    reward_fn = ComposedReward(models.reward, rules).components
    trainer = PPOTrainer(config, models, sampler, reward_fn)
    prompts = conversations(args.system_prompt)
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
    gaps = [s["sampler_logprob_gap"] for s in steps if s["sampler_logprob_gap"] is not None]
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
    if args.save_policy:  # after every measurement above
        models.save_policy(Path(args.save_policy))
    params = models.parameter_bytes()
    trainable = sum(p.numel() * p.element_size() for p in models.trainable_parameters())
    episodes = args.iterations * batch
    tokens = sum(s["rollout_tokens"] for s in steps)
    rollout_seconds = sum(s["rollout_s"] for s in steps)
    return {
        "side": "alignloop",
        "allocator": "jemalloc" if jemalloc_loaded() else "glibc",
        "onednn_caches": {name: os.environ.get(name) for name in onednn_cache.ENVS},
        "critic": models.actor_critic.critic_kind,
        "precision": args.precision,
        "policy_parameters": models.parameter_bytes()["base"] // 4,  # float32
        "episodes": episodes,
        "gradient_steps": sum(s["gradient_steps"] for s in steps),
        "early_stops": sum(bool(s["early_stopped"]) for s in steps),
        "tokens_generated": tokens,
        "training_peak_rss_mb": round(peak - rss["after_models_load"], 1),
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
        # Measured where the actor's log-probs were recomputed; None where the sampler's
        # own were taken (every iteration in float32, after the first under bfloat16).
        "sampler_logprob_gap": statistics.mean(gaps) if gaps else None,
        "iterations_recomputing_logprobs": len(gaps),
        "rows_scored_by_update": sum(s["rows_scored_by_update"] for s in steps),
        "prefix_tokens_shared": sum(s["prefix_tokens_shared"] for s in steps),
        "seconds_split": {
            name: round(sum(s[name] for s in steps), 2)
            for name in ("sync_s", "rollout_s", "score_s", "update_s")
        },
    }


# --- the parent: set up, alternate, summarise -------------------------------------------------


def _child(
    args: argparse.Namespace, work: Path, reward_dir: Path, save: Path | None = None
) -> dict:
    cmd = [
        sys.executable, "-m", "benchmarks.ppo", "--child",
        "--model", str(args.model), "--reward-dir", str(reward_dir), "--work", str(work),
        "--rollout", args.rollout, "--iterations", str(args.iterations), "--lr", str(args.lr),
        "--rollout-batch-size", str(args.rollout_batch_size),
        "--mini-batch-size", str(args.mini_batch_size), "--threads", str(args.threads),
        "--micro-batch-size", str(args.micro_batch_size),
        "--critic", args.critic, "--reward", args.reward, "--precision", args.precision,
        *(["--activation-checkpointing"] if args.activation_checkpointing else []),
        "--checkpoint-every", str(args.checkpoint_every),
        "--shared-prefix-min-tokens", str(args.shared_prefix_min_tokens),
        *(["--system-prompt", args.system_prompt] if args.system_prompt else []),
        *(["--save-policy", str(save)] if save else []),
    ]  # fmt: skip
    env = {**child_env(args.allocator, args.onednn_cache_capacity), "PYTHONPATH": str(ROOT)}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, check=True)
    return json.loads(out.stdout.splitlines()[-1])  # vLLM logs to stdout too


def _trl(
    args: argparse.Namespace,
    prompts_file: Path,
    reward_dir: Path,
    lora_targets: str | None,
    save: Path | None = None,
) -> dict:
    """TRL's PPOTrainer in a fresh process: full fine-tuning, or (``lora_targets``) a LoRA
    of alignloop's rank, alpha and target modules through its ``peft_config``."""
    lora = (
        ["--lora-r", str(SHARED["lora_r"]), "--lora-alpha", str(SHARED["lora_alpha"]),
         "--lora-targets", lora_targets]
        if lora_targets is not None
        else []
    )  # fmt: skip
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "trl_ppo_baseline.py"),
        "--model", str(args.model), "--prompts", str(prompts_file),
        "--episodes", str(args.iterations * args.rollout_batch_size),
        "--batch-size", str(args.rollout_batch_size),
        "--mini-batch-size", str(args.mini_batch_size),
        "--ppo-epochs", str(FIXED["ppo_epochs"]),
        "--max-new-tokens", str(FIXED["max_new_tokens"]),
        "--temperature", str(FIXED["temperature"]), "--lr", str(args.lr),
        "--kl-coef", str(FIXED["init_kl_coef"]), "--seed", str(FIXED["seed"]),
        "--threads", str(args.threads),
        "--lr-scheduler", SHARED["lr_schedule"], "--clip-range", str(SHARED["clip_range"]),
        "--value-clip-range", str(SHARED["value_clip_range"]),
        "--vf-coef", str(SHARED["vf_coef"]), "--gamma", str(SHARED["gamma"]),
        "--lam", str(SHARED["lam"]), "--kl-estimator", SHARED["kl_estimator"],
        # the glibc settings alignloop's trainer applies to itself (keep_freed_memory)
        "--malloc-tuning", str(ROOT / "trainer" / "common" / "malloc_tuning.py"),
        *(["--reward-model", str(reward_dir)] if args.reward == "small" else []),
        *(["--bf16"] if args.precision == "bfloat16" else []),
        *(["--save-policy", str(save)] if save else []),
        *lora,
    ]  # fmt: skip
    env = child_env(args.allocator, args.onednn_cache_capacity)
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, check=True)
    return json.loads(out.stdout.splitlines()[-1])  # vLLM logs to stdout too


def resolved_allocator(choice: str) -> str:
    """``auto``: what alignloop's trainer runs on here (jemalloc where found)."""
    if choice == "auto":
        return "jemalloc" if find_jemalloc() else "glibc"
    if choice == "jemalloc" and not find_jemalloc():
        raise SystemExit("--allocator jemalloc: no libjemalloc on this machine (libjemalloc2)")
    return choice


def child_env(allocator: str, onednn_cache_capacity: int) -> dict[str, str]:
    """This environment for a child of either side: jemalloc preloaded, or kept off it
    (``ALIGNLOOP_ALLOCATOR=glibc``, so nothing alignloop starts preloads it either); and
    torch's caches of oneDNN computations at ``onednn_cache_capacity`` entries each
    (:mod:`trainer.common.onednn_cache`)."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env.update(dict.fromkeys(onednn_cache.ENVS, str(onednn_cache_capacity)))
    if allocator == "jemalloc":
        library = find_jemalloc()
        assert library is not None  # resolved_allocator checked
        return preloaded_env(env, library)
    return {**env, "ALIGNLOOP_ALLOCATOR": "glibc"}


def held_out(model: Path, reward_dir: Path, policies: dict[str, Path]) -> dict[str, Any]:
    """Every side's first-round policy and the base, measured one way
    (:mod:`benchmarks.ppo_eval`): held-out reward, KL to the base, and each side's reward
    gain over the base."""
    from benchmarks.ppo_eval import EVAL_PROMPT_SEED, EvalSettings, evaluate

    settings = EvalSettings(
        max_new_tokens=FIXED["max_new_tokens"], temperature=FIXED["temperature"]
    )
    log("held-out evaluation: base")
    base = evaluate(model, None, "base", reward_dir, settings)
    sides: dict[str, Any] = {}
    for side, path in policies.items():
        log(f"held-out evaluation: {side}")
        kind = "full" if side == "trl_full" else "adapter"
        got = evaluate(model, path, kind, reward_dir, settings)
        gains = {
            f"{reading}_gain": round(got[reading] - base[reading], 4)
            for reading in ("reward_ids", "reward_rendered")
        }
        sides[side] = {**got, **gains}
    return {
        "yardstick": "benchmarks/ppo_eval.py: the same held-out prompts, sampling seed, "
        "reward classifier and KL estimator for every policy; the classifier read on the "
        "sampled ids (reward_ids, TRL's reading) and on the rendered closed turn "
        "(reward_rendered, alignloop's)",
        "prompts": settings.prompts,
        "prompt_seed": EVAL_PROMPT_SEED,
        "samples_per_prompt": settings.samples,
        "policy_round": 1,
        "base": base,
        "sides": sides,
    }


def alternating_order(sides: list[str], rounds: int) -> list[list[str]]:
    """Each round's run order: ``sides`` as given in even rounds, reversed in odd ones
    (A B C, C B A, A B C, ...), so no side always runs first or last."""
    return [list(sides) if r % 2 == 0 else list(reversed(sides)) for r in range(rounds)]


def against_better(
    ours: float, theirs: dict[str, float], higher_is_better: bool
) -> tuple[float, str]:
    """``ours`` over the better of ``theirs`` (configuration -> value) and that
    configuration's name: the highest value when higher is better, else the lowest."""
    pick = max if higher_is_better else min
    name = pick(theirs, key=lambda k: theirs[k])
    return ours / theirs[name], name


def resolved_precision(model: Path, precision: str) -> str:
    """``float32`` or ``bfloat16``: ``precision`` itself, or for ``auto`` what a round's
    ``auto`` runs ``model``'s policy in on this machine (:mod:`trainer.common.device`)."""
    if precision != "auto":
        return precision
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.common.device import autocast_dtype, resolve_device

    with torch.device("meta"):  # the size without the weights
        shape = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
    parameters = sum(p.numel() for p in shape.parameters())
    dtype = autocast_dtype(resolve_device("auto"), "auto", parameters)
    return "float32" if dtype is None else "bfloat16"


def _lora_targets(model: Path) -> str:
    """The module names alignloop's ``"auto"`` LoRA wraps on ``model`` (comma list)."""
    from transformers import AutoModelForCausalLM

    from trainer.reward.model import lora_target_modules

    return ",".join(lora_target_modules(AutoModelForCausalLM.from_pretrained(model)))


def conversations(system_prompt: str | None) -> list[list[dict[str, str]]]:
    """The benchmark's prompts, both sides': demo-corpus questions as user turns, each after
    ``system_prompt`` as a system turn where one is given."""
    from trainer.demo.corpus import sample_prompts

    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [
        [*system, {"role": "user", "content": p.text}] for p in sample_prompts(0, FIXED["prompts"])
    ]


def _setup(
    model: Path, work: Path, reward: str, system_prompt: str | None = None
) -> tuple[Path, Path]:
    """The reward model version (:func:`small_reward_model` or the flat one) and the
    prompts file (TRL's format: :func:`conversations`)."""
    from tests.fixtures.ppo import flat_reward_model

    reward_dir = work / "reward"
    if reward == "small":
        small_reward_model(model, reward_dir)
    else:
        reward_dir.mkdir()
        flat_reward_model(model).save(reward_dir)
    prompts_file = work / "prompts.jsonl"
    with open(prompts_file, "w") as f:
        for messages in conversations(system_prompt):
            f.write(json.dumps({"messages": messages}) + "\n")
    return reward_dir, prompts_file


SMALL_REWARD = {"hidden": 128, "layers": 4, "seed": 1234, "score_std": 1.0}
"""The shape of :func:`small_reward_model`."""


def small_reward_model(policy: Path, out: Path) -> Path:
    """A small sequence-classification reward model both sides score with: a randomly
    initialised (seeded) 4-layer Llama 128 wide with the policy's tokenizer, its score head
    rescaled so that its scores over the benchmark's own sampled demo answers have standard
    deviation 1 (a random head gives scores too flat to learn from). Saved as a ``seq_cls``
    reward model version (alignloop loads it beside the policy; TRL takes it as its reward
    model and, by its own convention, a copy as its value model)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from trainer.demo.corpus import sample_prompts
    from trainer.reward.model import SequenceClassifierRewardModel, ensure_pad_token

    tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(policy))
    source = AutoConfig.from_pretrained(policy)
    width = SMALL_REWARD["hidden"]
    config = LlamaConfig(
        vocab_size=source.vocab_size,
        hidden_size=width,
        intermediate_size=width * 3,
        num_hidden_layers=SMALL_REWARD["layers"],
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=width // 2,
        max_position_embeddings=source.max_position_embeddings,
        tie_word_embeddings=False,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(SMALL_REWARD["seed"])
    model = LlamaForSequenceClassification(config).eval()
    rm = SequenceClassifierRewardModel(model, tokenizer, max_length=256)
    prompts = sample_prompts(1, 64)
    conversations = [[{"role": "user", "content": p.text}] for p in prompts]
    answers = [p.text[::-1][:40] for p in prompts]  # varied text; the scale is what matters
    std = float(rm.score(conversations, answers).std())
    with torch.no_grad():
        model.score.weight.mul_(SMALL_REWARD["score_std"] / max(std, 1e-6))
    out.mkdir(parents=True)
    rm.save(out)
    log(f"small reward model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    return out


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


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _per_round(run: dict) -> dict:
    """One side's figures of one round, as the JSON reports them (both sides' keys)."""
    hwm, rss = run["peak_rss_mb"], run["rss_mb"]
    return {
        "gradient_steps": run["gradient_steps"],
        "early_stops": run["early_stops"],
        "episodes": run["episodes"],
        "tokens_generated": run.get(
            "tokens_generated", run.get("rollout", {}).get("generated_tokens")
        ),
        "episodes_per_s": _round(run["episodes_per_s"]),
        "rollout_tokens_per_s": _round(run["rollout_tokens_per_s"], 1),
        "peak_rss_mb": hwm,
        # what training adds: the peak above the RSS after imports and model load
        "training_peak_rss_mb": round(hwm - rss["after_models_load"], 1),
        "reward_start": _round(run["reward_start"], 4),
        "reward_end": _round(run["reward_end"], 4),
        "final_kl": _round(run["final_kl"], 4),
    }


# Long on purpose: the JSON's layout in one place, read top to bottom as it prints.
def summarise(
    args: argparse.Namespace,
    runs: dict[str, list[dict]],
    order: list[list[str]],
    lora_targets: str | None,
) -> dict:
    """The JSON: per side, per round and medians; for alignloop its memory breakdown; the
    ratios against the better TRL configuration for each metric."""
    sides: dict[str, dict[str, Any]] = {}
    ran = {row["allocator"] for rows in runs.values() for row in rows}
    if ran != {args.allocator}:  # the same malloc on both sides, or no comparison
        raise RuntimeError(f"allocator {args.allocator} asked for, {sorted(ran)} ran")
    asked = dict.fromkeys(onednn_cache.ENVS, str(args.onednn_cache_capacity))
    for rows in runs.values():  # the same oneDNN caches on both sides, too
        for row in rows:
            if row["onednn_caches"] != asked:
                raise RuntimeError(f"oneDNN caches {asked} asked for, {row['onednn_caches']} ran")
    for side, rows in runs.items():
        per_round = [_per_round(row) for row in rows]
        sides[side] = {
            "per_round": per_round,
            "median": {
                key: _round(statistics.median(r[key] for r in per_round))
                for key in per_round[0]
                if all(r[key] is not None for r in per_round)
            },
        }
    ours = runs["alignloop"]
    result: dict[str, Any] = {
        "config": {
            **FIXED,
            "rollout_batch_size": args.rollout_batch_size,
            "mini_batch_size": args.mini_batch_size,
            "alignloop_micro_batch_size": args.micro_batch_size,
            "alignloop_activation_checkpointing": args.activation_checkpointing,
            "alignloop_checkpoint_every": args.checkpoint_every,
            "alignloop_shared_prefix_min_tokens": args.shared_prefix_min_tokens,
            "system_prompt": args.system_prompt,
            "threads": args.threads,
            "iterations": args.iterations,
            "actor_lr": args.lr,
            "rollout": args.rollout,
            "model": args.model_label,
            "policy_parameters": ours[0]["policy_parameters"],
            "reward": args.reward,
            **({"small_reward_model": SMALL_REWARD} if args.reward == "small" else {}),
            "critic": ours[0]["critic"],
            "precision": args.precision,
        },
        "shared_hyperparameters": SHARED,
        "allocator": ALLOCATORS[args.allocator],
        "onednn_cache_capacity": args.onednn_cache_capacity,
        "rounds": args.rounds,
        "order": order,
        "sides": sides,
        # alignloop's headline figures, top level as before (benchmarks/gpu_check.py, docs)
        "episodes_per_s": sides["alignloop"]["median"]["episodes_per_s"],
        "rollout_tokens_per_s": sides["alignloop"]["median"]["rollout_tokens_per_s"],
        "seconds_per_round": _round(statistics.median(o["seconds"] for o in ours)),
        "peak_rss_mb": sides["alignloop"]["median"]["peak_rss_mb"],
        "total_peak_rss_mb": _round(statistics.median(o["total_peak_rss_mb"] for o in ours)),
        "sampler_logprob_gap": _round(ours[-1]["sampler_logprob_gap"], 5),
        "iterations_recomputing_logprobs": ours[-1]["iterations_recomputing_logprobs"],
        "rows_scored_by_update": ours[-1]["rows_scored_by_update"],
        "prefix_tokens_shared": ours[-1]["prefix_tokens_shared"],
        "memory_breakdown_mb": ours[-1]["memory_breakdown_mb"],
        "seconds_split": ours[-1]["seconds_split"],
    }
    if len(runs) > 1:
        trl = {k: v for k, v in sides.items() if k != "alignloop"}
        mine = sides["alignloop"]["median"]
        speed, speed_vs = against_better(
            mine["episodes_per_s"], {k: v["median"]["episodes_per_s"] for k, v in trl.items()}, True
        )
        memory, memory_vs = against_better(
            mine["training_peak_rss_mb"],
            {k: v["median"]["training_peak_rss_mb"] for k, v in trl.items()},
            False,
        )
        whole, whole_vs = against_better(
            mine["peak_rss_mb"], {k: v["median"]["peak_rss_mb"] for k, v in trl.items()}, False
        )
        result["trl"] = {
            "version": runs["trl_full"][0]["trl_version"],
            "local_rollout_forward_batch_size": runs["trl_full"][0]["hyperparameters"][
                "local_rollout_forward_batch_size"
            ],
            "lora_targets": lora_targets,
            "malloc_tuned": runs["trl_full"][0]["malloc_tuned"],
        }
        result["ratios"] = {
            "episodes_per_s": {"ratio": round(speed, 2), "against": speed_vs},
            "training_peak_rss": {"ratio": round(memory, 3), "against": memory_vs},
            "whole_process_peak_rss": {"ratio": round(whole, 3), "against": whole_vs},
        }
        result["differences_not_removed"] = differences(
            args.reward, ours[0]["critic"], args.precision, args.activation_checkpointing
        )
    return result


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="two iterations per run (3+ rounds)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating alignloop/TRL rounds")
    ap.add_argument("--iterations", type=int, default=4, help="PPO iterations (x64 episodes)")
    ap.add_argument(
        "--rollout",
        choices=("auto", "vllm", "hf"),
        default="auto",
        help="as RoundConfig.rollout_backend: auto = vllm with a GPU, hf on CPU",
    )
    ap.add_argument("--no-trl", action="store_true", help="skip the TRL baseline")
    ap.add_argument(
        "--lr",
        type=float,
        default=FIXED["actor_lr"],
        help="both sides' learning rate (actor and critic alike, as TRL has one)",
    )
    ap.add_argument("--rollout-batch-size", type=int, default=FIXED["rollout_batch_size"])
    ap.add_argument("--mini-batch-size", type=int, default=FIXED["mini_batch_size"])
    ap.add_argument(
        "--micro-batch-size",
        type=int,
        default=0,
        help="alignloop's rows per forward/backward (PPOConfig.micro_batch_size; 0: its "
        "default). The gradient is the mini-batch's whatever it is: fewer rows per pass trade "
        "speed for activation memory. TRL's stays the whole mini-batch (micro_batch)",
    )
    ap.add_argument(
        "--threads", type=int, default=FIXED["threads"], help="per process (0: one per core)"
    )
    ap.add_argument(
        "--scaled-model", metavar="HIDDEN,LAYERS", help="a random-init Llama of this size"
    )
    ap.add_argument(
        "--model", default="demo", help="demo, smollm2 or a model directory (benchmarks/models.py)"
    )
    ap.add_argument(
        "--reward",
        choices=("small", "flat"),
        default="small",
        help="small: one small sequence-classification reward model both sides score with "
        "(TRL's value model a copy of it); flat: alignloop a zero-head LoRA reward model plus "
        "rule terms, TRL a fresh head on the policy's backbone (rewards not comparable)",
    )
    ap.add_argument(
        "--critic",
        choices=get_args(CriticKind),
        default=RoundConfig.critic,
        help="alignloop's critic (RoundConfig.critic; default: a round's)",
    )
    ap.add_argument(
        "--precision",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="both sides: float32, or bfloat16 autocast over float32 weights (alignloop's "
        "PPOConfig.precision; TRL's bf16=True); auto: what alignloop's auto picks for this "
        "model on this machine, given to both",
    )
    ap.add_argument(
        "--allocator",
        choices=("auto", "jemalloc", "glibc"),
        default="auto",
        help="both sides' malloc: jemalloc preloaded, or glibc with alignloop's settings; "
        "auto: what alignloop's trainer runs on here (jemalloc where found)",
    )
    ap.add_argument(
        "--onednn-cache-capacity",
        type=int,
        default=onednn_cache.CAPACITY,
        metavar="N",
        help="both sides: the entries each of torch's caches of oneDNN computations keeps "
        "(ONEDNN_PRIMITIVE_CACHE_CAPACITY, LRU_CACHE_CAPACITY: trainer/common/onednn_cache.py"
        f"; default {onednn_cache.CAPACITY}, what alignloop's trainer keeps; 1024 is "
        "torch's own)",
    )
    ap.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="alignloop's PPOConfig.activation_checkpointing (one more forward per "
        "micro-batch for a smaller update peak); TRL 1.12's PPO loop has no such switch",
    )
    ap.add_argument(
        "--checkpoint-every",
        type=int,
        default=1,
        metavar="N",
        help="with --activation-checkpointing: PPOConfig.checkpoint_every (checkpoint the "
        "first decoder layer and every N-th after it; 1: all of them)",
    )
    ap.add_argument(
        "--shared-prefix-min-tokens",
        type=int,
        default=PPOConfig.shared_prefix_min_tokens,
        metavar="N",
        help="alignloop's PPOConfig.shared_prefix_min_tokens: a prompt prefix at least N "
        "tokens long that every row of a pass shares runs once (0: every row whole)",
    )
    ap.add_argument(
        "--system-prompt",
        metavar="TEXT",
        help="a system message before every prompt, on both sides (a product's own "
        "instructions; without it the model's template adds its default, if it has one)",
    )
    ap.add_argument(
        "--eval",
        action="store_true",
        help="score each side's first-round policy and the base on held-out prompts with one "
        "yardstick (benchmarks/ppo_eval.py): reward gain and KL to the base per side",
    )
    ap.add_argument("--save-policy", help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--reward-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.micro_batch_size = args.micro_batch_size or PPOConfig.micro_batch_size
    if args.child:
        args.model = Path(args.model)
        print(json.dumps(run_alignloop(args)))
        return 0
    args.allocator = resolved_allocator(args.allocator)
    SHARED["critic_lr"] = args.lr  # reported with the result: one rate on both sides
    if args.quick:  # fewer iterations, not fewer rounds
        args.iterations = 2
    if args.rounds < 3:
        ap.error("--rounds: at least 3 (alternating order)")
    args.rollout = RoundConfig(rollout_backend=args.rollout).rollouts
    args.model_label = model_label(args.model)
    args.model = model_dir(args.model)

    work = Path(tempfile.mkdtemp(prefix="alignloop-bench-ppo-"))
    if args.scaled_model:
        args.model = scaled_model(Path(args.model), args.scaled_model, work / "model")
        args.model_label = f"llama {args.scaled_model} (random)"
    args.precision = resolved_precision(args.model, args.precision)
    log(f"precision: {args.precision} on both sides")
    reward_dir, prompts_file = _setup(args.model, work, args.reward, args.system_prompt)
    sides = ["alignloop"] if args.no_trl else ["alignloop", "trl_full", "trl_lora"]
    targets = None if args.no_trl else _lora_targets(args.model)
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    order = alternating_order(sides, args.rounds)
    policies: dict[str, Path] = {}
    for r, round_order in enumerate(order):
        for side in round_order:  # each side in a fresh process
            log(f"round {r + 1}/{args.rounds}: {side}")
            save = work / "policies" / side if args.eval and r == 0 else None
            if save:
                policies[side] = save
            if side == "alignloop":
                runs[side].append(_child(args, work, reward_dir, save))
            else:
                lora = targets if side == "trl_lora" else None
                runs[side].append(_trl(args, prompts_file, reward_dir, lora, save))
    result = summarise(args, runs, order, targets)
    if args.eval:
        result["held_out"] = held_out(args.model, reward_dir, policies)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
