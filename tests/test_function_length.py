"""No production function runs much past 60 lines unless a comment right above it says why
(``# Long on purpose: ...``, ``# Long only in lines: ...``): a long function usually does
two jobs, and the exceptions (the PPO steps in the order they happen, a table of templates)
are worth a sentence."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "serving", "feedback", "trainer", "deploy")
MAX_LINES = 65  # "about 60"


def long_functions_without_reason(source: str, name: str) -> list[str]:
    """``name:line function (N lines)`` for each function over :data:`MAX_LINES` whose
    decorators are not preceded by a comment starting with ``# Long``."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        length = node.end_lineno - node.lineno + 1  # type: ignore[operator]  # set by parse
        if length <= MAX_LINES:
            continue
        first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        above = lines[first - 2].strip() if first >= 2 else ""
        comment_block = above.startswith("#")
        k = first - 2
        while comment_block and k >= 0 and lines[k].strip().startswith("#"):
            if lines[k].strip().startswith("# Long"):
                break
            k -= 1
        else:
            found.append(f"{name}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_long_production_functions_say_why():
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            found += long_functions_without_reason(path.read_text(), str(path.relative_to(REPO)))
    assert found == [], "split these, or say above each why it is long:\n" + "\n".join(found)


def test_the_check_wants_the_reason_right_above():
    body = "\n".join(f"    x{i} = {i}" for i in range(70))
    bare = f"def f():\n{body}\n"
    assert long_functions_without_reason(bare, "m") == ["m:1 f (71 lines)"]
    explained = f"# Long on purpose: a table.\n# (continued)\ndef f():\n{body}\n"
    assert long_functions_without_reason(explained, "m") == []
    unrelated = f"# some other comment\ndef f():\n{body}\n"
    assert long_functions_without_reason(unrelated, "m") == ["m:2 f (71 lines)"]
