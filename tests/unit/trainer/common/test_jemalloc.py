"""A process that asks for jemalloc runs its own command again with it preloaded, once;
the ``glibc`` setting keeps glibc."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from trainer.common.jemalloc import (
    find_jemalloc,
    jemalloc_loaded,
    preloaded_env,
    release_freed_pages,
)

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


RELEASE_PROBE = """
from trainer.common.jemalloc import release_freed_pages

def rss_anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) // 1024

before = rss_anon_mb()
# 64 MB written in 4 MB blocks (jemalloc returns blocks of 8 MiB and more at once).
blocks = [bytearray(b"x") * (4 << 20) for _ in range(16)]
del blocks  # freed: jemalloc keeps some of their pages for a while
held = rss_anon_mb()
released = release_freed_pages()
after = rss_anon_mb()
print(released, held - after, after - before)
"""


@pytest.mark.skipif(find_jemalloc() is None, reason="no libjemalloc on this machine")
def test_freed_pages_go_back_to_the_system_on_jemalloc() -> None:
    library = find_jemalloc()
    assert library is not None
    env = preloaded_env({k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}, library)
    out = subprocess.run(
        [sys.executable, "-c", RELEASE_PROBE], env=env, capture_output=True, text=True, check=True
    )
    released, dropped_mb, left_mb = out.stdout.split()
    assert released == "True"
    assert int(dropped_mb) >= 8, out.stdout  # pages jemalloc still held went back
    assert int(left_mb) <= 4, out.stdout  # none of the 64 MB freed stays resident


def test_without_jemalloc_nothing_is_released() -> None:
    if jemalloc_loaded():
        pytest.skip("this test process runs on jemalloc")
    assert release_freed_pages() is False
