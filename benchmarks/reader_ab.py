"""Reader throughput of two source trees side by side: ``ParquetBatches`` rows/s (batch 4096,
shuffled, best of 3 passes after a warm-up, one thread) on Frappe and on synthetic Criteo and
MovieLens rows, the trees alternating in fresh processes, medians over ``--rounds``.

    git worktree add /tmp/old <commit>      # plus the built extensions (ranking/data/_fastrows*.so)
    mixrank data synth --preset criteo --rows 300000 --out /tmp/abdata/criteo
    mixrank data synth --preset movielens --rows 300000 --out /tmp/abdata/movielens
    python -m benchmarks.reader_ab --old /tmp/old --new . --data /tmp/abdata --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CODE = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from ranking.data.reader import ParquetBatches
from ranking.features import load_schema
out = {}
for name, path in json.loads(sys.argv[2]).items():
    ds = ParquetBatches(load_schema(name), path, 4096, seed=0)
    for _ in ds:
        pass
    best = float("inf")
    for r in range(3):
        ds.set_epoch(r + 1)
        t0, n = time.perf_counter(), 0
        for b in ds:
            n += b.size
        best = min(best, time.perf_counter() - t0)
    out[name] = n / best
print(json.dumps(out))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--old", required=True, help="source tree of the baseline")
    p.add_argument("--new", default=".", help="source tree measured against it")
    p.add_argument("--data", default="/tmp/abdata", help="holds criteo/ and movielens/")
    p.add_argument(
        "--frappe",
        default=str(Path(__file__).resolve().parents[2] / "shared/data/frappe/train.parquet"),
    )
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    sets = {"criteo": f"{args.data}/criteo", "movielens": f"{args.data}/movielens"}
    if Path(args.frappe).is_file():
        sets = {"frappe": args.frappe, **sets}
    res: dict[str, list[dict]] = {"old": [], "new": []}
    for _ in range(args.rounds):
        for tree, root in (("old", args.old), ("new", args.new)):
            out = subprocess.run(
                [sys.executable, "-c", CODE, str(Path(root).resolve()), json.dumps(sets)],
                capture_output=True,
                text=True,
                check=True,
                cwd="/tmp",
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            ).stdout
            res[tree].append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps({"tree": tree, **res[tree][-1]}), flush=True)
    print(f"{'data':<10} {'old rows/s':>12} {'new rows/s':>12} {'new/old':>8}")
    for name in sets:
        old = statistics.median(r[name] for r in res["old"])
        new = statistics.median(r[name] for r in res["new"])
        print(f"{name:<10} {old:>12,.0f} {new:>12,.0f} {new / old:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
