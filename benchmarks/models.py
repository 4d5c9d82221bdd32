"""The base model a benchmark runs on, by name: ``demo``, ``smollm2`` or a directory.

``demo`` is the 2M-parameter demo model and ``smollm2`` SmolLM2-135M-Instruct (the built-in
preset of :mod:`trainer.demo.presets`), each built once per machine under
``$ALIGNLOOP_CACHE_DIR`` exactly as the tests build them; anything else is a Hugging Face
causal LM directory, used as it is.
"""

from __future__ import annotations

from pathlib import Path

NAMES = ("demo", "smollm2")


def model_dir(name_or_path: str | Path) -> Path:
    """The directory of the model ``name_or_path`` names, built first where it must be."""
    if str(name_or_path) == "demo":
        from tests.fixtures.model import demo_model_cache_dir
        from trainer.demo.model import bootstrap_demo_model

        return bootstrap_demo_model(demo_model_cache_dir())
    if str(name_or_path) == "smollm2":
        from tests.fixtures.model_matrix import smollm2_model_dir

        return smollm2_model_dir()
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise SystemExit(f"{path}: not a model name ({', '.join(NAMES)}) nor a model directory")
    return path


def model_label(name_or_path: str | Path) -> str:
    """What the JSON calls the model: its name, or the directory's own name."""
    return str(name_or_path) if str(name_or_path) in NAMES else Path(name_or_path).name
