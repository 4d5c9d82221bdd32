"""glibc malloc settings for a PyTorch CPU training process.

PyTorch's CPU allocator is plain ``malloc``. glibc serves every block above the mmap
threshold (128 KiB at start, adapting up to 32 MiB) with a fresh ``mmap`` and returns it
to the OS on ``free``, and trims the heap top above 128 KiB: a training step that
allocates and frees the same activation-sized tensors again and again pays page faults
(zeroed pages) for every one of them. Raising both thresholds keeps freed blocks in the
heap for the next step: more episodes/s on the PPO benchmark at the same peak RSS (the
peak is what is live at once, not what was freed; measured: docs/benchmarks.md, "Figures
quoted in code").

Only glibc is tuned; elsewhere (musl, macOS) :func:`keep_freed_memory` does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def keep_freed_memory(threshold_bytes: int = 1 << 30) -> bool:
    """Serve blocks up to ``threshold_bytes`` from the heap and do not trim it below that;
    True when glibc took both settings."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(M_MMAP_THRESHOLD, threshold_bytes)) and bool(
        mallopt(M_TRIM_THRESHOLD, threshold_bytes)
    )
    log.debug("glibc malloc thresholds raised to %d bytes: %s", threshold_bytes, ok)
    return ok
