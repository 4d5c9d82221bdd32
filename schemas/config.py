"""The one convention every job's configuration follows (TRL-style): a dataclass that
subclasses :class:`ConfigBase`, documented field by field.

* Each field carries its documentation as ``field(..., metadata={"help": "..."})``: the
  command line (:mod:`schemas.config_flags`) and the docs are generated from it, so a knob
  is documented once.
* A field with a fixed set of values is annotated ``Literal[...]``; :meth:`ConfigBase.validate`
  refuses any other value, naming the field and the choices.
* A subclass states its other constraints in :meth:`ConfigBase.checks` as
  ``(holds, field, message)`` triples; the first that fails raises ``ValueError`` naming the
  class and the field, e.g. ``PPOConfig.clip_range must be in (0, 1), got 1.5``.
* ``SECRETS`` name the fields :meth:`ConfigBase.to_json` blanks out (a database URL may hold a
  password): run records and logs store ``to_json()``, never the raw fields.
* ``UNFINGERPRINTED`` name the fields that do not change what a run computes (where things
  are, progress bars, time-boxes); :meth:`ConfigBase.fingerprint` hashes all the others, so a
  checkpoint is resumed only by a run that would compute the same thing, and a field added
  later counts unless it is listed here.

Nested configs (``RoundConfig.ppo``) are fields whose type is another ``ConfigBase``
dataclass; they are validated, serialised and fingerprinted with their parent.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    # Resolving a class's string annotations is the costly part: once per class, not once
    # per field of every config built.
    return typing.get_type_hints(cls)


def field_type(cls: type, name: str) -> Any:
    """The annotation of ``cls.name``, resolved, with ``| None`` stripped."""
    kind = _type_hints(cls)[name]
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        kind = args[0] if len(args) == 1 else kind
    return kind


def literal_choices(kind: Any) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal[...]`` annotation, else None."""
    return typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None


class ConfigBase:
    """Validation, redaction and fingerprint shared by every config dataclass (see the
    module docstring). Subclasses are ``@dataclass``es; they call nothing themselves:
    ``__post_init__`` validates."""

    SECRETS: ClassVar[tuple[str, ...]] = ()
    UNFINGERPRINTED: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        self.validate()

    def checks(self) -> list[tuple[bool, str, str]]:
        """The class's own constraints: ``(holds, field, message)``; none by default."""
        return []

    def validate(self) -> None:
        """Raise ``ValueError`` on the first field outside its ``Literal`` choices or the
        first failed :meth:`checks` entry."""
        name = type(self).__name__
        for f in dataclasses.fields(self):  # type: ignore[arg-type]  # subclasses are dataclasses
            choices = literal_choices(field_type(type(self), f.name))
            value = getattr(self, f.name)
            if choices is not None and value not in choices:
                raise ValueError(f"{name}.{f.name} must be one of {choices}, got {value!r}")
        for holds, field_name, message in self.checks():
            if not holds:
                value = getattr(self, field_name)
                raise ValueError(f"{name}.{field_name} {message}, got {value!r}")

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON values (paths as strings, nested configs as objects), with
        every ``SECRETS`` field set to None."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]  # subclasses are dataclasses
            value = getattr(self, f.name)
            if f.name in self.SECRETS:
                out[f.name] = None
            elif isinstance(value, ConfigBase):
                out[f.name] = value.to_json()
            else:
                out[f.name] = json.loads(json.dumps(value, default=str))
        return out

    def fingerprint(self) -> str:
        """16 hex digits identifying what a run with this config computes: a hash of every
        field except ``UNFINGERPRINTED`` and ``SECRETS`` (nested configs included)."""
        skipped = set(self.UNFINGERPRINTED) | set(self.SECRETS)
        kept = {k: v for k, v in self.to_json().items() if k not in skipped}
        return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


TrainingDevice = Literal["auto", "cpu", "cuda"]
TrainingPrecision = Literal["auto", "float32", "bfloat16"]


@dataclass
class DeviceConfig(ConfigBase):
    """The ``device`` field every training job's config shares (``PPOConfig``,
    ``RewardConfig``): where the models train, resolved and applied by
    :mod:`trainer.common.device`."""

    device: TrainingDevice = field(
        default="auto",
        metadata={
            "help": "Where the models train: 'auto' = the GPU when torch sees one (GPU "
            "LOCAL_RANK under torchrun), else the CPU; 'cuda' refuses to run without one. "
            "On a GPU the passes run under bfloat16 autocast while weights, gradients and "
            "optimizer state stay float32 (accelerate's mixed_precision='bf16'); on the CPU "
            "the products run in float32 or bfloat16 as ``precision`` says (docs/training.md, "
            "GPU vs CPU)."
        },
    )
    precision: TrainingPrecision = field(
        default="auto",
        metadata={
            "help": "The matrix products' precision: 'auto' = bfloat16 autocast on a GPU; "
            "on the CPU bfloat16 autocast for models of 10M parameters and more when the CPU "
            "multiplies bfloat16 natively (AVX-512 BF16 or AMX), else float32; 'bfloat16' = "
            "bfloat16 autocast on either; 'float32' = no autocast anywhere. Weights, "
            "gradients and optimizer state stay float32 in every case."
        },
    )
