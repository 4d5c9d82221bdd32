"""Baseline for the PPO benchmark: Hugging Face TRL's four-model ``PPOTrainer`` on CPU.

alignloop's PPO (LoRA policy / critic / reward adapters on one frozen base, vLLM rollouts)
is compared against TRL's PPOTrainer on the same model, prompts and hyperparameters. This
script is the TRL side. It

1. builds (once, cached) a separate virtualenv under ``$ALIGNLOOP_CACHE_DIR`` (default
   ``~/.cache/alignloop``) named ``trl-venv-<trl version>``, with the pinned versions in
   :data:`REQUIREMENTS` (CPU torch; TRL is never a dependency of the project itself);
2. re-runs itself inside that virtualenv, in a child process (so the child's peak RSS is
   its own), and trains with TRL's PPOTrainer: policy = the model, ref_policy = a second
   copy (or, with ``--lora-r``, TRL's ``peft_config`` path: a LoRA on the policy, whose
   reference is the policy with the adapter disabled), value_model and reward_model =
   ``AutoModelForSequenceClassification`` over ``--reward-model`` (the value model a copy
   of the reward model, as TRL's own PPO example does) or, without it, over the policy's
   directory with a freshly (seeded) initialised one-logit head; ``--malloc-tuning``
   applies alignloop's glibc settings;
3. prints ONE JSON object on stdout (versions, episodes, training wall time, episodes/s,
   peak and staged RSS, rollout tokens/s, hyperparameters); everything else goes to stderr.

Why TRL 1.12.0: it is the last release that ships the four-model PPOTrainer (policy,
ref_policy, reward_model, value_model; ``transformers`` generation). ``from trl import
PPOTrainer`` works up to 0.28.x (0.26-0.28 also carry it as ``trl.experimental.ppo``); 0.29
keeps only ``trl.experimental.ppo``, which is the documented import path from then on; 1.13.0
removed ``trl/experimental/ppo`` altogether. transformers is pinned to the version alignloop's
own environment uses (TRL 1.12 needs >= 4.56.2), so both sides run the same model code.

Usage (prompts: one ``{"messages": [...]}`` per line)::

    ./dev run python -c "import json; from trainer.demo.corpus import sample_prompts; \\
        [print(json.dumps({'messages': [{'role': 'user', 'content': p.text}]})) \\
         for p in sample_prompts(0, 256)]" > /tmp/prompts.jsonl
    python benchmarks/trl_ppo_baseline.py --model DIR --prompts /tmp/prompts.jsonl \\
        --episodes 256 --batch-size 64 --mini-batch-size 16 --ppo-epochs 1 \\
        --max-new-tokens 48 --temperature 1.0 --lr 1e-5 --kl-coef 0.05 --seed 0

Batch sizes, as TRL 1.12 defines them (one process): the rollout batch is
``per_device_train_batch_size * gradient_accumulation_steps`` and is split into
``num_mini_batches`` mini-batches; every micro-batch of ``per_device_train_batch_size``
rows (clipped to the mini-batch) is one ``accelerator.backward``, and the optimizer steps once
per ``gradient_accumulation_steps`` micro-batches. So ``--batch-size B --mini-batch-size M``
maps to ``per_device_train_batch_size=B, gradient_accumulation_steps=1,
num_mini_batches=B/M``: one optimizer step per mini-batch of M rollouts, as in alignloop.
(With gradient accumulation > 1 and several mini-batches TRL would step only once per
``gradient_accumulation_steps`` micro-batches, i.e. across mini-batch boundaries.)

What TRL does differently from alignloop (read the numbers with this in mind): full
fine-tuning (or a LoRA policy beside a fully trained value model); four separate model
copies (policy, ref, value, reward; three with LoRA); the critic is
a whole second backbone with the seq-cls ``score`` linear applied per token, trained with the
policy in one AdamW at one learning rate; no gradient clipping in its loop; rollouts with
``transformers`` ``generate`` (KV cache, ``local_rollout_forward_batch_size`` rows at a
time, logits kept for every step); an episode is one (prompt, response) and TRL adds
``batch_size`` per iteration.
``rollout_tokens_per_s`` counts sampled tokens up to and including the stop token, over the
time spent inside TRL's ``batch_generation`` only (not the ref / value / reward forwards).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRL_VERSION = "1.12.0"
# Everything pinned: torch first and exact, so pip takes the machine's local CPU wheel
# instead of resolving a multi-GB CUDA build; transformers / accelerate as in alignloop's env.
REQUIREMENTS = (
    "torch==2.13.0",
    f"trl=={TRL_VERSION}",
    "transformers==5.19.0",
    "accelerate==1.15.0",
    "datasets==5.2.0",
    "peft==0.21.2",  # TRL's peft_config path; the version alignloop's own environment uses
)
_CHILD_ENV = "ALIGNLOOP_TRL_BASELINE_CHILD"


def log(*parts: object) -> None:
    print("trl_ppo_baseline:", *parts, file=sys.stderr, flush=True)


# --- the virtualenv ------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGNLOOP_CACHE_DIR", "~/.cache/alignloop")).expanduser()


def venv_dir() -> Path:
    return cache_dir() / f"trl-venv-{TRL_VERSION}"


def _marker(venv: Path) -> Path:
    return venv / ".alignloop-complete"


def _is_complete(venv: Path) -> bool:
    try:
        return _marker(venv).read_text().split() == list(REQUIREMENTS)
    except OSError:
        return False


def ensure_venv() -> Path:
    """The TRL virtualenv, built once into a hidden sibling and renamed into place."""
    venv = venv_dir()
    if _is_complete(venv):
        return venv
    venv.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{venv.name}.build-{os.getpid()}-", dir=venv.parent))
    log(f"building {venv} ({' '.join(REQUIREMENTS)}); a minute or two, once")
    python = getattr(sys, "_base_executable", None) or sys.executable
    steps = [
        [python, "-m", "venv", str(build)],
        [
            str(build / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--progress-bar",
            "off",
            "--disable-pip-version-check",
            *REQUIREMENTS,
        ],
    ]
    try:
        for cmd in steps:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if proc.returncode != 0:
                raise SystemExit(
                    "trl_ppo_baseline: cannot build the TRL virtualenv "
                    f"(step `{' '.join(cmd[:4])} ...` exited {proc.returncode}):\n"
                    f"{proc.stdout[-4000:]}\n"
                    f"requirements: {' '.join(REQUIREMENTS)}; the package registry must be "
                    "reachable and torch==2.13.0 must resolve to the local CPU wheel."
                )
        check = subprocess.run(
            [str(build / "bin" / "python"), "-c", "from trl.experimental.ppo import PPOTrainer"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"},
        )
        if check.returncode != 0:
            raise SystemExit(
                "trl_ppo_baseline: the TRL virtualenv was installed but "
                f"`from trl.experimental.ppo import PPOTrainer` fails:\n{check.stdout[-4000:]}"
            )
        # Renaming keeps bin/python working (sys.prefix follows the interpreter's location);
        # only the console scripts' shebangs name the build path, and none is used.
        build.chmod(0o755)  # mkdtemp made it private; a cache is shared like the demo model
        _marker(build).write_text("\n".join(REQUIREMENTS) + "\n")
        if venv.exists() and not _is_complete(venv):
            shutil.rmtree(venv)
        try:
            os.rename(build, venv)
        except OSError:
            if not _is_complete(venv):  # not a concurrent build that got there first
                raise
            shutil.rmtree(build, ignore_errors=True)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return venv


def run_in_venv(argv: list[str], threads: int) -> int:
    venv = ensure_venv()
    # torch.set_num_threads(threads) in the child; the other pools get the same count.
    # 0: torch's default, one thread per core.
    counts = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}
    env = {
        **os.environ,
        _CHILD_ENV: "1",
        **counts,
        "TRL_EXPERIMENTAL_SILENCE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_DISABLED": "true",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    }
    env.pop("PYTHONPATH", None)  # nothing of the project's environment leaks in
    # -P: benchmarks/ must not be on sys.path (benchmarks/datasets.py would shadow `datasets`).
    cmd = [str(venv / "bin" / "python"), "-P", str(Path(__file__).resolve()), *argv]
    return subprocess.run(cmd, env=env).returncode


# --- the benchmark (inside the TRL virtualenv) ---------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory (causal LM + tokenizer)")
    p.add_argument("--prompts", required=True, help='JSONL, one {"messages": [...]} per line')
    p.add_argument("--episodes", type=int, default=256, help="total episodes (rollouts)")
    p.add_argument("--batch-size", type=int, default=64, help="rollout batch size")
    p.add_argument("--mini-batch-size", type=int, default=16, help="rollouts per optimizer step")
    p.add_argument("--ppo-epochs", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=48, help="TRL's response_length")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: one per core)")
    p.add_argument(
        "--rollout-forward-batch-size",
        type=int,
        default=None,
        help="TRL's local_rollout_forward_batch_size (rows per generate / no-grad forward "
        "call); default TRL's own (64 in 1.12)",
    )
    p.add_argument(
        "--reward-model",
        default="",
        help="a sequence-classification directory: the reward model, and (TRL's own "
        "convention) the value model starts as a copy of it; default: both are the policy's "
        "backbone with a fresh one-logit head",
    )
    p.add_argument(
        "--lora-r", type=int, default=0, help="train a LoRA of this rank (peft_config); 0: full"
    )
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-targets", default="", help="comma list of module names (LoRA)")
    p.add_argument(
        "--malloc-tuning",
        default="",
        help="path of alignloop's trainer/common/malloc_tuning.py: apply its "
        "keep_freed_memory() in this process, as alignloop's trainer does",
    )
    # PPO knobs kept at TRL's defaults unless given (all reported in the JSON).
    p.add_argument("--clip-range", type=float, default=0.2)
    p.add_argument("--value-clip-range", type=float, default=0.2)
    p.add_argument("--vf-coef", type=float, default=0.1)
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--lam", type=float, default=0.95)
    p.add_argument("--kl-estimator", choices=("k1", "k3"), default="k1")
    p.add_argument(
        "--save-policy",
        help="write the trained policy here after the run (LoRA: the adapter; full: the "
        "model), for benchmarks/ppo_eval.py",
    )
    p.add_argument(
        "--bf16",
        action="store_true",
        help="TrainingArguments bf16=True: accelerate's bfloat16 autocast over float32 weights",
    )
    p.add_argument(
        "--lr-scheduler",
        default="linear",
        help="transformers lr_scheduler_type (TRL's default: linear decay to 0 over the run)",
    )
    args = p.parse_args(argv)
    if not Path(args.model, "config.json").is_file():
        p.error(f"--model {args.model}: not a model directory (no config.json)")
    if not Path(args.prompts).is_file():
        p.error(f"--prompts {args.prompts}: no such file")
    if args.batch_size % args.mini_batch_size:
        p.error("--mini-batch-size must divide --batch-size")
    if args.episodes % args.batch_size:
        p.error("--episodes must be a multiple of --batch-size (TRL rounds up otherwise)")
    return args


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def page_in(*modules) -> None:
    """Read every parameter and buffer of ``modules`` once. ``from_pretrained`` maps a
    safetensors file's weights lazily: file-backed pages that enter RSS when a pass first
    reads them, so without this a model's own weights would count as the training memory
    of whichever pass reads them first (docs/benchmarks.md, "Weights paged in"). Both
    sides call it before their after-load RSS (alignloop's: ``benchmarks.ppo.run_alignloop``;
    this module imports nothing beyond the standard library at the top, so that one can
    import it)."""
    import torch

    with torch.no_grad():
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                tensor.sum()


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def read_prompts(path: str) -> list[list[dict]]:
    conversations = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                messages = json.loads(line)["messages"]
                if not isinstance(messages, list) or not messages:
                    raise SystemExit(f"{path}:{n}: 'messages' must be a non-empty list")
                conversations.append(messages)
    if not conversations:
        raise SystemExit(f"{path}: no prompts")
    return conversations


def apply_malloc_tuning(path: str) -> bool:
    """alignloop's own glibc settings (the module is loaded by path: it needs only the
    standard library, and this virtualenv has no alignloop)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("alignloop_malloc_tuning", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--malloc-tuning {path}: cannot load")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return bool(module.keep_freed_memory())


def benchmark(args: argparse.Namespace) -> dict:
    rss_start = rss_mb()
    malloc_tuned = apply_malloc_tuning(args.malloc_tuning) if args.malloc_tuning else None
    import datasets
    import torch
    import transformers
    import trl
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_module

    if args.threads:
        torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    rss_imports = rss_mb()
    log(
        f"trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}"
    )

    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    if tokenizer.eos_token_id is None:
        raise SystemExit(f"{args.model}: the tokenizer has no eos token")
    if tokenizer.pad_token_id is None:
        raise SystemExit(f"{args.model}: the tokenizer has no pad token (TRL pads queries)")
    queries = []
    for messages in read_prompts(args.prompts):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        queries.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    train_dataset = datasets.Dataset.from_dict({"input_ids": queries})
    if len(train_dataset) < args.batch_size:
        raise SystemExit(
            f"need at least --batch-size={args.batch_size} prompts, got {len(queries)}"
        )

    transformers.set_seed(args.seed)
    fp32 = {"dtype": torch.float32}
    policy = AutoModelForCausalLM.from_pretrained(args.model, **fp32)
    peft_config = None
    ref_policy = None  # with peft_config: TRL's reference is the policy, adapter disabled
    if args.lora_r:
        from peft import LoraConfig

        targets = [t for t in args.lora_targets.split(",") if t]
        peft_config = LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=0.0,
            target_modules=targets or "all-linear",
        )
    else:
        ref_policy = AutoModelForCausalLM.from_pretrained(args.model, **fp32)
    torch.manual_seed(args.seed)
    value_model = AutoModelForSequenceClassification.from_pretrained(
        args.reward_model or args.model, num_labels=1, **fp32
    )
    torch.manual_seed(args.seed + 1)
    reward_model = AutoModelForSequenceClassification.from_pretrained(
        args.reward_model or args.model, num_labels=1, **fp32
    )
    for m in (value_model, reward_model):
        m.config.pad_token_id = tokenizer.pad_token_id
    page_in(policy, value_model, reward_model, *([ref_policy] if ref_policy else []))
    rss_models = rss_mb()
    n_params = sum(p.numel() for p in policy.parameters())

    output_dir = tempfile.mkdtemp(prefix="trl-ppo-baseline-")
    config = PPOConfig(
        output_dir=output_dir,
        # batch geometry (see the module docstring)
        total_episodes=args.episodes,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        num_mini_batches=args.batch_size // args.mini_batch_size,
        **(
            {"local_rollout_forward_batch_size": args.rollout_forward_batch_size}
            if args.rollout_forward_batch_size
            else {}
        ),
        num_ppo_epochs=args.ppo_epochs,
        # sampling
        response_length=args.max_new_tokens,
        temperature=args.temperature,
        stop_token="eos",
        # optimisation / objective
        learning_rate=args.lr,
        lr_scheduler_type=args.lr_scheduler,
        kl_coef=args.kl_coef,
        kl_estimator=args.kl_estimator,
        cliprange=args.clip_range,
        cliprange_value=args.value_clip_range,
        vf_coef=args.vf_coef,
        gamma=args.gamma,
        lam=args.lam,
        seed=args.seed,
        data_seed=args.seed,
        # CPU; float32, or accelerate's bfloat16 autocast (--bf16) as alignloop's precision
        use_cpu=True,
        bf16=args.bf16,
        fp16=False,
        gradient_checkpointing=False,  # PPOTrainer.train() never enables it anyway
        # nothing but PPO: no eval, no saving, no reporting, no sample generations
        num_sample_generations=0,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        push_to_hub=False,
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )

    # Rollout throughput: TRL logs none, so time its batch_generation (the `generate` calls
    # of the rollout phase; train() looks the name up in the module at call time).
    rollout = {"seconds": 0.0, "tokens": 0, "calls": 0}
    real_batch_generation = ppo_module.batch_generation
    stop_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id

    def timed_batch_generation(model, queries, *rest, **kwargs):
        t0 = time.perf_counter()
        query_responses, logitss = real_batch_generation(model, queries, *rest, **kwargs)
        rollout["seconds"] += time.perf_counter() - t0
        responses = query_responses[:, queries.shape[1] :]
        # sampled tokens: up to and including the first stop token (generate pads after it)
        is_stop = responses == stop_id
        after_stop = (is_stop.cumsum(dim=1) - is_stop.int()) > 0
        rollout["tokens"] += int((~after_stop & ((responses != pad_id) | is_stop)).sum())
        rollout["calls"] += 1
        return query_responses, logitss

    ppo_module.batch_generation = timed_batch_generation

    history: list[dict] = []

    class KeepLogs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                history.append(dict(logs))

    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref_policy,
        reward_model=reward_model,
        train_dataset=train_dataset,
        value_model=value_model,
        callbacks=[KeepLogs()],
        peft_config=peft_config,
    )
    rss_trainer = rss_mb()
    # Optimizer steps actually taken (accelerate skips step() between accumulation
    # boundaries; a hook on the wrapped torch optimizer sees only the real ones).
    steps = {"optimizer": 0}

    def count_step(*_: object) -> None:
        steps["optimizer"] += 1

    getattr(trainer.optimizer, "optimizer", trainer.optimizer).register_step_post_hook(count_step)
    log(
        f"{n_params:,} params per model; rollout batch {config.batch_size}, mini-batch "
        f"{config.mini_batch_size}, {config.num_total_batches} PPO iterations"
    )

    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    shutil.rmtree(output_dir, ignore_errors=True)

    episodes = trainer.state.episode  # TRL counts batch_size per iteration
    last = history[-1] if history else {}
    scored = [h for h in history if "objective/scores" in h]
    result = {
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "episodes": episodes,
        "seconds": round(seconds, 3),
        "episodes_per_s": round(episodes / seconds, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_mb": {
            "start": round(rss_start, 1),
            "after_imports": round(rss_imports, 1),
            "after_models_load": round(rss_models, 1),
            "after_trainer_init": round(rss_trainer, 1),
            "after_train": round(rss_mb(), 1),
        },
        "rollout_tokens_per_s": (
            round(rollout["tokens"] / rollout["seconds"], 1) if rollout["seconds"] else None
        ),
        "rollout": {
            "generate_seconds": round(rollout["seconds"], 3),
            "generated_tokens": rollout["tokens"],
            "generate_calls": rollout["calls"],
        },
        "trl_logged_eps": last.get("eps"),
        "configuration": "lora" if args.lora_r else "full",
        "trainable_parameters": sum(
            p.numel() for p in trainer.model.parameters() if p.requires_grad
        ),
        "gradient_steps": steps["optimizer"],
        "early_stops": 0,  # TRL's PPO loop has no KL / target early stop
        "ppo_iterations": config.num_total_batches,
        "reward_start": scored[0]["objective/scores"] if scored else None,
        "reward_end": scored[-1]["objective/scores"] if scored else None,
        "final_kl": scored[-1].get("objective/kl") if scored else None,
        "malloc_tuned": malloc_tuned,
        # as alignloop's trainer/common/jemalloc.py tells it: mapped into this process or not
        "allocator": "jemalloc" if "jemalloc" in Path("/proc/self/maps").read_text() else "glibc",
        # torch's caches of oneDNN computations, as benchmarks/ppo.py gave both sides
        "onednn_caches": {
            name: os.environ.get(name)
            for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
        },
        "final_metrics": {
            k: last.get(k)
            for k in ("objective/kl", "objective/scores", "loss/policy_avg", "loss/value_avg")
        },
        "model": {"path": str(Path(args.model).resolve()), "params_per_model": n_params},
        "prompts": {"path": str(Path(args.prompts).resolve()), "count": len(queries)},
        "hyperparameters": {
            "episodes": args.episodes,
            "rollout_batch_size": config.batch_size,
            "mini_batch_size": config.mini_batch_size,
            "per_device_train_batch_size": config.per_device_train_batch_size,
            "gradient_accumulation_steps": config.gradient_accumulation_steps,
            "num_mini_batches": config.num_mini_batches,
            "local_rollout_forward_batch_size": config.local_rollout_forward_batch_size,
            "ppo_epochs": config.num_ppo_epochs,
            "max_new_tokens": config.response_length,
            "temperature": config.temperature,
            "lr": config.learning_rate,
            "lr_scheduler": getattr(config.lr_scheduler_type, "value", config.lr_scheduler_type),
            "kl_coef": config.kl_coef,
            "kl_estimator": config.kl_estimator,
            "clip_range": config.cliprange,
            "value_clip_range": config.cliprange_value,
            "vf_coef": config.vf_coef,
            "gamma": config.gamma,
            "lam": config.lam,
            "whiten_rewards": config.whiten_rewards,
            "lora": (
                {"r": args.lora_r, "alpha": args.lora_alpha, "targets": args.lora_targets}
                if args.lora_r
                else None
            ),
            "stop_token": "eos",
            "eos_token": tokenizer.eos_token,
            "seed": args.seed,
            "threads": args.threads,
            "dtype": "float32",
            "autocast": "bfloat16" if args.bf16 else None,
        },
    }
    if args.save_policy:  # after every measurement above
        trainer.policy_model.save_pretrained(args.save_policy)
    return result


def child_main(argv: list[str]) -> int:
    args = parse_args(argv)
    # stdout carries exactly one JSON object: point fd 1 (TRL's and transformers' prints,
    # C-level output) at stderr and keep a private handle on the real stdout.
    real_stdout = os.fdopen(os.dup(1), "w")
    sys.stdout.flush()
    os.dup2(2, 1)
    result = benchmark(args)
    real_stdout.write(json.dumps(result) + "\n")
    real_stdout.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get(_CHILD_ENV) == "1":
        return child_main(argv)
    args = parse_args(argv)  # fail fast on bad flags, before building anything
    return run_in_venv(argv, args.threads)


if __name__ == "__main__":
    sys.exit(main())
