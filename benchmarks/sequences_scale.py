"""Time and peak memory of ``mixrank data sequences`` on a synthetic event log.

    python -m benchmarks.sequences_scale --events 2000000 --out /tmp/seqb

Writes ``--events`` events of ``events / 50`` users (string user and item ids, int64 times,
a 0/1 label and 20 float columns) into 4 files, then builds histories of at most
``--length`` with labels, and prints the seconds, events/s and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ranking.data.sequences import build_histories

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--events", type=int, default=2_000_000)
    p.add_argument("--length", type=int, default=50)
    p.add_argument("--out", default="/tmp/seqb")
    args = p.parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    (out / "in").mkdir(parents=True)
    rng = np.random.default_rng(0)
    n = args.events
    for k in range(4):
        m = n // 4
        t = pa.table(
            {
                "user": pa.array([f"u{x}" for x in rng.integers(0, max(1, n // 50), m)]),
                "item": pa.array([f"i{x}" for x in rng.integers(0, 100_000, m)]),
                "ts": rng.integers(0, 10**9, m),
                "click": rng.integers(0, 2, m).astype(np.int8),
                **{f"f{j}": rng.random(m) for j in range(20)},
            }
        )
        pq.write_table(t, out / "in" / f"part-{k}.parquet", row_group_size=262_144)
    del t
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    build_histories(
        [str(out / "in")],
        out / "out",
        user="user",
        item="item",
        time="ts",
        label="click",
        length=args.length,
        progress=False,
    )
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{n:,} events, length {args.length}: {dt:.1f} s, {n / dt:,.0f} events/s, "
        f"peak RSS {peak:.0f} MiB (after generating the data: {before:.0f} MiB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
