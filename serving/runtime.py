"""Process-level tuning of a serving replica.

``tune_allocator``: a Ray Serve replica runs the forward in a worker thread (user code runs off
the replica's main thread, and ``asyncio.to_thread`` moves the forward off the event loop).
glibc gives each thread its own malloc arena, and non-main arenas trim freed memory back to the
OS eagerly, so every forward page-faults its activations in again: on our CPU machines a
medium-model forward took 1.5-2x longer in a thread than on the main thread. One arena, a high
mmap threshold and no trimming keep the freed blocks for the next forward (measured: the gap
closes; docs/SERVING.md). The mmap threshold is 256 MiB where glibc takes it (else 32 MiB,
the old ceiling): glibc maps every block at or above the threshold afresh and unmaps it on
free, and an int8 forward's fp32 intermediates reach 32 MiB ([16 tokens, 256 rows, 2048] for
TokenMixer-Large medium's gate / up): at 32 MiB it took 11-46k page faults per 1,024-row forward,
at 256 MiB 0.7-2.9k, and ran 4-36% faster (docs/BENCHMARKS.md, "Int8 dense inference").
``mixrank bench model`` / ``bench int8`` apply it too, so they time the process a replica runs.
No-op where glibc's ``mallopt`` is absent.
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
    """Set glibc malloc to one arena, a 256 MiB mmap threshold (32 MiB where glibc refuses
    more) and a 1 GiB trim threshold, for the whole process. Returns whether every setting was
    applied."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mmap_ok = (
        mallopt(_M_MMAP_THRESHOLD, 256 << 20) == 1 or mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1
    )
    settings = ((_M_ARENA_MAX, 1), (_M_TRIM_THRESHOLD, 1 << 30))
    ok = all(mallopt(k, v) == 1 for k, v in settings) and mmap_ok
    if not ok:
        log.warning("mallopt refused a setting: the forward may run slower in worker threads")
    return ok
