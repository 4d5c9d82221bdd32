"""Command-line flags generated from a config dataclass, one per field.

``--steps``, ``--no-warm-start``, ``--rules '[...]'``: the flag's type comes from the
field's annotation, its default from the field, its help from the field's ``help``
metadata, so a config class is documented once and its command line cannot drift from it.
A nested dataclass field (``RoundConfig.ppo``) gets its own fields as flags, parsed back
into it by :func:`config_from_namespace`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Any


def _field_type(hints: dict[str, Any], name: str) -> Any:
    kind = hints[name]
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:  # X | None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    return kind


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of dataclass ``cls`` (and of its dataclass-typed fields)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = _field_type(hints, f.name)
        if dataclasses.is_dataclass(kind):
            group = parser.add_argument_group(f"{f.name} ({kind.__name__})")
            add_config_flags(group, kind)  # type: ignore[arg-type]
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        default = _default(f)
        if kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        elif typing.get_origin(kind) is list:
            parser.add_argument(flag, type=json.loads, default=default, help=help_text + " (JSON)")
        else:
            parser.add_argument(flag, type=kind, default=default, help=help_text)


def config_from_namespace(cls: type, values: dict[str, Any]) -> Any:
    """Build ``cls`` from parsed flags (nested dataclass fields from their own flags)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        kind = _field_type(hints, f.name)
        kwargs[f.name] = (
            config_from_namespace(kind, values)
            if dataclasses.is_dataclass(kind)
            else values[f.name]
        )
    return cls(**kwargs)
