"""``mixrank data join-labels``: served requests (``ranking.data.servedlog``) joined with the
outcome events that came later, into training rows: the next model trains on exactly the
feature values that were served.

Events (``--labels``: Parquet files, a directory or a glob) carry the join key (by default
``request_id`` and ``candidate``, the candidate's index in its request; ``--key`` names others,
e.g. ``request_id,item``) and label columns (by default every other column; ``--label-columns``
to choose). Several events of one key are reduced to their maximum (a click is a click, however
often it is reported). A served row without an event gets label 0 (``--missing zero``: events
are the positives, an impression without one is a negative) or is left out (``--missing drop``).

Output: ``<out>/dt=YYYY-MM-DD/part-N.parquet``, the day (UTC) of ``served_at``: the partitions
``mixrank train`` selects with ``data.since`` / ``data.until``. Every log column is kept
(features, request id, candidate, model version, served scores), the label columns are added.
A day written again replaces that day's partition whole: each day is first written under a
hidden directory, then renamed into place.

Streamed: the events are reduced in memory once (they are few next to the impressions), and
each log file is joined with them on its own (pyarrow's hash join, ``pyarrow.Table.join``) and
written by ``pyarrow.dataset.write_dataset``. ``engine="ray"`` runs the same per-batch join on
Ray Data (the events broadcast to the tasks) for logs that outgrow one machine.
"""

from __future__ import annotations

import shutil
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from ranking.data.errors import DataError
from ranking.data.servedlog import META_COLUMNS, read_logs

DEFAULT_KEY = ("request_id", "candidate")
MISSING = ("zero", "drop")
DT = "dt"


def _events(path: str, key: list[str], label_columns: list[str] | None):
    """The events reduced to one row per key: ``(table, label column names)``."""
    try:
        data = ds.dataset(_paths(path), format="parquet")
    except (OSError, pa.ArrowInvalid) as e:
        raise DataError(f"{path}: cannot read the label events: {e}") from None
    names = data.schema.names
    missing = [k for k in key if k not in names]
    if missing:
        raise DataError(f"{path}: label events lack the key column(s) {missing} (have {names})")
    if label_columns is None:
        label_columns = [c for c in names if c not in key]
    absent = [c for c in label_columns if c not in names]
    if absent:
        raise DataError(f"{path}: no label column(s) {absent} (have {names})")
    if not label_columns:
        raise DataError(f"{path}: no label columns besides the key {key}")
    table = data.to_table(columns=key + label_columns)
    for c in label_columns:
        t = table.schema.field(c).type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
            raise DataError(f"{path}: label column {c!r}: expected numbers or booleans, got {t}")
        table = table.set_column(
            table.schema.get_field_index(c), c, pc.cast(table[c], pa.float64())
        )
    reduced = table.group_by(key).aggregate([(c, "max") for c in label_columns])
    return reduced.rename_columns(
        [c[: -len("_max")] if c.endswith("_max") else c for c in reduced.column_names]
    ), label_columns


def _paths(path: str):
    """A file, a directory or a glob -> what ``pyarrow.dataset.dataset`` takes."""
    import glob

    if any(ch in path for ch in "*?["):
        files = sorted(glob.glob(path))
        if not files:
            raise DataError(f"{path}: no files match")
        return files
    if not Path(path).exists():
        raise DataError(f"{path}: no such file or directory")
    return path


def join_batch(
    batch: pa.Table, events: pa.Table, key: list[str], labels: list[str], missing: str
) -> pa.Table:
    """One piece of the log joined with the reduced events (log columns first, then labels,
    then ``dt``); rows keep their log order."""
    for k in key:  # the events' key columns take the log's types (int64 vs int32, ...)
        want = batch.schema.field(k).type
        if events.schema.field(k).type != want:
            try:
                events = events.set_column(
                    events.schema.get_field_index(k), k, pc.cast(events[k], want)
                )
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise DataError(
                    f"label events: key column {k!r} ({events.schema.field(k).type}) cannot "
                    f"be compared with the log's ({want}): {e}"
                ) from None
    order = "__row"
    left = batch.append_column(order, pa.array(range(batch.num_rows), pa.int64()))
    joined = left.join(events, keys=key, join_type="left outer", use_threads=False)
    joined = joined.sort_by(order).drop_columns([order])
    if missing == "drop":
        joined = joined.filter(pc.is_valid(joined[labels[0]]))
    else:
        for c in labels:
            i = joined.schema.get_field_index(c)
            joined = joined.set_column(i, c, pc.fill_null(joined[c], 0.0))
    cols = batch.column_names + labels
    joined = joined.select(cols)
    day = pc.strftime(joined["served_at"], format="%Y-%m-%d")
    return joined.append_column(DT, day)


def join_labels(
    logs: str,
    labels: str,
    out: str,
    *,
    key: list[str] | None = None,
    label_columns: list[str] | None = None,
    missing: str = "zero",
    engine: str = "arrow",
    quiet: bool = False,
) -> dict:
    """Join ``logs`` with ``labels`` into ``out`` (see the module docstring). Returns counts:
    ``{"rows", "labelled", "days", "events", "files"}``."""
    if missing not in MISSING:
        raise DataError(f"--missing: expected one of {MISSING}, got {missing!r}")
    key = list(key or DEFAULT_KEY)
    try:
        log_data = read_logs(logs)
    except (FileNotFoundError, OSError, pa.ArrowInvalid) as e:
        raise DataError(f"{logs}: cannot read the request log: {e}") from None
    names = log_data.schema.names
    absent = [c for c in (*META_COLUMNS, *key) if c not in names]
    if absent:
        raise DataError(f"{logs}: not a request log: no column(s) {absent}")
    events, labels_ = _events(labels, key, label_columns)
    clash = [c for c in labels_ if c in names]
    if clash:
        raise DataError(f"{labels}: label column(s) {clash} are also columns of the log")
    out_p = Path(out)
    tmp = out_p / f".join-{uuid.uuid4().hex[:8]}"
    t0 = time.time()
    if engine == "ray":
        rows, labelled = _join_ray(log_data, events, key, labels_, missing, tmp)
    elif engine == "arrow":
        rows, labelled = _join_arrow(log_data, events, key, labels_, missing, tmp, quiet, t0)
    else:
        raise DataError(f"--engine: expected arrow or ray, got {engine!r}")
    days = _publish(tmp, out_p)
    if not quiet:
        dt = time.time() - t0
        print(
            f"join-labels: {rows:,} served rows, {labelled:,} with an event, {len(days)} day(s) "
            f"-> {out} in {dt:.1f} s ({rows / max(dt, 1e-9):,.0f} rows/s)",
            file=sys.stderr,
        )
    return {
        "rows": rows,
        "labelled": labelled,
        "days": days,
        "events": events.num_rows,
        "files": len(log_data.files),
    }


def _count_labelled(t: pa.Table, labels: list[str]) -> int:
    return int(pc.sum(pc.greater(t[labels[0]], 0)).as_py() or 0)


def _join_arrow(log_data, events, key, labels, missing, tmp, quiet, t0) -> tuple[int, int]:
    counts = {"rows": 0, "labelled": 0}
    files = log_data.files
    state = {"done": 0, "last": time.time()}

    def pieces():
        for frag in log_data.get_fragments():
            t = frag.to_table(schema=log_data.schema)
            joined = join_batch(t, events, key, labels, missing)
            counts["rows"] += t.num_rows
            counts["labelled"] += _count_labelled(joined, labels)
            state["done"] += 1
            now = time.time()
            if not quiet and now - state["last"] > 5:
                rate = counts["rows"] / (now - t0)
                left = (len(files) - state["done"]) * (now - t0) / state["done"]
                print(
                    f"join-labels: {state['done']}/{len(files)} files, {counts['rows']:,} rows, "
                    f"{rate:,.0f} rows/s, ETA {left:.0f} s",
                    file=sys.stderr,
                )
                state["last"] = now
            yield from joined.to_batches()

    schema = log_data.schema
    out_schema = pa.schema(
        [*schema, *(pa.field(c, pa.float64()) for c in labels), pa.field(DT, pa.string())]
    )
    ds.write_dataset(
        pieces(),
        tmp,
        schema=out_schema,
        format="parquet",
        partitioning=ds.partitioning(pa.schema([pa.field(DT, pa.string())]), flavor="hive"),
        basename_template="part-{i}.parquet",
        existing_data_behavior="error",
        max_rows_per_group=1 << 17,
    )
    return counts["rows"], counts["labelled"]


def _join_ray(log_data, events, key, labels, missing, tmp) -> tuple[int, int]:
    """The same join on Ray Data: the log files read as a Ray dataset, each block joined with
    the broadcast events, written partitioned by day."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, log_to_driver=False)
    try:
        ev = ray.put(events)

        def fn(batch: pa.Table) -> pa.Table:
            return join_batch(batch, ray.get(ev), key, labels, missing)

        data = ray.data.read_parquet(list(log_data.files), schema=log_data.schema)
        joined = data.map_batches(fn, batch_format="pyarrow", batch_size=None)
        joined = joined.materialize()
        rows = int(data.count())
        labelled = joined.filter(expr=f"{labels[0]} > 0").count()
        joined.write_parquet(str(tmp), partition_cols=[DT])
    finally:
        if started:
            ray.shutdown()
    return rows, labelled


def _publish(tmp: Path, out: Path) -> list[str]:
    """Move each day written under ``tmp`` into ``out``, replacing that day whole."""
    days = sorted(p.name for p in tmp.glob(f"{DT}=*") if p.is_dir()) if tmp.exists() else []
    for day in days:
        dst = out / day
        old = None
        if dst.exists():
            old = out / f".old-{day}-{uuid.uuid4().hex[:8]}"
            dst.rename(old)
        (tmp / day).rename(dst)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return [d.split("=", 1)[1] for d in days]
