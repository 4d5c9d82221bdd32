"""Imports point one way: every production module imports only its own component or the
layers below it.

The layers, bottom to top (a module belongs to the most specific component naming it):

0. ``schemas``: the wire protocol, events, settings, the config base: no alignloop imports.
1. ``feedback.db``: Postgres connections and migrations.
2. ``serving``, ``feedback``, ``deploy.policies``: the chat API, the feedback store, the
   policy registry. None of them knows the others.
3. ``trainer``, ``deploy.ops``: the training rounds; the operators' CLI and admin API.
4. ``deploy.console``: the operator console (pages over the registry, the feedback store
   and the training rounds) on top of the admin API.
5. ``deploy.canary``: the canary controller (it hosts the admin API and the console).
6. ``deploy.local``, ``deploy.simulator``, ``deploy.observability``: the embedded stack, the
   simulated users, the Grafana dashboards' generator.
7. ``deploy.cli``: the one ``alignloop`` entry point (it names commands as strings).

Inside ``trainer`` the sub-packages are layered too: ``common`` < ``demo``, ``reward`` <
``ppo`` < ``rounds``.

Every ``import`` counts, the ones inside functions too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "serving", "feedback", "trainer", "deploy")

SYSTEM: Mapping[str, int] = {
    "schemas": 0,
    "feedback.db": 1,
    "serving": 2,
    "feedback": 2,
    "deploy.policies": 2,
    "trainer": 3,
    "deploy.ops": 3,
    "deploy.console": 4,
    "deploy.canary": 5,
    "deploy.local": 6,
    "deploy.simulator": 6,
    "deploy.observability": 6,
    "deploy.cli": 7,
}
TRAINER: Mapping[str, int] = {
    "trainer.common": 0,
    "trainer.demo": 1,
    "trainer.reward": 1,
    "trainer.ppo": 2,
    "trainer.rounds": 3,
}


def component(module: str, layers: Mapping[str, int]) -> str | None:
    """The most specific entry of ``layers`` that is ``module`` or a package above it."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in layers:
            return prefix
    return None


def violations(
    imports: Mapping[str, Iterable[str]], layers: Mapping[str, int]
) -> list[tuple[str, str]]:
    """``(importer, imported)`` pairs that point sideways or up: the imported module's
    component is another one on the same layer or a higher one. Modules outside ``layers``
    (the standard library, third parties, other layer maps) are not judged here."""
    bad = []
    for importer, targets in imports.items():
        own = component(importer, layers)
        if own is None:
            continue
        for target in targets:
            theirs = component(target, layers)
            if theirs is None or theirs == own:
                continue
            if layers[theirs] >= layers[own]:
                bad.append((importer, target))
    return bad


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(tree: ast.AST, package: str) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            # `from deploy import canary` imports the module deploy.canary
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def source_imports() -> dict[str, set[str]]:
    """Every production module and the modules it imports."""
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name = _module_name(path)
            own_package = name if path.name == "__init__.py" else name.rpartition(".")[0]
            out[name] = _imported(ast.parse(path.read_text(), str(path)), own_package)
    return out


def test_imports_point_down_between_the_systems_parts():
    bad = violations(source_imports(), SYSTEM)
    assert not bad, "imports against the layers:\n" + "\n".join(f"  {a} -> {b}" for a, b in bad)


def test_imports_point_down_inside_the_trainer():
    bad = violations(source_imports(), TRAINER)
    assert not bad, "imports against the layers:\n" + "\n".join(f"  {a} -> {b}" for a, b in bad)


def test_every_production_module_has_a_layer():
    # a package's own __init__ that imports nothing (``deploy``) needs no layer
    unplaced = [m for m, i in source_imports().items() if i and component(m, SYSTEM) is None]
    assert unplaced == []


def test_the_check_finds_upward_and_sideways_imports():
    imports = {
        "schemas.events": {"serving.app"},  # up
        "serving.chat": {"feedback.datasets", "schemas.chat", "serving.engine", "json"},
        "feedback.datasets": {"feedback.db", "deploy.policies.registry"},  # sideways
        "deploy.cli": {"deploy.local.cpu_plan", "trainer.rounds.cli"},
    }
    assert violations(imports, SYSTEM) == [
        ("schemas.events", "serving.app"),
        ("serving.chat", "feedback.datasets"),
        ("feedback.datasets", "deploy.policies.registry"),
    ]
    # the most specific component wins: feedback.db sits below the rest of feedback
    assert violations({"feedback.db": {"feedback.datasets"}}, SYSTEM) == [
        ("feedback.db", "feedback.datasets")
    ]
