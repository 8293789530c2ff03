"""Managed-collision tables against plain hashing on an open id stream, day after day.

The stream (``ranking/data/synth_stream.py``): every day new items arrive and old ones retire;
a day has several times more distinct items than the item table has rows. For each method
(``hash``: the item's value hashed into ``--rows`` buckets; ``managed``: TorchRec's MCH module
over a 2**40 id space in front of a table of as many ``--rows``), and each day ``d`` of
``0 .. days - 2``: ``mixrank train`` (``configs/mc_stream.yaml``) on day ``d``, warm-started
from day ``d - 1``'s artifact (day 0 from scratch), then measured on the exported artifact:

- ``auc_next`` / ``logloss_next``: ``mixrank eval`` of the artifact on day ``d + 1`` (the
  serving path: the managed table's mapping is read only, a new id reads the reserved row);
- ``collision``: the fraction of the day's rows whose item shares its table row with another
  item of that day (the day's distinct items are the live ids). The row of an item is the
  hash bucket (``hash``) or the artifact's MCH mapping (``managed``: TorchRec's own remap in
  eval mode; the ids it does not hold all share the reserved row, so they count as colliding
  as soon as there are two). ``collision_train`` on day ``d`` (the rows trained on),
  ``collision_next`` on day ``d + 1`` (the rows scored, new items included);
- ``own_row_next``: the fraction of day ``d + 1``'s rows whose item has a row to itself.

Output: one JSON line per (method, day), then a table. Run it under the heavy-job lock::

    python -m benchmarks.mc_stream --days 4
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from benchmarks.common import emit, machine_info, table

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "mc_stream.yaml"


def rows_of(artifact: Path, ids) -> np.ndarray:
    """The table row of every item value in ``ids`` (a pyarrow array) under ``artifact``."""
    import torch
    from torchrec.sparse.jagged_tensor import JaggedTensor

    from ranking.data.hashing import hash_array
    from ranking.export import load_artifact
    from ranking.model.managed_collision import mch_modules

    art = load_artifact(artifact)
    f = art.schema.feature("item")
    hashed = hash_array(ids, f.num_buckets, art.schema.hash_seed)
    if f.collision is None:
        return hashed
    mch = mch_modules(art.model)["item"].eval()
    v = torch.from_numpy(hashed)
    jt = JaggedTensor(values=v, lengths=torch.ones_like(v))
    return mch.remap({"item": jt})["item"].values().numpy()


def collision_rate(items, rows: np.ndarray) -> float:
    """Fraction of rows whose item shares its row with another distinct item of ``items``."""
    _, first = np.unique(np.asarray(items), return_index=True)
    item_rows = rows[first]
    r, counts = np.unique(item_rows, return_counts=True)
    shared = set(r[counts > 1].tolist())
    inv = np.unique(np.asarray(items), return_inverse=True)[1]
    per_item = np.isin(item_rows, list(shared))
    return float(per_item[inv].mean())


def run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if rc:
        tail = log.read_text().splitlines()[-30:]
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}); {log}:\n" + "\n".join(tail))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--days", type=int, default=4, help="days of the stream (trains days-1)")
    p.add_argument("--rows-per-day", type=int, default=50_000)
    p.add_argument("--catalogue", type=int, default=20_000, help="live items on a day")
    p.add_argument("--new-per-day", type=int, default=5_000)
    p.add_argument("--rows", type=int, default=2048, help="item table rows (both methods)")
    p.add_argument("--policy", default="lfu", help="managed: lfu | distance_lfu | lru")
    p.add_argument("--eviction-interval", type=int, default=8)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--methods", default="hash,managed")
    p.add_argument("--out", default=None, help="work directory (default: a temporary one)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    from ranking.data.synth_stream import schema_yaml, write_stream

    out = Path(a.out or tempfile.mkdtemp(prefix="mc-stream-"))
    out.mkdir(parents=True, exist_ok=True)
    files = write_stream(
        out / "data",
        a.days,
        rows_per_day=a.rows_per_day,
        catalogue=a.catalogue,
        new_per_day=a.new_per_day,
        seed=a.seed,
    )
    emit({"bench": "mc_stream", **machine_info(), **vars(a), "out": str(out)}, sys.stderr)
    records = []
    mixrank = str(Path(sys.executable).parent / "mixrank")
    started = time.perf_counter()
    methods = a.methods.split(",")
    total = len(methods) * (a.days - 1)
    done = 0
    for method in methods:
        coll = None
        if method == "managed":
            coll = {
                "kind": "managed",
                "policy": a.policy,
                "eviction_interval": a.eviction_interval,
            }
        schema = out / f"{method}.yaml"
        schema.write_text(schema_yaml(a.rows, coll, name=f"mc_stream_{method}"))
        prev = None
        for d in range(a.days - 1):
            run_dir = out / method / f"day={d}"
            shutil.rmtree(run_dir, ignore_errors=True)
            cmd = [
                mixrank, "train", "--config", str(CONFIG), "--nproc", str(a.nproc),
                "--run-dir", str(run_dir), f"schema={schema}",
                f"data.train={files[d]}", f"data.valid={files[d + 1]}",
                f"train.seed={a.seed}",
            ]  # fmt: skip
            if prev is not None:
                cmd += ["--warm-start", str(prev)]
            t0 = time.perf_counter()
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            run(cmd, out / f"{method}-day{d}.log")
            train_s = time.perf_counter() - t0
            art = run_dir / "artifact"
            ev = subprocess.run(
                [mixrank, "eval", "--artifact", str(art), "--data", str(files[d + 1])],
                capture_output=True, text=True, cwd=REPO, check=True,
            )  # fmt: skip
            metrics = json.loads(ev.stdout.strip().splitlines()[-1])
            today = pq.read_table(files[d], columns=["item"]).column("item")
            nxt = pq.read_table(files[d + 1], columns=["item"]).column("item")
            c_train = collision_rate(today.to_numpy(), rows_of(art, today))
            next_rows = rows_of(art, nxt)
            c_next = collision_rate(nxt.to_numpy(), next_rows)
            rec = {
                "method": method,
                "day": d,
                "table_rows": a.rows,
                "items_today": len(np.unique(today.to_numpy())),
                "items_next": len(np.unique(nxt.to_numpy())),
                "collision_train": round(c_train, 4),
                "collision_next": round(c_next, 4),
                "own_row_next": round(1 - c_next, 4),
                "auc_next": round(metrics["auc"], 5),
                "logloss_next": round(metrics["logloss"], 5),
                "train_s": round(train_s, 1),
                "warm_start": bool(prev),
            }
            emit(rec)
            records.append(rec)
            prev = art
            done += 1
            el = time.perf_counter() - started
            print(
                f"[mc_stream] {done}/{total} runs, {el:.0f} s, ETA {el / done * (total - done):.0f} s",
                file=sys.stderr,
                flush=True,
            )
    table(
        records,
        ["method", "day", "items_today", "table_rows", "collision_train", "collision_next",
         "auc_next", "logloss_next", "train_s"],
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
