"""The shared config base: Literal choices and checks refused by name, secrets redacted,
the fingerprint over what changes a run's result (nested configs included)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar, Literal

import pytest

from schemas.config import ConfigBase


@dataclass(frozen=True)
class _Inner(ConfigBase):
    lr: float = field(default=0.1, metadata={"help": "step size"})

    def checks(self) -> list[tuple[bool, str, str]]:
        return [(self.lr > 0, "lr", "must be > 0")]


@dataclass(frozen=True)
class _Outer(ConfigBase):
    SECRETS: ClassVar[tuple[str, ...]] = ("database_url",)
    UNFINGERPRINTED: ClassVar[tuple[str, ...]] = ("progress", "state_dir")

    mode: Literal["fast", "exact"] = "fast"
    database_url: str | None = "postgresql://u:hunter2@db/x"
    state_dir: Path = Path("/tmp/a")
    progress: bool = True
    seed: int = 0
    inner: _Inner = field(default_factory=_Inner)


def test_a_literal_field_refuses_other_values_by_name() -> None:
    with pytest.raises(ValueError, match=r"_Outer.mode must be one of \('fast', 'exact'\)"):
        _Outer(mode="quick")  # type: ignore[arg-type]  # the refusal under test


def test_checks_name_the_class_the_field_and_the_value() -> None:
    with pytest.raises(ValueError, match=r"^_Inner.lr must be > 0, got -1.0$"):
        _Inner(lr=-1.0)


def test_to_json_redacts_secrets_and_serialises_paths_and_nested_configs() -> None:
    out = _Outer().to_json()
    assert out["database_url"] is None
    assert "hunter2" not in str(out)
    assert out["state_dir"] == "/tmp/a"
    assert out["inner"] == {"lr": 0.1}


def test_fingerprint_follows_what_changes_the_result() -> None:
    base = _Outer()
    # where things are, progress bars and secrets do not change what a run computes
    assert replace(base, state_dir=Path("/elsewhere")).fingerprint() == base.fingerprint()
    assert replace(base, progress=False).fingerprint() == base.fingerprint()
    assert replace(base, database_url="postgresql://other").fingerprint() == base.fingerprint()
    # a result field, at the top or nested, does
    assert replace(base, seed=1).fingerprint() != base.fingerprint()
    assert replace(base, mode="exact").fingerprint() != base.fingerprint()
    assert replace(base, inner=_Inner(lr=0.2)).fingerprint() != base.fingerprint()
    assert len(base.fingerprint()) == 16
