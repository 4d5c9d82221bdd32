"""A process that asks for jemalloc runs its own command again with it preloaded, once;
the ``glibc`` setting keeps glibc."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from trainer.common.jemalloc import find_jemalloc, jemalloc_loaded, preloaded_env

PROBE = (
    "import os, sys; from trainer.common.jemalloc import run_on_jemalloc, jemalloc_loaded; "
    "print('start', flush=True); run_on_jemalloc(os.environ.get('CHOICE', 'auto')); "
    "print(jemalloc_loaded(), sys.argv[1:], os.environ['LD_PRELOAD'].split()[0] if "
    "os.environ.get('LD_PRELOAD') else None)"
)


def _probe(**env: str) -> list[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LD_PRELOAD", "ALIGNLOOP_"))}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "--flag", "value"],
        env={**base, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.splitlines()


def test_the_library_is_first_on_ld_preload_and_named_once() -> None:
    env = {"LD_PRELOAD": "libother.so libjemalloc.so.2", "X": "1"}
    env = preloaded_env(env, "libjemalloc.so.2")
    assert env == {"LD_PRELOAD": "libjemalloc.so.2 libother.so", "X": "1"}
    assert preloaded_env({}, "libjemalloc.so.2")["LD_PRELOAD"] == "libjemalloc.so.2"


def test_this_test_process_is_not_on_jemalloc_unless_preloaded() -> None:
    assert jemalloc_loaded() == ("jemalloc" in os.environ.get("LD_PRELOAD", ""))


@pytest.mark.skipif(find_jemalloc() is None, reason="no libjemalloc on this machine")
def test_the_command_runs_again_on_jemalloc_with_its_arguments() -> None:
    # Twice "start": the same command line ran again, once, and then on jemalloc.
    assert _probe() == ["start", "start", f"True ['--flag', 'value'] {find_jemalloc()}"]


def test_glibc_when_asked() -> None:
    assert _probe(CHOICE="glibc") == ["start", "False ['--flag', 'value'] None"]
