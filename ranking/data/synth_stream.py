"""A synthetic click stream over an open item-id space: new items arrive every day.

For the managed-collision benchmark (``benchmarks/mc_stream.py``) and tests. Day ``d`` is a
Parquet file of ``rows_per_day`` rows with columns ``user``, ``item`` (string ids),
``hour`` (0-23), ``label`` (0/1):

- items: item ``i`` is born on day ``i // new_per_day - (catalogue // new_per_day - 1)``
  (the first ``catalogue`` items are live on day 0) and lives ``catalogue // new_per_day``
  days: every day ``new_per_day`` items arrive and as many retire, so day ``d``'s catalogue is
  the items ``[d * new_per_day, d * new_per_day + catalogue)``. Each item has a popularity rank
  drawn at birth (a random permutation of the catalogue's ranks), and a day's rows pick items
  by Zipf weights ``rank ** -zipf`` over the live catalogue: a few popular items and a long
  tail, with new items among the popular ones every day.
- users: ``users`` ids, Zipf(1.0) by id.
- label: ``Bernoulli(sigmoid(item_effect[i] + user_effect[u] + hour_effect[h] + bias))`` with
  ``item_effect ~ N(0, item_scale)``: most of the learnable signal is the item's own (a model
  must tell items apart to learn it: a table row shared by two items averages them).

Everything is a function of the seed: the same arguments give the same files.

Example::

    paths = write_stream("/tmp/stream", days=4, rows_per_day=50_000)
    # paths[d]: /tmp/stream/day=0/part-0.parquet ...
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_YAML = """\
name: {name}
hash_seed: 0
tasks:
  - {{name: click, label: label}}
groups: [user, item, context]
features:
  - {{name: user, kind: categorical, num_buckets: {user_rows}, dim: {dim}, group: user}}
  - {{name: item, kind: categorical, num_buckets: {item_rows}, dim: {dim}, group: item{collision}}}
  - {{name: hour, kind: categorical, num_buckets: 25, dim: {dim}, group: context}}
"""


def schema_yaml(
    item_rows: int,
    collision: dict | None = None,
    user_rows: int = 2048,
    dim: int = 16,
    name: str = "mc_stream",
) -> str:
    """The stream's schema as YAML: ``item`` plainly hashed into ``item_rows`` buckets, or with
    ``collision`` (e.g. ``{"kind": "managed", "policy": "lfu"}``) a managed table of as many
    rows."""
    coll = ""
    if collision:
        inner = ", ".join(f"{k}: {v}" for k, v in collision.items())
        coll = f",\n     collision: {{{inner}}}"
    return SCHEMA_YAML.format(
        name=name, user_rows=user_rows, item_rows=item_rows, dim=dim, collision=coll
    )


@dataclasses.dataclass(frozen=True)
class Stream:
    """The stream's parameters (see the module docstring)."""

    rows_per_day: int = 50_000
    catalogue: int = 20_000
    new_per_day: int = 5_000
    users: int = 2_000
    zipf: float = 1.05
    item_scale: float = 1.5
    seed: int = 0

    def __post_init__(self):
        if self.catalogue % self.new_per_day:
            raise ValueError(
                f"catalogue ({self.catalogue}) must be a multiple of new_per_day "
                f"({self.new_per_day})"
            )

    def _item_params(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """``(popularity rank in [1, catalogue], effect)`` of items ``[first, first + count)``,
        each a function of the seed and the item's birth cohort only."""
        ranks = np.empty(count, dtype=np.int64)
        effects = np.empty(count, dtype=np.float64)
        per = self.new_per_day
        for c in range(first // per, (first + count - 1) // per + 1):
            rng = np.random.default_rng([self.seed, 1, c])
            # a cohort takes every (catalogue / new_per_day)-th rank, offset at random, so
            # every day's catalogue holds each rank once
            slots = self.catalogue // per
            cr = rng.permutation(per) * slots + 1 + (c % slots)
            ce = rng.normal(0.0, self.item_scale, per)
            lo, hi = max(first, c * per), min(first + count, (c + 1) * per)
            ranks[lo - first : hi - first] = cr[lo - c * per : hi - c * per]
            effects[lo - first : hi - first] = ce[lo - c * per : hi - c * per]
        return ranks, effects

    def day(self, d: int) -> pa.Table:
        """Day ``d``'s rows."""
        rng = np.random.default_rng([self.seed, 2, d])
        first = d * self.new_per_day
        ranks, effects = self._item_params(first, self.catalogue)
        w = ranks.astype(np.float64) ** -self.zipf
        items = first + rng.choice(self.catalogue, size=self.rows_per_day, p=w / w.sum())
        item_eff = effects[items - first]
        uw = np.arange(1, self.users + 1, dtype=np.float64) ** -1.0
        users = rng.choice(self.users, size=self.rows_per_day, p=uw / uw.sum())
        urng = np.random.default_rng([self.seed, 3])
        user_eff = urng.normal(0.0, 0.5, self.users)[users]
        hours = rng.integers(0, 24, self.rows_per_day)
        hour_eff = 0.3 * np.sin(hours / 24 * 2 * math.pi)
        logit = item_eff + user_eff + hour_eff - 1.0
        labels = (rng.random(self.rows_per_day) < 1 / (1 + np.exp(-logit))).astype(np.int64)
        return pa.table(
            {
                "user": pa.array([f"u{u}" for u in users]),
                "item": pa.array([f"i{i}" for i in items]),
                "hour": pa.array(hours.astype(np.int64)),
                "label": pa.array(labels),
            }
        )


def write_stream(out: str | Path, days: int, **params) -> list[Path]:
    """Write days ``0 .. days - 1`` of ``Stream(**params)`` under ``out/day=<d>/part-0.parquet``;
    returns the files."""
    s = Stream(**params)
    out = Path(out)
    paths = []
    for d in range(days):
        p = out / f"day={d}" / "part-0.parquet"
        p.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(s.day(d), p)
        paths.append(p)
    return paths
