"""Command-line flags generated from a config dataclass, one per field.

``--steps``, ``--no-warm-start``, ``--rules '[...]'``, ``--test non_inferiority``: the flag's
type comes from the field's annotation (``Literal[...]`` gives its choices; lists and
tuples are given as JSON), its default from the field, its help from the field's ``help``
metadata, so a config class is documented once and its command line cannot drift from it
(:mod:`schemas.config`). A nested dataclass field (``RoundConfig.ppo``) gets its own fields
as flags, parsed back into it by :func:`config_from_namespace`.

With ``overrides_only=True`` a flag has no default: only the flags given on the command line
reach the namespace, and :func:`overrides_from_namespace` returns them to apply over a base
config chosen at run time (``alignloop canary --demo --margin 0``: the demo thresholds with
the margin set to 0, an explicit 0 included).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Any

from schemas.config import field_type, literal_choices


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[operator]  # a field has one or the other


def _json_tuple(text: str) -> tuple[Any, ...]:
    return tuple(json.loads(text))


def add_config_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    overrides_only: bool = False,
) -> None:
    """One flag per field of dataclass ``cls`` (and of its dataclass-typed fields)."""
    for f in dataclasses.fields(cls):
        kind = field_type(cls, f.name)
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            group = parser.add_argument_group(f"{f.name} ({kind.__name__})")
            add_config_flags(group, kind, overrides_only=overrides_only)
            continue
        flag = "--" + f.name.replace("_", "-")
        # argparse %-formats help text: a literal "%" ("within 1 % of") must be doubled.
        help_text = f.metadata.get("help", "").replace("%", "%%")
        default = _default(f)
        if overrides_only:
            help_text += f" (default: {default})"
            default = argparse.SUPPRESS
        choices = literal_choices(kind)
        origin = typing.get_origin(kind)
        if kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        elif choices is not None:
            parser.add_argument(
                flag, type=type(choices[0]), choices=choices, default=default, help=help_text
            )
        elif origin in (list, tuple):
            parse = json.loads if origin is list else _json_tuple
            parser.add_argument(flag, type=parse, default=default, help=help_text + " (JSON)")
        else:
            parser.add_argument(flag, type=kind, default=default, help=help_text)


def config_from_namespace(cls: type, values: dict[str, Any]) -> Any:
    """Build ``cls`` from parsed flags (nested dataclass fields from their own flags)."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        kind = field_type(cls, f.name)
        kwargs[f.name] = (
            config_from_namespace(kind, values)
            if isinstance(kind, type) and dataclasses.is_dataclass(kind)
            else values[f.name]
        )
    return cls(**kwargs)


def overrides_from_namespace(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``cls`` given on a command line built with ``overrides_only=True``."""
    return {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values}
