"""Reward model round on simulated live feedback: training speed, memory, held-out accuracy.

The demo model answers fresh prompts twice (sampled once, cached on disk); simulated users
with a hidden preference (concise over verbose, honest over fabricated) rate them
(``tests.fixtures.reward_feedback``); the events go into a fresh database on the local
Postgres through the ingestor's writer; then one full round runs (from scratch): train,
evaluate on held-out prompts, gate, register.

    python -m benchmarks.reward [--quick] [--prompts 300] [--steps N] [--batch-size B]

Prints one JSON object on stdout: ``pairs_per_s`` (preference pairs through forward +
backward per second of training, thumbs labels ride along in the same batches),
``scored_per_s`` (answers scored per second at evaluation), ``peak_rss_mb``,
``heldout_pairwise_accuracy`` and more. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from feedback.db import connect, migrate
from feedback.ingest.writer import prepare_session, store_events
from tests.fixtures.model import demo_model_cache_dir
from tests.fixtures.postgres import create_database, drop_database
from tests.fixtures.reward_feedback import feedback_events, sampled_answers
from trainer.demo.model import bootstrap_demo_model
from trainer.reward.config import RewardConfig
from trainer.reward.model import load_reward_model
from trainer.reward.trainer import train_reward_model


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> int:
    defaults = RewardConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="30 steps of 8 pairs")
    ap.add_argument("--prompts", type=int, default=300, help="prompts answered twice each")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    args = ap.parse_args()
    steps = args.steps or (30 if args.quick else defaults.steps)
    batch_size = args.batch_size or (8 if args.quick else defaults.batch_size)

    base = os.environ.get("ALIGNLOOP_BASE_MODEL")
    model_dir = Path(base) if base else demo_model_cache_dir()
    if not base:
        log(f"demo model at {model_dir} (built once if missing)")
        bootstrap_demo_model(model_dir, progress=False)
    started = time.monotonic()
    prompts, first, second = sampled_answers(model_dir, args.prompts)
    log(f"answers for {len(prompts)} prompts ready in {time.monotonic() - started:.1f}s")
    events = feedback_events(prompts, first, second)

    url = create_database()
    try:
        with connect(url, autocommit=True) as conn:
            migrate(conn)
            prepare_session(conn)
            store_events(conn, events)
        with tempfile.TemporaryDirectory(prefix="alignloop-reward-bench-") as state_dir:
            config = RewardConfig(
                database_url=url,
                state_dir=Path(state_dir),
                base_model=model_dir.resolve(),
                steps=steps,
                batch_size=batch_size,
                warm_start=False,
                progress=sys.stderr.isatty(),
            )
            log(f"training: {steps} steps x {batch_size} pairs (+ {batch_size} thumbs)")
            t0 = time.monotonic()
            result = train_reward_model(config)
            round_seconds = time.monotonic() - t0
            assert result.version is not None and result.metrics is not None

            model = load_reward_model(Path(result.version.path))
            conversations = [[{"role": "user", "content": p.text}] for p in prompts]
            answers = [a or "" for a in first]
            torch.set_num_threads(config.num_threads)  # as in training
            model.score(conversations[:8], answers[:8])  # warm-up: first calls pay setup
            t0 = time.perf_counter()
            model.score(conversations, answers)
            scored_per_s = len(answers) / (time.perf_counter() - t0)
    finally:
        drop_database(url)

    stats = result.stats
    print(
        json.dumps(
            {
                "pairs_per_s": stats["pairs_per_s"],
                "scored_per_s": round(scored_per_s, 1),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "heldout_pairwise_accuracy": result.metrics["pairwise_accuracy"],
                "heldout_auc": result.metrics["auc"],
                "heldout_pairs": result.metrics["n_pairs"],
                "heldout_labels": result.metrics["n_labels"],
                "train_pairs": stats["train_pairs"],
                "train_labels": stats["train_labels"],
                "steps": steps,
                "batch_size": batch_size,
                "train_seconds": stats["train_seconds"],
                "round_seconds": round(round_seconds, 1),
                "final_loss": stats["final_loss"],
                "outcome": result.outcome,
                "torch_threads": config.num_threads,
                "quick": args.quick,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
