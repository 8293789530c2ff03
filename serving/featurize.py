"""Validated requests -> model input, through ``ranking.data.convert`` (no feature logic here).

The context is turned into feature columns once (one row) and broadcast to the candidates; a
candidate that sends a feature of its own keeps it. The result is exactly the ``Batch`` that
``batch_from_rows(schema, [{**context, **cand} for cand in candidates])`` gives
(tests/test_serving_request.py checks it), at the cost of hashing each context value once.
"""

from __future__ import annotations

import numpy as np

from ranking.data.convert import (
    FeatureColumns,
    column_from_values,
    columns_from_arrow,
    dense_values,
    jagged_take,
    sparse_values,
    table_from_columns,
    table_from_rows,
    to_batch,
)
from ranking.data.fastrows import ABSENT
from ranking.data.hashing import NULL_BUCKET
from ranking.features import Batch, FeatureSchema
from serving.request import RankRequest


def _columns(schema: FeatureSchema, req: RankRequest) -> tuple[FeatureColumns, dict]:
    """The candidates' ``FeatureColumns``, and the features validation already hashed
    (``RankRequest.hashed``: their candidate and context bucket ids)."""
    if req.columns is None:
        table = table_from_rows(schema, req.candidates)
        return columns_from_arrow(schema, table, source="<request>", with_labels=False), {}
    n = req.size
    by_column = {f.column: f for f in schema.features}
    hashed = {by_column[c].name: ids for c, ids in (req.hashed or {}).items()}
    skip = frozenset(hashed)
    if len(skip) < len(schema.features):
        table = table_from_columns(schema, req.columns, n, skip)
        cols = columns_from_arrow(schema, table, source="<request>", with_labels=False, skip=skip)
    else:  # every feature was hashed in validation (all plainly hashed categoricals)
        cols = FeatureColumns(
            np.empty((n, 0), np.float32), {}, {}, np.zeros((n, len(schema.tasks)), np.float32)
        )
    ones = np.ones(n, dtype=np.int64)
    for name, ids in hashed.items():
        # a candidate without the key has no value of its own (NULL_BUCKET = 0 unless the
        # context's is broadcast, in request_columns)
        cols.ids[name], cols.lengths[name] = np.maximum(ids[:n], NULL_BUCKET), ones
    return cols, hashed


def request_columns(schema: FeatureSchema, req: RankRequest) -> FeatureColumns:
    """``FeatureColumns`` of ``req.size`` rows: candidate features, plus context features
    broadcast to every candidate that does not send its own value. Only the features the
    context sends are converted for it (one row each)."""
    cand, hashed = _columns(schema, req)
    if not req.context:
        return cand
    n = req.size
    rows = np.arange(1, n + 1, dtype=np.int64)
    dense_pos = {f.column: j for j, f in enumerate(schema.dense_features)}
    dense = cand.dense
    ids, lengths = dict(cand.ids), dict(cand.lengths)
    for f in schema.features:
        if f.column not in req.context:
            continue
        if f.name in hashed:  # validation hashed the context's value too
            row = hashed[f.name]
            ids[f.name] = np.where(row[:n] != ABSENT, cand.ids[f.name], row[n])
            continue
        if req.columns is not None and f.column not in req.columns:
            own = np.zeros(n, dtype=bool)  # no candidate sends it
        else:
            own = np.fromiter((f.column in c for c in req.candidates), dtype=bool, count=n)
        one = column_from_values(f, [req.context[f.column]])
        if f.column in dense_pos:
            if dense is cand.dense:
                dense = dense.copy()
            j = dense_pos[f.column]
            value = dense_values(f, one, "<request>")[0]
            dense[:, j] = np.where(own, dense[:, j], value)
            continue
        ctx_ids, ctx_len = sparse_values(schema, f, one, "<request>")
        if f.name in cand.jagged:
            idx = np.where(own, rows, 0)  # a candidate's own list, else the context's (row 0)
            ids[f.name], lengths[f.name] = jagged_take(
                np.concatenate([ctx_ids, cand.ids[f.name]]),
                np.concatenate([ctx_len, cand.lengths[f.name]]),
                idx,
            )
        else:
            ids[f.name] = np.where(own, cand.ids[f.name], ctx_ids[0])
    return FeatureColumns(dense, ids, lengths, cand.labels, cand.jagged)


def merged_batch(schema: FeatureSchema, parts: list[FeatureColumns]) -> Batch:
    """One ``Batch`` holding the rows of several requests, in order."""
    return to_batch(schema, FeatureColumns.concat(parts))
