"""Point-in-time behaviour histories from an event log: ``mixrank data sequences``.

Every input (files, directories, globs) is read as one event log: the rows of all of them are
events ``(user, item, time[, label])``. For each event, ``{item}_hist`` lists the items of the
same user's events with a *strictly earlier* time, most recent first, at most ``length`` of them;
with a label column, ``{item}_hist_pos`` / ``{item}_hist_neg`` are the same restricted to events
labelled 1 / 0. So events with equal timestamps never see each other, and no row sees its own
label or anything later: a training row's history is what serving would have known when the
event happened.

Order among earlier events with equal timestamps: the order of the inputs as given, then the
rows' order in each file (later counts as more recent). Events without an item are in no
history (they still get their own); events without a user get empty histories; an event
without a time is an error naming the file and row.

Memory: the pass that orders the events holds only the user, item, time and label columns of
all inputs and a few integers per event; each input is then rewritten one row group at a time,
with all its columns and that row group's histories (made only then), to ``DIR`` under its own
file name (a directory input under its folder's name), written whole then renamed.
"""

from __future__ import annotations

import os
import sys
import time as timelib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ranking.data.errors import DataError


def output_paths(inputs: list[str], out: Path) -> list[tuple[str, Path]]:
    """``(input file, output file)`` for every Parquet file of ``inputs``: a file (or a glob's
    match) keeps its name; a directory's files keep their path under the directory's name."""
    from ranking.data.reader import resolve_files

    pairs: list[tuple[str, Path]] = []
    for inp in inputs:
        p = Path(inp)
        if p.is_dir():
            for f in resolve_files(inp):
                pairs.append(
                    (f, out / p.resolve().name / Path(f).resolve().relative_to(p.resolve()))
                )
        else:
            pairs.extend((f, out / Path(f).name) for f in resolve_files(inp))
    seen: dict[Path, str] = {}
    for f, o in pairs:
        if o in seen and seen[o] != f:
            raise DataError(f"{f}: would be written to {o}, as {seen[o]} is; give distinct names")
        seen[o] = f
    return list(dict.fromkeys(pairs))


def _events(files: list[str], user: str, item: str, time: str, label: str | None):
    """The event columns of every file, concatenated in file and row order, and each file's
    first row in that concatenation (``offsets``, one more than files)."""
    import pyarrow.parquet as pq

    cols = [user, item, time] + ([label] if label else [])
    parts, offsets = [], [0]
    for f in files:
        try:
            names = pq.read_schema(f).names
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{f}: not a readable Parquet file: {e}") from None
        for c in cols:
            if c not in names:
                raise DataError(f"{f}: column {c!r}: missing (the file has {names})")
        t = pq.read_table(f, columns=cols)
        _check_types(f, t, user, item, time, label)
        nulls = t.column(time).null_count
        if nulls:
            row = int(pc.index(pc.is_null(t.column(time)), True).as_py())
            raise DataError(f"{f}: column {time!r}: time is null at row {row}")
        parts.append(t.replace_schema_metadata(None))
        offsets.append(offsets[-1] + t.num_rows)
    try:
        table = pa.concat_tables(parts, promote_options="permissive")
    except pa.ArrowInvalid as e:  # e.g. a string user column in one file, integers in another
        raise DataError(
            f"{', '.join(files)}: the files' event columns differ in type: {e}"
        ) from None
    return table, np.asarray(offsets, dtype=np.int64)


def _check_types(f: str, t: pa.Table, user: str, item: str, time: str, label: str | None) -> None:
    def ok_id(tp):
        return pa.types.is_integer(tp) or pa.types.is_string(tp) or pa.types.is_large_string(tp)

    for c in (user, item):
        if not ok_id(t.schema.field(c).type):
            raise DataError(
                f"{f}: column {c!r}: has type {t.schema.field(c).type}, expected strings or integers"
            )
    tt = t.schema.field(time).type
    if not (pa.types.is_integer(tt) or pa.types.is_floating(tt) or pa.types.is_timestamp(tt)):
        raise DataError(f"{f}: column {time!r}: has type {tt}, expected numbers or timestamps")
    if label:
        lt = t.schema.field(label).type
        if not (pa.types.is_integer(lt) or pa.types.is_floating(lt) or pa.types.is_boolean(lt)):
            raise DataError(f"{f}: column {label!r}: has type {lt}, expected 0/1 numbers")


def _codes(col: pa.ChunkedArray) -> np.ndarray:
    """Dense integer codes of a column's values (nulls: -1)."""
    enc = pc.dictionary_encode(col.combine_chunks())
    idx = enc.indices
    return pc.fill_null(idx, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def _times(col: pa.ChunkedArray) -> np.ndarray:
    c = col.combine_chunks()
    if pa.types.is_timestamp(c.type):
        c = c.cast(pa.int64())
    if pa.types.is_floating(c.type):
        return c.to_numpy(zero_copy_only=False).astype(np.float64)
    return c.to_numpy(zero_copy_only=False).astype(np.int64)


class Histories:
    """Every event's history, as indices: ``slice(a, b)`` gives the histories of input rows
    ``[a, b)`` (``history_index``). Holds O(events) integers, so a row group's lists are made
    only when it is written."""

    def __init__(self, lens: np.ndarray, top: np.ndarray, events: np.ndarray):
        self.lens, self.top, self.events = lens, top, events

    def slice(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """``(lengths [b - a], events [sum])`` of rows ``[a, b)``: row ``i``'s history is the
        events ``events[top[i]], events[top[i] - 1], ...`` (most recent first)."""
        lens, top = self.lens[a:b], self.top[a:b]
        total = int(lens.sum())
        if not total:
            return lens, np.zeros(0, dtype=np.int64)
        step = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)
        return lens, self.events[np.repeat(top, lens) - step]


def history_index(
    user: np.ndarray, times: np.ndarray, eligible: np.ndarray, length: int
) -> Histories:
    """For every event (in input order), the events of its history, most recent first.

    Args:
        user: ``[n]`` user codes (-1: no user: no history).
        times: ``[n]`` event times.
        eligible: ``[n]`` bool, events that may appear in a history.
        length: at most this many per event.

    Sorted by (user, time, input order), an event's history is the eligible events of its user
    before the first event with its own time (its tie block), the last ``length`` of them.
    """
    n = len(user)
    order = np.lexsort((np.arange(n), times, user))  # by user, time, then input order
    u, t = user[order], times[order]
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = u[1:] != u[:-1]
    new_tie = new_group.copy()
    new_tie[1:] |= t[1:] != t[:-1]
    pos = np.arange(n)
    group_start = np.maximum.accumulate(np.where(new_group, pos, 0))
    tie_start = np.maximum.accumulate(np.where(new_tie, pos, 0))
    cand = np.flatnonzero(eligible[order])  # sorted positions that may be in a history
    before = np.searchsorted(cand, tie_start)  # eligible events strictly earlier ...
    first = np.searchsorted(cand, group_start)  # ... within the same user
    lens = np.minimum(before - first, length)
    lens[u < 0] = 0
    inv = np.empty(n, dtype=np.int64)  # back to input order
    inv[order] = pos
    return Histories(lens[inv].astype(np.int64), (before - 1)[inv], order[cand].astype(np.int64))


def _list_column(items: pa.Array, lengths: np.ndarray, events: np.ndarray) -> pa.ListArray:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = items.take(pa.array(events, pa.int64()))
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def build_histories(
    inputs: list[str],
    out: str | Path,
    *,
    user: str,
    item: str,
    time: str,
    label: str | None = None,
    length: int = 50,
    progress: bool = True,
) -> list[Path]:
    """Write every input with ``{item}_hist`` (and with ``label`` ``{item}_hist_pos``,
    ``{item}_hist_neg``) added; returns the written files (module docstring)."""
    import pyarrow.parquet as pq

    if length < 1:
        raise ValueError("length must be positive")
    out = Path(out)
    pairs = output_paths(list(inputs), out)
    files = [f for f, _ in pairs]
    t0 = timelib.perf_counter()
    table, offsets = _events(files, user, item, time, label)
    n = table.num_rows
    users = _codes(table.column(user))
    times = _times(table.column(time))
    items = table.column(item).combine_chunks()
    has_item = ~pc.is_null(items).to_numpy(zero_copy_only=False)
    names = [f"{item}_hist"]
    masks = [has_item]
    if label:
        y = pc.cast(table.column(label), pa.float64()).to_numpy(zero_copy_only=False)
        names += [f"{item}_hist_pos", f"{item}_hist_neg"]
        masks += [has_item & (y == 1), has_item & (y == 0)]
    hists = [history_index(users, times, m, length) for m in masks]
    list_type = pa.list_(items.type)
    del table
    if progress:
        print(
            f"[mixrank] sequences: {n:,} events of {len(files)} file(s), histories of at most "
            f"{length} in {timelib.perf_counter() - t0:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    written = []
    for k, (f, dest) in enumerate(pairs):
        pf = pq.ParquetFile(f)
        clash = [c for c in names if c in pf.schema_arrow.names]
        if clash:
            raise DataError(f"{f}: column {clash[0]!r}: already exists; it would be overwritten")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        row = int(offsets[k])
        writer = None
        try:
            for rg in range(pf.num_row_groups):
                part = pf.read_row_group(rg)
                for name, h in zip(names, hists):
                    hist = _list_column(items, *h.slice(row, row + part.num_rows))
                    part = part.append_column(name, hist)
                row += part.num_rows
                if writer is None:
                    writer = pq.ParquetWriter(tmp, part.schema)
                writer.write_table(part)
            if writer is None:  # a file without row groups: its schema and the new columns
                schema = pf.schema_arrow
                for name in names:
                    schema = schema.append(pa.field(name, list_type))
                writer = pq.ParquetWriter(tmp, schema)
            writer.close()
            writer = None
            os.replace(tmp, dest)
        finally:
            if writer is not None:
                writer.close()
            if tmp.exists():
                tmp.unlink()
        written.append(dest)
        if progress:
            elapsed = timelib.perf_counter() - t0
            rate = int(offsets[k + 1]) / max(elapsed, 1e-9)
            eta = (n - int(offsets[k + 1])) / max(rate, 1e-9)
            print(
                f"[mixrank] sequences: wrote {dest} ({k + 1}/{len(pairs)}, {rate:,.0f} rows/s, "
                f"ETA {eta:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    return written
