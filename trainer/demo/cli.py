"""``alignloop bootstrap-model``: build the demo base model once (a no-op if it is current)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from schemas.settings import Settings
from trainer.demo.model import MANIFEST_NAME, BootstrapConfig, bootstrap_demo_model


def _parser() -> argparse.ArgumentParser:
    defaults = BootstrapConfig()
    parser = argparse.ArgumentParser(
        prog="alignloop bootstrap-model",
        description="Build the small demo chat model (tokenizer, Llama weights, chat template) "
        "offline and deterministically. Does nothing if OUT already holds this recipe's build.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="model directory (default: the demo model dir under ALIGNLOOP_STATE_DIR)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="training seed")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = args.out if args.out is not None else Settings().demo_model_dir()
    config = dataclasses.replace(BootstrapConfig(), seed=args.seed, steps=args.steps)
    model_dir = bootstrap_demo_model(out, config, force=args.force, progress=not args.quiet)
    manifest = json.loads((model_dir / MANIFEST_NAME).read_text())
    summary = {
        "model_dir": str(model_dir),
        "recipe_hash": manifest["recipe_hash"],
        "parameters": manifest["parameters"],
        "train_seconds": manifest["train_seconds"],
        "final_loss": manifest["final_loss"],
        "mixture": manifest["mixture"],
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
