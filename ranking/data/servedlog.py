"""The request-log format: what the service served, as Parquet, one row per candidate.

The service writes it (``serving.reqlog.RequestLog``); ``mixrank data join-labels`` turns it into
training rows and ``mixrank check-consistency`` re-scores it. Columns::

    request_id: string      candidate: int32 (index in the request)
    served_at: timestamp[ms, UTC]            model_version: string
    <every schema feature column, as received, the context merged in (a candidate's own value
     wins)>: categorical -> string (integers in their decimal form, which hashes alike),
             id_list / sequence -> list<string>, dense -> float64
    score_<task>: float32, one column per task (the probabilities the service answered)

Files live under ``<dir>/hour=YYYY-MM-DD-HH/model_version=<v>/part-*.parquet``; readers take the
whole directory (``read_logs``); names starting with ``.`` or ``_`` (files being written) are
skipped.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

META_COLUMNS = ("request_id", "candidate", "served_at", "model_version")
SCORE_PREFIX = "score_"
_TIME = pa.timestamp("ms", tz="UTC")


def score_column(task: str) -> str:
    return f"{SCORE_PREFIX}{task}"


def check_schema(schema) -> None:
    """A schema whose feature columns clash with the log's own columns cannot be logged."""
    clash = sorted(
        {f.column for f in schema.features}
        & (set(META_COLUMNS) | {score_column(t) for t in schema.task_names})
    )
    if clash:
        raise ValueError(
            f"request log: feature columns {clash} clash with the log's own columns "
            f"{list(META_COLUMNS)} / score_<task>"
        )


def _arrow_type(kind: str) -> pa.DataType:
    from ranking.features import CATEGORICAL, DENSE

    if kind == DENSE:
        return pa.float64()
    if kind == CATEGORICAL:
        return pa.string()
    return pa.list_(pa.string())


def arrow_schema(schema) -> pa.Schema:
    """The Arrow schema of a log file for ``schema`` (``ValueError`` if its columns clash with
    the log's own)."""
    check_schema(schema)
    fields = [
        pa.field("request_id", pa.string()),
        pa.field("candidate", pa.int32()),
        pa.field("served_at", _TIME),
        pa.field("model_version", pa.string()),
    ]
    fields += [pa.field(f.column, _arrow_type(f.kind)) for f in schema.features]
    fields += [pa.field(score_column(t), pa.float32()) for t in schema.task_names]
    return pa.schema(fields)


@dataclass
class Served:
    """One answered request, as handed to ``RequestLog.offer``."""

    request_id: str
    served_at: float  # seconds since the epoch
    model_version: str
    schema: Any  # the FeatureSchema of the model that answered
    context: dict
    candidates: list[dict]
    probs: np.ndarray  # [n, n_tasks]


def served_table(items: list[Served]) -> pa.Table:
    """The log rows of ``items`` (all of one schema), one per candidate."""
    from ranking.data.convert import column_from_values

    schema = items[0].schema
    target = arrow_schema(schema)
    sizes = [len(s.candidates) for s in items]
    n = sum(sizes)
    cols: dict[str, pa.Array] = {
        "request_id": pa.array([s.request_id for s in items], pa.string()).take(
            np.repeat(np.arange(len(items)), sizes)
        ),
        "candidate": pa.array(np.concatenate([np.arange(k, dtype=np.int32) for k in sizes])),
        "served_at": pa.array(
            np.repeat(np.array([int(s.served_at * 1000) for s in items], np.int64), sizes), _TIME
        ),
        "model_version": pa.array([s.model_version for s in items], pa.string()).take(
            np.repeat(np.arange(len(items)), sizes)
        ),
    }
    for f in schema.features:
        col = f.column
        vals: list = []
        for s in items:
            if any(col in c for c in s.candidates):
                ctx = s.context.get(col)
                vals += [c.get(col, ctx) for c in s.candidates]
            else:  # context only (or absent): one value for every candidate
                vals += [s.context.get(col)] * len(s.candidates)
        arr = column_from_values(f, vals)
        cols[col] = arr if arr.type == target.field(col).type else arr.cast(target.field(col).type)
    probs = np.concatenate([s.probs for s in items]).astype(np.float32, copy=False)
    for j, task in enumerate(schema.task_names):
        cols[score_column(task)] = pa.array(probs[:, j])
    assert len(cols["request_id"]) == n
    return pa.table(cols, schema=target)


def hour_of(served_at: float) -> str:
    """The hour partition (UTC) of a time in seconds since the epoch."""
    return _dt.datetime.fromtimestamp(served_at, tz=_dt.UTC).strftime("%Y-%m-%d-%H")


def as_uri(directory: str) -> str:
    """A local path made absolute; a URI as it is."""
    return directory if "://" in directory else os.path.abspath(directory)


def read_logs(directory: str):
    """The log directory as a ``pyarrow.dataset.Dataset`` of every finished file."""
    import pyarrow.dataset as ds

    fs, root = pafs.FileSystem.from_uri(as_uri(directory))
    if not fs.get_file_info(root).type == pafs.FileType.Directory:
        raise FileNotFoundError(f"{directory}: no such log directory")
    return ds.dataset(root, format="parquet", filesystem=fs)
