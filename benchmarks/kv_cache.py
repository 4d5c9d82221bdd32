"""The decode loop (:class:`~trainer.ppo.rollout.hf.HFSampler`) with ``transformers``'
``DynamicCache`` against alignloop's reserved cache (:mod:`trainer.ppo.rollout.kv_cache`).

Both sides run the very same sampler on the same model, prompts, seed and precision; only
the cache the loop builds differs. The prompts are ``bench ppo``'s (its demo-corpus
questions in the chat template) and rows end at the model's own end-of-sequence tokens, so
rows leave the batch at many different steps, as in a PPO round; ``--no-stop`` decodes
every row to ``--new-tokens`` instead. Both sides must draw the same tokens (asserted: the
caches hold the same values, so the logits are equal) and the tokens generated are
reported. The order alternates (A B B A ...); each side's time is the median over
``--rounds``, after one untimed warm-up call per side. The memory side of the change is
``./dev bench ppo_memory``'s (the heap's high-water mark per phase): one process cannot
measure two caches' peaks apart.

    ./dev bench kv_cache [--model demo|smollm2|DIR] [--scaled-model 512,10]
        [--precision bfloat16] [--rows 64] [--new-tokens 48,128] [--rounds 8] [--no-stop]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from benchmarks import ppo as bench_ppo
from benchmarks.models import model_dir
from trainer.common.device import resolve_device
from trainer.ppo.models import PolicyModels
from trainer.ppo.rollout import hf
from trainer.ppo.rollout.base import render_prompts
from trainer.ppo.rollout.kv_cache import reserved_cache


def _dynamic_cache(config: Any, reserve: int, dtype: torch.dtype | None = None) -> DynamicCache:
    del reserve, dtype
    return DynamicCache(config=config)


SIDES = {"transformers_dynamic": _dynamic_cache, "alignloop_reserved": reserved_cache}


def _decode(sampler: hf.HFSampler, prompts: list[list[int]], new_tokens: int, seed: int):
    """One decode of every prompt; (seconds, every row's tokens)."""
    start = time.perf_counter()
    (rows,) = sampler.stream(prompts, max_new_tokens=new_tokens, temperature=1.0, seed=seed)
    seconds = time.perf_counter() - start
    return seconds, {row.index: row.response_ids for row in rows}


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="demo", help="demo, smollm2 or a model directory")
    ap.add_argument("--scaled-model", metavar="HIDDEN,LAYERS", help="as benchmarks/ppo.py")
    ap.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto")
    ap.add_argument("--rows", type=int, default=64, help="prompts decoded at once")
    ap.add_argument("--no-stop", action="store_true", help="no row ends before --new-tokens")
    ap.add_argument(
        "--new-tokens", default="48,128", help="answer caps (bench ppo: 48), comma-separated"
    )
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="alignloop-bench-kv-cache-"))
    model = Path(model_dir(args.model))
    if args.scaled_model:
        model = bench_ppo.scaled_model(model, args.scaled_model, work / "model")
    precision = bench_ppo.resolved_precision(model, args.precision)
    reward_dir, prompts_file = bench_ppo._setup(model, work, "small")
    models = PolicyModels.load(model, reward_dir, critic="shared")
    models = models.to(resolve_device("auto"), precision)
    sampler = hf.HFSampler(models)
    if args.no_stop:
        sampler.eos = set()
    with open(prompts_file) as f:
        conversations = [json.loads(line)["messages"] for line in f][: args.rows]
    prompts = render_prompts(models.tokenizer, conversations)
    cases: dict[str, Any] = {}
    for new_tokens in (int(n) for n in args.new_tokens.split(",")):
        per_round: dict[str, list[float]] = {side: [] for side in SIDES}
        tokens: dict[str, dict[int, list[int]]] = {}
        for r in range(args.rounds + 1):  # round 0: warm-up, untimed
            order = list(SIDES) if r % 2 == 0 else list(reversed(SIDES))
            for side in order:
                hf.reserved_cache = SIDES[side]  # the name the sampler builds its cache by
                seconds, drawn = _decode(sampler, prompts, new_tokens, seed=0)
                if r:
                    per_round[side].append(seconds)
                tokens[side] = drawn
            hf.reserved_cache = reserved_cache
            same = tokens["transformers_dynamic"] == tokens["alignloop_reserved"]
            assert same, f"{new_tokens} tokens, round {r}: the two caches drew different tokens"
        generated = sum(len(t) for t in tokens["alignloop_reserved"].values())  # both sides'
        median = {side: statistics.median(s) for side, s in per_round.items()}
        cases[f"{new_tokens}_new_tokens"] = {
            "rows": len(prompts),
            "prompt_tokens_mean": round(statistics.mean(len(p) for p in prompts), 1),
            "tokens_generated_per_side_per_round": generated,
            "seconds_median": {s: round(v, 3) for s, v in median.items()},
            "seconds_per_round": {s: [round(v, 3) for v in x] for s, x in per_round.items()},
            "tokens_per_s": {s: round(generated / v, 1) for s, v in median.items()},
            "speedup": round(median["transformers_dynamic"] / median["alignloop_reserved"], 3),
            "same_tokens": True,
        }
    config = {**vars(args), "model": args.scaled_model or args.model, "precision": precision}
    print(
        json.dumps(
            {
                "config": {**config, "torch": torch.__version__},
                "parameters_with_adapters": sum(p.numel() for p in models.peft_model.parameters()),
                "machine": {"cpu": platform.processor() or platform.machine()},
                "cases": cases,
                "differences_not_removed": [],
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
