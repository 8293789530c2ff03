"""Process-level tuning of a serving replica.

``tune_allocator``: a Ray Serve replica runs the forward in a worker thread (user code runs off
the replica's main thread, and ``asyncio.to_thread`` moves the forward off the event loop).
glibc gives each thread its own malloc arena, and non-main arenas trim freed memory back to the
OS eagerly, so every forward page-faults its activations in again: on our CPU machines a
medium-model forward took 1.5-2x longer in a thread than on the main thread. One arena, a high
mmap threshold and no trimming keep the freed blocks for the next forward (measured: the gap
closes; docs/SERVING.md). No-op where glibc's ``mallopt`` is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune_allocator() -> bool:
    """Set glibc malloc to one arena, a 32 MiB mmap threshold (glibc's maximum) and a 1 GiB
    trim threshold, for the whole process. Returns whether every setting was applied."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 1 << 30))
    ok = all(mallopt(k, v) == 1 for k, v in settings)
    if not ok:
        log.warning("mallopt refused a setting: the forward may run slower in worker threads")
    return ok
