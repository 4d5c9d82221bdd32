"""oneDNN's caches bounded from inside the process, before its first product, keep the
memory of many product shapes down; an operator's own capacities are kept."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest
import torch

from trainer.common.onednn_cache import ENVS, bound_computation_caches

# A decode loop's laid-out products (trainer.common.onednn_layout), one per row count, as
# answers finish: the float32 path runs on every x86 CPU. Live heap from glibc's counters.
PROBE = """
import ctypes, sys
import torch
if sys.argv[1] == "bounded":
    from trainer.common.onednn_cache import bound_computation_caches
    bound_computation_caches(4)

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split())]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def live():
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd

laid_out = torch.ops.mkldnn._reorder_linear_weight(torch.randn(1024, 256), batch_size=8)
torch.ops.mkldnn._linear_pointwise(torch.randn(1, 256), laid_out, None, "none", [], "")
before = live()
for rows in range(2, 402):
    torch.ops.mkldnn._linear_pointwise(torch.randn(rows, 256), laid_out, None, "none", [], "")
print((live() - before) / 2**20)
"""


def _has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


def _growth_mb(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ENVS and k != "LD_PRELOAD"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(
    not (
        _has_mallinfo2()
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    ),
    reason="needs glibc >= 2.33 and torch's oneDNN linear ops",
)
def test_bounded_caches_keep_the_memory_of_many_shapes_down() -> None:
    default = _growth_mb("default")
    # 220 MB on an AMX CPU (1.5 bounded): what an entry keeps depends on the CPU's kernels.
    if default < 32:
        pytest.skip(f"this CPU's oneDNN kept {default:.1f} MB for 400 shapes: nothing to bound")
    bounded = _growth_mb("bounded")
    assert bounded < 16, bounded
    assert default > 4 * bounded + 16, (default, bounded)


def test_an_operators_own_capacity_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENVS:  # set, then removed: restored to this process's own afterwards
        monkeypatch.setenv(name, "1")
        monkeypatch.delenv(name)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")
    assert bound_computation_caches(32) == {
        "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "32",
        "LRU_CACHE_CAPACITY": "7",
    }
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "32"
    with pytest.raises(ValueError, match="at least 1"):
        bound_computation_caches(0)
