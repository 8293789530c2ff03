"""``serving.runtime.tune_allocator``: the glibc settings a replica runs with keep freed blocks
for the next forward instead of mapping them afresh (page faults), also at int8's 32 MiB
intermediates. Run in child processes: the settings are process-wide."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(
    """
    import resource, sys
    import torch
    from serving.runtime import tune_allocator

    applied = tune_allocator() if sys.argv[1] == "on" else None
    faults = []
    for _ in range(10):  # a forward's pattern: 32, 16 and 64 MiB intermediates, then freed
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a, b, c = torch.ones(8 << 20), torch.ones(4 << 20), torch.ones(16 << 20)
        del a, b, c
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print(applied, *faults)
    """
)
PAGES = (112 << 20) // 4096  # the three tensors' pages


def _faults(mode: str) -> tuple[str, list[int]]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], [int(v) for v in out[1:]]


def test_replica_allocator_keeps_a_forwards_blocks():
    """glibc's defaults map every block of 32 MiB or more afresh (its dynamic mmap threshold
    stops just below) and trim the rest: every "forward" faults nearly all of its 112 MiB in
    again. With the replica's settings (256 MiB threshold, no trimming, one arena) the freed
    blocks are reused: after a few forwards none faults."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt: Linux only")
    applied, tuned = _faults("on")
    _, default = _faults("off")
    if applied != "True":
        pytest.skip("this libc refused a setting (not glibc?)")
    assert min(default[1:]) >= PAGES * 0.5, default
    assert sum(tuned[-4:]) < PAGES * 0.05, tuned
