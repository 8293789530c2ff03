"""Streaming, sharded, shuffled Parquet reader yielding ``Batch`` objects.

Units of work: every Parquet row group is cut into slices of at most ``unit_rows`` rows; a unit
is ``(file, row group, start, stop)``. Per epoch the global unit list is ordered (row groups
shuffled by ``(seed, epoch)``, the slices of each row group shuffled among themselves, so that a
shard reads each row group at most once per epoch), then unit ``k`` goes to shard
``k % num_shards``, with ``shard = rank * num_workers + worker_id``. So every row is read exactly
once per epoch over all ranks and DataLoader workers, and shards are disjoint.

Within a shard, rows pass through a bounded shuffle buffer: each unit's rows join the buffer, the
buffer is permuted, and full batches are cut from it until ``shuffle_buffer // 2`` rows remain.
Memory is bounded by one row group plus the buffer, whatever the data set size.

Position: a shard's stream is a deterministic function of ``(seed, epoch, shard)`` and the file
metadata, so ``skip_batches`` resumes exactly: the shuffle is replayed on row ids only (no data
is read for skipped units), then only the units still holding buffered rows are read.
"""

from __future__ import annotations

import datetime as _dt
import glob as globlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from torch.utils.data import IterableDataset, get_worker_info

from ranking.data.convert import (
    ON_BAD_ROWS,
    FeatureColumns,
    RowChecks,
    columns_from_arrow,
    to_batch,
    type_problem,
)
from ranking.data.errors import DataError
from ranking.features import FeatureSchema


@dataclass(frozen=True)
class Unit:
    """Rows ``[start, stop)`` of row group ``row_group`` of ``path``; ``first_row``: the row
    of the file that row group starts at (for error messages)."""

    path: str
    row_group: int
    start: int
    stop: int
    first_row: int = 0

    @property
    def rows(self) -> int:
        return self.stop - self.start


def resolve_files(path: str | Path | list, since: str = "", until: str = "") -> list[str]:
    """A file, a directory (``*.parquet`` below it) or a glob -> sorted list of Parquet files.

    ``since`` / ``until`` (``YYYY-MM-DD``, inclusive, either may be empty) take only the files
    of the directory's date partitions in that range (:func:`select_partitions`); without them
    a partitioned directory is read whole, like any directory."""
    if since or until:
        parts = select_partitions(path, since, until)
        files = sorted(str(f) for p in parts for f in p.rglob("*.parquet") if f.is_file())
        if not files:
            names = ", ".join(p.name for p in parts)
            raise DataError(f"{path}: the selected partitions ({names}) hold no *.parquet files")
        return files
    if isinstance(path, list | tuple):
        return sorted({f for p in path for f in resolve_files(p)})
    s = str(path)
    if any(c in s for c in "*?["):
        files = sorted(f for f in globlib.glob(s, recursive=True) if os.path.isfile(f))
        if not files:
            raise DataError(f"{s}: no files match this pattern")
        return files
    p = Path(s)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*.parquet") if f.is_file())
        if not files:
            raise DataError(f"{s}: directory holds no *.parquet files")
        return files
    if not p.exists():
        raise DataError(f"{s}: no such file or directory")
    return [str(p)]


# Date partitions: ``DIR/dt=YYYY-MM-DD/...`` (Hive style, as Spark and the request logs write
# them). They are selected by directory name rather than through pyarrow.dataset's partitioning
# and filters: the reader's units are (file, row group) slices from each file's footer, sharded
# and shuffled as a function of the sorted file list, so a dataset would only list the files,
# and by another rule (every file not starting with "_" or ".", where the reader takes
# *.parquet). By name, partitioned and plain directories keep one listing rule.
PARTITION_KEY = "dt"
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def parse_date(value: str) -> _dt.date | None:
    """``YYYY-MM-DD`` -> date; None for anything else (``2024-1-5``, ``2024-02-30``)."""
    if not isinstance(value, str) or not _DATE.match(value):
        return None
    try:
        return _dt.date.fromisoformat(value)
    except ValueError:
        return None


def date_partitions(directory: str | Path) -> dict[str, Path]:
    """The ``dt=YYYY-MM-DD`` sub-directories of ``directory``, ``{date: path}`` in date order
    (empty when it has none, or is not a directory). A ``dt=`` directory whose name is not a
    date is a ``DataError`` naming it: it could not be ordered against ``since``/``until``."""
    d = Path(directory)
    if not d.is_dir():
        return {}
    out = {}
    for p in d.iterdir():
        key, sep, value = p.name.partition("=")
        if not sep or key != PARTITION_KEY or not p.is_dir():
            continue
        if parse_date(value) is None:
            raise DataError(f"{p}: not a {PARTITION_KEY}=YYYY-MM-DD partition directory")
        out[value] = p
    return dict(sorted(out.items()))


def select_partitions(directory: str | Path, since: str = "", until: str = "") -> list[Path]:
    """The date partitions of ``directory`` with ``since <= dt <= until`` (ISO dates compare as
    strings; an empty bound is open). ``DataError`` when it has no partitions or none is in the
    range, naming the directory and the partitions it holds."""
    if isinstance(directory, list | tuple) or any(c in str(directory) for c in "*?["):
        raise DataError(f"{directory}: since/until select the dt= partitions of one directory")
    for name, value in (("since", since), ("until", until)):
        if value and parse_date(value) is None:
            raise DataError(f"{name}: expected a date YYYY-MM-DD, got {value!r}")
    parts = date_partitions(directory)
    if not parts:
        raise DataError(
            f"{directory}: no {PARTITION_KEY}=YYYY-MM-DD partition directories to select from"
        )
    chosen = [
        p for d, p in parts.items() if (not since or d >= since) and (not until or d <= until)
    ]
    if not chosen:
        first, last = next(iter(parts)), next(reversed(parts))
        raise DataError(
            f"{directory}: no partition from {since or '(any)'} to {until or '(any)'} (it holds "
            f"{len(parts)}, {PARTITION_KEY}={first} .. {PARTITION_KEY}={last})"
        )
    return chosen


def partition_dates(files: list[str], root: str | Path) -> list[str]:
    """The dates of the ``dt=`` partitions directly under ``root`` that ``files`` lie in (or
    ``root``'s own date, where it is one partition)."""
    base = Path(root)
    key, sep, value = base.name.partition("=")
    if sep and key == PARTITION_KEY and parse_date(value) is not None:
        return [value]
    out = set()
    for f in files:
        try:
            first = Path(f).relative_to(base).parts[0]
        except (ValueError, IndexError):
            continue
        key, sep, value = first.partition("=")
        if sep and key == PARTITION_KEY and parse_date(value) is not None:
            out.add(value)
    return sorted(out)


def open_error(path: str, e: Exception, what: str = "not a readable Parquet file") -> DataError:
    """The ``DataError`` for a file that cannot be opened or read: a missing file says so (a
    data file deleted or moved while a job runs), anything else gives Arrow's reason."""
    if isinstance(e, FileNotFoundError) or (
        isinstance(e, OSError) and getattr(e, "errno", None) == 2
    ):
        return DataError(f"{path}: no such file (deleted or moved after the data set was listed)")
    if isinstance(e, PermissionError):
        return DataError(f"{path}: permission denied")
    return DataError(f"{path}: {what}: {e}")


def list_units(files: list[str], unit_rows: int) -> list[Unit]:
    """All units of the data set, in file / row-group order (reads only the footers)."""
    import pyarrow.parquet as pq

    units = []
    for f in files:
        try:
            meta = pq.ParquetFile(f).metadata
            row_groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        except (pa.ArrowInvalid, OSError) as e:
            raise open_error(f, e) from None
        first = 0
        for rg, n in enumerate(row_groups):
            for start in range(0, n, unit_rows):
                units.append(Unit(f, rg, start, min(n, start + unit_rows), first))
            first += n
    return units


def epoch_order(units: list[Unit], seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Global unit order of one epoch: row groups shuffled, slices shuffled within each."""
    if not shuffle:
        return list(range(len(units)))
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    groups: dict[tuple[str, int], list[int]] = {}
    for i, u in enumerate(units):
        groups.setdefault((u.path, u.row_group), []).append(i)
    keys = list(groups)
    order = []
    for gi in rng.permutation(len(keys)):
        members = groups[keys[gi]]
        order.extend(members[j] for j in rng.permutation(len(members)))
    return order


def _footer_nulls(meta, column: str) -> int:
    """Null count of a top-level column over all row groups, from the footer's statistics
    (0 where a row group records none: the rows are checked again when read)."""
    idx = [i for i in range(meta.num_columns) if meta.schema.column(i).path == column]
    total = 0
    for rg in range(meta.num_row_groups):
        for i in idx:
            stats = meta.row_group(rg).column(i).statistics
            if stats is not None and stats.has_null_count:
                total += stats.null_count
    return total


class EncodedCache:
    """Units already read and converted, kept across epochs up to ``max_bytes`` (the trainer
    holds one per run and hands it to each epoch's reader): from the second epoch on, a cached
    unit skips the Parquet read, the hashing or vocabulary lookup and the checks. What a unit
    converts to does not depend on the epoch, so the batches, their order and the bad-row
    counts are the same with or without it (and so is resuming). Units are added while they
    fit; the rest are read again each epoch.

    Example::

        cache = EncodedCache(1 << 30)
        for epoch in range(3):
            reader = ParquetBatches(schema, files, 1024, cache=cache)
            reader.set_epoch(epoch)
            for batch in reader: ...
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = self.misses = 0
        self._units: dict[tuple, tuple[FeatureColumns, dict[str, str]]] = {}

    def get(self, key: tuple):
        hit = self._units.get(key)
        if hit is None:
            self.misses += 1
        else:
            self.hits += 1
        return hit

    def put(self, key: tuple, cols: FeatureColumns, examples: dict[str, str]) -> None:
        size = cols.nbytes
        if key in self._units or self.bytes + size > self.max_bytes:
            return
        self._units[key] = (cols, dict(examples))
        self.bytes += size

    def __len__(self) -> int:
        return len(self._units)


class ParquetBatches(IterableDataset):
    """An ``IterableDataset`` of ``Batch`` over Parquet files, sharded by rank and worker.

    Use with ``DataLoader(ds, batch_size=None, num_workers=N)`` or iterate directly.

    Args:
        schema: the feature schema (columns read: ``schema.columns``).
        path: a file, directory or glob (or a list of them).
        batch_size: rows per batch.
        rank, world_size: this process's data-parallel shard (default: from torch.distributed
            when initialised, else 0 / 1).
        shuffle: shuffle units and rows (by ``seed`` and the epoch); False keeps file order.
        seed: the shuffle seed.
        drop_last: drop each shard's final partial batch.
        unit_rows: rows per unit of work (a row-group slice).
        shuffle_buffer: rows in the shuffle buffer.
        with_labels: read the label columns (False: zeros, for unlabeled data).
        on_bad_rows: ``fail`` (the first bad row raises a ``DataError`` naming file, row group,
            row and column) or ``skip`` (bad rows are dropped from the batches; each batch
            carries ``bad_rows``, the count per cause, and ``bad_examples``, the first message
            of each cause this reader met).
        max_list_items: an id list longer than this is a bad row (None: no limit; lists are
            truncated to ``schema.max_list_length`` either way).
        cache: an ``EncodedCache`` shared by the readers of several epochs (None: none).
    """

    def __init__(
        self,
        schema: FeatureSchema,
        path: str | Path | list,
        batch_size: int,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        unit_rows: int = 65536,
        shuffle_buffer: int = 65536,
        with_labels: bool = True,
        on_bad_rows: str = "fail",
        max_list_items: int | None = None,
        cache: EncodedCache | None = None,
    ):
        if batch_size < 1 or unit_rows < 1:
            raise ValueError("batch_size and unit_rows must be positive")
        if on_bad_rows not in ON_BAD_ROWS:
            raise ValueError(f"on_bad_rows: expected one of {ON_BAD_ROWS}, got {on_bad_rows!r}")
        self.on_bad_rows = on_bad_rows
        self.max_list_items = max_list_items
        self.encoded = cache
        self.bad_examples: dict[str, str] = {}
        self.schema = schema
        self.files = resolve_files(path)
        self.batch_size = batch_size
        self.rank, self.world_size = _rank_world(rank, world_size)
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.shuffle_buffer = shuffle_buffer if shuffle else 0
        self.with_labels = with_labels
        self.units = list_units(self.files, unit_rows)
        self.num_rows = sum(u.rows for u in self.units)
        if self.num_rows == 0:
            raise DataError(f"{_describe(path)}: the data set has no rows")
        self._check_columns()
        self.epoch = 0
        self._skip = 0
        self.batches_yielded = 0  # in this process's shard, this epoch (num_workers=0)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (reshuffles); resets any ``skip_batches``."""
        self.epoch = epoch
        self._skip = 0
        self.batches_yielded = 0

    def skip_batches(self, n: int) -> None:
        """Resume: the next iteration of this epoch starts after ``n`` batches of this rank.

        ``n`` counts batches as a DataLoader delivers them: round-robin over its workers, and
        over the workers still holding data once some have run out (:func:`worker_skips`).
        """
        self._skip = n

    def state_dict(self) -> dict[str, Any]:
        """Position for checkpoints: ``{"epoch", "batches"}`` (batches of this rank)."""
        return {"epoch": self.epoch, "batches": self.batches_yielded + self._skip}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.set_epoch(int(state["epoch"]))
        self.skip_batches(int(state["batches"]))

    def shard_units(self, shard: int, num_shards: int) -> list[Unit]:
        """Units of one shard for the current epoch, in reading order."""
        order = epoch_order(self.units, self.seed, self.epoch, self.shuffle)
        return [self.units[i] for i in order[shard::num_shards]]

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        num_shards = self.world_size * nw
        skip = 0
        if self._skip:  # resuming: this worker continues the shard whose turn is wid-th
            counts = [self._shard_batches(self.rank, w, nw) for w in range(nw)]
            taken, order = resume_plan(counts, self._skip)
            if wid >= len(order):
                return  # fewer shards than workers still hold data this epoch
            wid, skip = order[wid], taken[order[wid]]
        shard = self.shard_index(self.rank, wid, nw)
        units = self.shard_units(shard, num_shards)
        rng = np.random.default_rng([self.seed, self.epoch, shard, 0xB0F])
        self._cache = None  # the last row group read is kept only within one pass
        for cols in iter_shard(
            units, self._read, self.batch_size, self.shuffle_buffer, rng, self.drop_last, skip
        ):
            self.batches_yielded += 1
            cols, dropped = cols.drop_bad()
            if dropped and len(cols) == 0:
                raise DataError(
                    f"every row of a batch is bad ({_counts(dropped)}); first: "
                    f"{next(iter(self.bad_examples.values()))}"
                )
            batch = to_batch(self.schema, cols)
            if self.on_bad_rows == "skip":
                batch.bad_rows = dropped
                batch.bad_examples = dict(self.bad_examples) if dropped else {}
            yield batch
        self._cache = None

    def shard_index(self, rank: int, worker: int, num_workers: int) -> int:
        """The shard that loader worker ``worker`` of rank ``rank`` reads, of
        ``world_size * num_workers``."""
        return rank * num_workers + worker

    def _shard_batches(self, rank: int, worker: int, num_workers: int) -> int:
        """Batches one loader worker of ``rank`` yields in the current epoch (``iter_shard`` cuts
        every full batch of its rows, and the rest as one more unless ``drop_last``)."""
        shard = self.shard_index(rank, worker, num_workers)
        rows = sum(u.rows for u in self.shard_units(shard, self.world_size * num_workers))
        full, rest = divmod(rows, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def rank_batches(self, rank: int, num_workers: int = 0) -> int:
        """Batches rank ``rank`` gets in the current epoch through a DataLoader with
        ``num_workers`` workers (0: read in the training process)."""
        nw = max(1, num_workers)
        return sum(self._shard_batches(rank, w, nw) for w in range(nw))

    def rank_rows(self) -> int:
        """Rows this rank reads in the current epoch (over all its DataLoader workers)."""
        return sum(u.rows for u in self.shard_units(self.rank, self.world_size))

    # ------------------------------------------------------------------ reading
    def _check_columns(self) -> None:
        """Every file's footer against the schema, before any row is read (``mixrank train``
        runs this before spawning): the columns are there, their types are ones the
        conversion takes (``convert.type_problem``), and no label column has nulls by the
        footer's statistics. ``DataError`` naming the file and the column."""
        import pyarrow.parquet as pq

        kinds = {f.column: (f.kind, f"{f.kind} feature {f.name!r} ") for f in self.schema.features}
        if self.with_labels:
            kinds.update({c: ("label", "") for c in self.schema.label_columns})
        self.empty_files = []
        for f in self.files:
            try:
                pf = pq.ParquetFile(f)
                meta, arrow = pf.metadata, pf.schema_arrow
            except (pa.ArrowInvalid, OSError) as e:
                raise open_error(f, e) from None
            if meta.num_rows == 0:
                self.empty_files.append(f)  # as Spark writes for an empty partition: no rows
                continue
            names = arrow.names
            for c, (kind, what) in kinds.items():
                if c not in names:
                    raise DataError(f"{f}: column {c!r}: missing (the file has {names})")
                problem = type_problem(kind, arrow.field(c).type)
                if problem:
                    raise DataError(f"{f}: column {c!r}: {what}{problem}")
            for c in (c for c, (kind, _) in kinds.items() if kind == "label"):
                nulls = _footer_nulls(meta, c)
                if nulls:
                    raise DataError(
                        f"{f}: column {c!r}: label has {nulls} null(s) by the file's column "
                        f"statistics, expected 0 or 1 in every row"
                    )

    _cache: tuple[tuple[str, int], pa.Table] | None = None

    def _read(self, unit: Unit) -> FeatureColumns:
        """One unit's rows, converted. Keeps the last row group read (units of one row group
        come one after another)."""
        import pyarrow.parquet as pq

        ukey = (unit.path, unit.row_group, unit.start, unit.rows, self.with_labels)
        hit = self.encoded.get(ukey) if self.encoded is not None else None
        if hit is not None:
            cols, examples = hit
            for cause, msg in examples.items():
                self.bad_examples.setdefault(cause, msg)
            return cols
        key = (unit.path, unit.row_group)
        if self._cache is None or self._cache[0] != key:
            self._cache = None
            try:
                table = pq.ParquetFile(unit.path).read_row_group(
                    unit.row_group, columns=self._columns()
                )
            except (pa.ArrowInvalid, OSError) as e:
                raise open_error(unit.path, e, f"cannot read row group {unit.row_group}") from None
            self._cache = (key, table)
        table = self._cache[1].slice(unit.start, unit.rows)
        source = f"{unit.path}: row group {unit.row_group}"
        checks = RowChecks(
            source,
            unit.rows,
            row_offset=unit.first_row + unit.start,
            on_bad_rows=self.on_bad_rows,
            utf8=True,
            max_list_items=self.max_list_items,
        )
        cols = columns_from_arrow(
            self.schema, table, source=source, with_labels=self.with_labels, checks=checks
        )
        for cause, msg in checks.examples.items():
            self.bad_examples.setdefault(cause, msg)
        if self.encoded is not None:
            self.encoded.put(ukey, cols, checks.examples)
        return cols

    def _columns(self) -> list[str]:
        cols = [f.column for f in self.schema.features]
        cols += self.schema.label_columns if self.with_labels else []
        return list(dict.fromkeys(cols))

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_cache", None)
        state["encoded"] = None  # a loader worker starts without the training process's cache
        return state


def resume_plan(counts: list[int], n: int) -> tuple[list[int], list[int]]:
    """Where each DataLoader worker stands after the first ``n`` batches of an epoch.

    Worker ``w`` yields ``counts[w]`` batches; a DataLoader over an iterable dataset takes one
    from each worker in turn, passing over the workers that have run out. Returns ``(taken,
    order)``: how many batches each worker had delivered, and the workers that still hold data
    in the order the next batches come from them. A resumed DataLoader starts again at its worker
    0, so its worker ``i`` must continue worker ``order[i]``'s shard (a rotation keeps the
    round-robin, also as more workers run out).

    >>> resume_plan([3, 1, 3], 5)  # w0 w1 w2 w0 w2 | w0 w2
    ([2, 1, 2], [0, 2])
    >>> resume_plan([2, 2, 2], 4)  # w0 w1 w2 w0 | w1 w2
    ([2, 1, 1], [1, 2])
    """
    nw = len(counts)
    taken = [0] * nw
    last = nw - 1  # the worker that delivered the last batch: the next turn is after it
    while n > 0:
        active = [w for w in range(nw) if taken[w] < counts[w]]
        if not active:
            break
        # whole rounds over the same active set; a round starts after `last`
        first = [w for w in active if w > last] + [w for w in active if w <= last]
        rounds = min(n // len(active), min(counts[w] - taken[w] for w in active))
        if rounds == 0:  # part of a round
            for w in first[:n]:
                taken[w] += 1
            last = first[n - 1]
            break
        for w in active:
            taken[w] += rounds
        n -= rounds * len(active)
        last = first[-1]
    order = [(last + 1 + i) % nw for i in range(nw)]
    return taken, [w for w in order if taken[w] < counts[w]]


def iter_shard(units, read, batch_size, buffer_rows, rng, drop_last, skip=0):
    """Shuffle-buffer batching over one shard's units -> ``FeatureColumns`` of ``batch_size`` rows.

    The buffer is tracked as stream row ids (row r of unit u is ``offset[u] + r``), so the first
    ``skip`` batches are replayed without reading data; only the units still holding buffered
    rows when the skip ends are read.
    """
    sizes = np.array([u.rows for u in units], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    ids = np.zeros(0, dtype=np.int64)
    data: FeatureColumns | None = None
    emitted = 0
    for ui, unit in enumerate(units):
        last = ui == len(units) - 1
        new_ids = np.arange(offsets[ui], offsets[ui + 1], dtype=np.int64)
        ids = np.concatenate([ids, new_ids])
        if emitted >= skip:
            data = _materialize(units, offsets, ids[: len(ids) - len(new_ids)], data, read)
            data = (
                read(unit)
                if data is None or len(data) == 0
                else FeatureColumns.concat([data, read(unit)])
            )
        if len(ids) < buffer_rows and not last:
            continue
        if buffer_rows:
            perm = rng.permutation(len(ids))
            ids = ids[perm]
            if data is not None:
                data = data.take(perm)
        keep = 0 if last else buffer_rows // 2
        count = max(0, (len(ids) - keep) // batch_size)
        if count == 0:
            continue
        first = max(0, min(count, skip - emitted))  # batches of this round still to skip
        if first < count:
            data = _materialize(units, offsets, ids, data, read)
            if first:
                data = data.split(batch_size * first, 1)[1]
            batches, data = data.split(batch_size, count - first)
            yield from batches
        ids = ids[count * batch_size :]
        emitted += count
    if len(ids) and not drop_last and emitted >= skip:
        data = _materialize(units, offsets, ids, data, read)
        yield data


def _materialize(units, offsets, ids, data, read):
    """The data of buffered row ids: ``data`` when present, else read back from their units."""
    if data is not None or len(ids) == 0:
        return data
    which = np.searchsorted(offsets, ids, side="right") - 1
    needed = np.unique(which)
    parts = [read(units[u]) for u in needed]
    base = np.concatenate([[0], np.cumsum([len(p) for p in parts])])
    pos = {int(u): int(b) for u, b in zip(needed, base[:-1])}
    local = ids - offsets[which] + np.array([pos[int(u)] for u in which], dtype=np.int64)
    return FeatureColumns.concat(parts).take(local)


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
    rank, world_size = rank or 0, world_size or 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    return rank, world_size


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{c} {n}" for c, n in counts.items())


def _describe(path) -> str:
    return ", ".join(map(str, path)) if isinstance(path, list | tuple) else str(path)
