"""Memory of the embedding tables per rank: the sharding plan's estimate, and measured peak RSS.

``plan_memory(cfg, world)`` builds the model on the meta device (nothing allocated), asks the
same planner the trainer uses (``ranking.train.sharding.sharding_plan``) for a plan over
``world`` ranks, and sums, per rank, the bytes of the table shards it places there (fp32
weights) and of their fused optimiser state (rowwise Adagrad: one fp32 per row of the shard;
Adagrad: one per element; SGD: none); a data-parallel table counts whole on every rank, with
its dense optimiser's state (Adam/AdamW: two fp32 per weight). ``build_bytes`` is what the trainer allocates on every
rank before sharding: today it builds the whole model with real (not meta) tables and DMP then
copies each rank's shards out of it, so a rank's peak holds its shards plus every table whole.

``PeakRss`` samples the peak RSS (``VmHWM``) of a process tree's ranks (``RANK`` in their
environment) while a command runs.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

STATE_PER_ROW = {"rowwise_adagrad": "row", "adagrad": "element", "sgd": None}
# fp32 values of dense-optimiser state per weight (data-parallel tables are dense parameters)
DENSE_STATE = {"adamw": 2, "adam": 2, "adagrad": 1, "rmsprop": 1}


def plan_memory(cfg, world: int) -> dict:
    """Per-rank bytes of the plan of ``cfg`` over ``world`` CPU ranks (the trainer's planner and
    ``train.sharding``). Returns ``{"ranks": {rank: {"weights", "optimizer", "total"}},
    "tables": {name: {"rows", "dim", "bytes", "sharding", "ranks"}}, "build_bytes": ...,
    "plan": str}``. Starts (and ends) a one-process gloo group when none is up."""
    import torch
    import torch.distributed as dist
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    from ranking.model.ranker import build_model
    from ranking.train.distributed import _free_port
    from ranking.train.sharding import fused_params, sharding_plan

    started = False
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
        started = True
    try:
        model = build_model(cfg.model, cfg.schema, device="meta")
        fp = fused_params(cfg)
        sharders = [
            EmbeddingBagCollectionSharder(fused_params=fp),
            EmbeddingCollectionSharder(fused_params=fp),
        ]
        plan = sharding_plan(model, cfg, world, torch.device("cpu"), sharders)
    finally:
        if started:
            dist.destroy_process_group()
    specs = {t.name: t for t in cfg.schema.tables}
    state = STATE_PER_ROW[cfg.train.embedding_optimizer]
    dense_state = DENSE_STATE[cfg.train.dense_optimizer]
    ranks = {r: {"weights": 0, "optimizer": 0} for r in range(world)}
    tables = {}
    for module_plan in plan.plan.values():
        for name, ps in module_plan.items():
            t = specs[name]
            info = tables.setdefault(
                name,
                {"rows": t.num_buckets, "dim": t.dim, "bytes": 4 * t.num_buckets * t.dim},
            )
            info["sharding"] = ps.sharding_type
            if ps.sharding_type == "data_parallel":
                ranks_of = list(range(world))
                shards = [(r, t.num_buckets, t.dim) for r in ranks_of]
            else:
                shards = [
                    (int(str(s.placement).split("rank:")[1].split("/")[0]), *s.shard_sizes)
                    for s in ps.sharding_spec.shards
                ]
            info["ranks"] = sorted({r for r, _, _ in shards})
            for r, rows, cols in shards:
                ranks[r]["weights"] += 4 * rows * cols
                if ps.sharding_type == "data_parallel":  # the dense optimiser's state
                    ranks[r]["optimizer"] += 4 * rows * cols * dense_state
                elif state == "row":
                    ranks[r]["optimizer"] += 4 * rows
                elif state == "element":
                    ranks[r]["optimizer"] += 4 * rows * cols
    for v in ranks.values():
        v["total"] = v["weights"] + v["optimizer"]
    return {
        "ranks": ranks,
        "tables": tables,
        "build_bytes": sum(v["bytes"] for v in tables.values()),
        "plan": str(plan),
    }


def table_bytes_formula(rows: int, dim: int, optimizer: str = "rowwise_adagrad") -> int:
    """fp32 weights plus fused optimiser state of one ``rows`` x ``dim`` table, whole."""
    state = {"row": rows, "element": rows * dim, None: 0}[STATE_PER_ROW[optimizer]]
    return 4 * (rows * dim + state)


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for k in kids:
            out.append(int(k))
            todo.append(int(k))
    return out


def _status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for kv in env:
        if kv.startswith(b"RANK="):
            return int(kv[5:])
    return None


class PeakRss:
    """Polls a process tree (every ``every`` s) for the peak RSS of each rank's process (the
    largest ``VmHWM`` seen for a process whose environment sets ``RANK``); ``peak_mib`` maps
    rank -> MiB once stopped. ``peak_anon_mib``: the largest ``RssAnon`` polled (private
    memory; the kernel keeps no high-water mark of it, so a peak shorter than ``every`` can be
    missed): mapped file pages (a memory-mapped artifact being written or read) count in
    ``VmHWM`` but not here."""

    def __init__(self, pid: int, every: float = 0.25, any_process: bool = False):
        self.pid, self.every, self.any_process = pid, every, any_process
        self.peak_kib: dict[int, int] = {}
        self.peak_anon_kib: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        ranks: dict[int, int] = {}
        while not self._stop.is_set():
            if self.any_process:  # the process itself (key 0), whatever its environment
                self._poll(self.pid, 0)
            for p in [] if self.any_process else _descendants(self.pid):
                if p not in ranks:
                    r = _rank_of(p)
                    cmd = Path(f"/proc/{p}/cmdline").read_bytes() if r is not None else b""
                    if r is None or b"torch.distributed.run" in cmd:
                        continue
                    ranks[p] = r
                self._poll(p, ranks[p])
            time.sleep(self.every)

    def _poll(self, pid: int, key: int) -> None:
        for field_name, peaks in (("VmHWM", self.peak_kib), ("RssAnon", self.peak_anon_kib)):
            kib = _status_kib(pid, field_name)
            if kib is not None:
                peaks[key] = max(peaks.get(key, 0), kib)

    @property
    def peak_mib(self) -> dict[int, float]:
        return {r: v / 1024 for r, v in sorted(self.peak_kib.items())}

    @property
    def peak_anon_mib(self) -> dict[int, float]:
        return {r: v / 1024 for r, v in sorted(self.peak_anon_kib.items())}
