"""Keep a daemon's resident memory close to what it actually holds.

glibc gives each thread that allocates its own arena (up to 8 per core) and raises
its mmap threshold each time a large block is freed, so multi-megabyte buffers that
the agent and the collector free (hook frames, batches, messages) stay resident in
arenas afterwards. With one thread per hook connection that tripled the agent's RSS
under the spool attack of docs/security.md (206 MB against 82 MB tuned). Two arenas
and a fixed 256 KiB mmap threshold return such blocks to the system at once, the
same as running with MALLOC_ARENA_MAX=2 MALLOC_MMAP_THRESHOLD_=262144.
"""

from __future__ import annotations

import ctypes
import os

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune_malloc(arenas: int = 2, mmap_threshold: int = 256 << 10) -> bool:
    """Apply the settings (glibc only; elsewhere, or when the environment already sets
    them, nothing happens); True if applied."""
    if "MALLOC_ARENA_MAX" in os.environ or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_ARENA_MAX, arenas)) and bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold))
