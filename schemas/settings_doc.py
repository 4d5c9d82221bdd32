"""docs/configuration.md, generated from :class:`schemas.settings.Settings`.

Regenerate after changing a setting (a test fails while the page and the class differ)::

    ./dev run python -m schemas.settings_doc > docs/configuration.md

:func:`settings_markdown` renders one table row per field of ``Settings.model_fields``: the
environment variable, the type, the default and the field's description (an empty cell
where the field has none). Pure string building: nothing is read from the environment.
"""

from __future__ import annotations

import re
import types
import typing

from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from schemas import settings as settings_module
from schemas.settings import Settings

REGENERATE = "./dev run python -m schemas.settings_doc > docs/configuration.md"

_BOUNDS = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))


# Variables read outside `Settings` (by ./dev, the tests and the embedded stack); kept here so
# the generated page is the one list of every ALIGNLOOP_ variable.
_OUTSIDE_SETTINGS = [
    "## Outside `Settings`",
    "",
    "| variable | read by | meaning |",
    "|---|---|---|",
    "| `ALIGNLOOP_CACHE_DIR` | `./dev`, the tests, `benchmarks/trl_ppo_baseline.py` "
    "| Root of the cached virtualenvs and the tests' demo model builds; "
    "default `~/.cache/alignloop`. |",
    "| `ALIGNLOOP_VENV` | `./dev` | Use this virtualenv instead of the one keyed by "
    "`pyproject.toml` and `./dev`. |",
    "| `ALIGNLOOP_CPUS` | the `alignloop` entry point (`deploy/local/cpu_plan.py`) "
    "| Cores this process is pinned to; set by `alignloop up` for each child, not by hand. |",
    "",
]


def env_var(name: str) -> str:
    """The environment variable of a field (pydantic-settings matches it in any case)."""
    prefix = Settings.model_config.get("env_prefix", "")
    return f"{prefix}{name}".upper()


def _type_name(annotation: object) -> str:
    if annotation is type(None):
        return "None"
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _bounds(info: FieldInfo) -> str:
    parts = []
    for meta in info.metadata:
        for attr, sign in _BOUNDS:
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sign} {value}")
    return ", ".join(parts)


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        return "computed"
    value = info.default
    if value is PydanticUndefined:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str) and not value:
        return '`""`'
    return f"`{value}`"


def _cell(text: str) -> str:
    """One table cell: whitespace collapsed, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _intro() -> str:
    """The settings module's docstring, with reStructuredText literals as Markdown ones."""
    doc = (settings_module.__doc__ or "").strip()
    return re.sub(r"``([^`]+)``", r"`\1`", doc)


def settings_markdown() -> str:
    """The whole of docs/configuration.md."""
    lines = [
        "# Configuration",
        "",
        "<!-- Generated from schemas/settings.py by schemas/settings_doc.py; do not edit.",
        f"     Regenerate: {REGENERATE} -->",
        "",
        _intro(),
        "",
        "Every setting is read from the environment (names in any case) when a process "
        "starts; command-line flags, where a command has them, override the setting.",
        "",
        "| variable | type | default | description |",
        "|---|---|---|---|",
    ]
    for name, info in Settings.model_fields.items():
        kind = _type_name(info.annotation)
        bounds = _bounds(info)
        if bounds:
            kind = f"{kind} ({bounds})"
        lines.append(
            f"| `{env_var(name)}` | {_cell(f'`{kind}`')} | {_cell(_default(info))} "
            f"| {_cell(info.description or '')} |"
        )
    lines += [
        "",
        *_OUTSIDE_SETTINGS,
        f"Regenerate this page after changing `Settings`: `{REGENERATE}`.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(settings_markdown(), end="")
