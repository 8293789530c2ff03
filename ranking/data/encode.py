"""Request feature values -> model input, checked and hashed in one pass.

``encode(schema, context, candidates, max_chars=..., max_items=...)`` is the one path a ranking
request's feature values take: every value is checked against the schema (an ``InvalidValue``
names ``candidates[i].feature`` or ``context.feature``, with a machine-readable code), the
plainly hashed categorical features are hashed in the same pass
(``ranking.data.fastrows.scan``, C where built), and the result is the ``FeatureColumns`` of the
candidates with the context broadcast to every candidate that does not send its own value:
exactly what ``batch_from_rows(schema, [{**context, **cand} for cand in candidates])`` gives
(tests/test_serving_request.py checks it). ``serving/request.py`` keeps only the envelope
(request id, top_k, candidate count).

Accepted values are exactly those ``batch_from_rows`` turns into model input, by the rules of
``ranking.data.values`` (written once, shared with ``batch_from_rows``): for a categorical (and
each id of an id_list) ``categorical_problem``; a list of those for an id_list; a finite number
for a dense feature (``number_problem``); null for any missing value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ranking.data import fastrows
from ranking.data.convert import (
    FeatureColumns,
    RowChecks,
    align_side,
    column_from_values,
    columns_from_arrow,
    dense_values,
    jagged_take,
    plainly_hashed,
    sparse_values,
    table_from_columns,
    table_from_rows,
    to_batch,
)
from ranking.data.errors import DataError
from ranking.data.hashing import NULL_BUCKET
from ranking.data.values import (
    categorical_problem,
    describe,
    ints_problem,
    number_problem,
    strings_problem,
)
from ranking.features import CATEGORICAL, DENSE, Batch, FeatureSchema

_NONE = type(None)


class InvalidValue(ValueError):
    """A feature value the model cannot take: ``code`` (``unknown_feature``, ``invalid_type``,
    ``invalid_value``, ``value_too_long``), ``message`` and ``field`` (``candidates[3].item``)."""

    def __init__(self, code: str, message: str, field: str | None):
        super().__init__(message)
        self.code, self.message, self.field = code, message, field


def _ids_ok(vals: list, types: set, max_chars: int) -> bool:
    """``categorical_problem`` over a whole column at once, for the two common cases (all
    strings, all integers, nulls allowed); False ("not sure") for anything else."""
    if types <= {str, _NONE}:
        return strings_problem([v for v in vals if v is not None], max_chars) is None
    if types <= {int, _NONE}:
        return ints_problem([v for v in vals if v is not None]) is None
    return False


# ----------------------------------------------------------------------------- checking


@dataclass
class Checked:
    """What the column-at-a-time check gathered: ``columns``, the candidates' values of each
    feature some candidate sends that was not hashed (None where a candidate lacks it), and
    ``hashed``, per plainly hashed categorical column, an ``[n + 1]`` int64 array of each
    candidate's bucket (``fastrows.ABSENT`` (-1) where a candidate lacks the key) and then the
    context's."""

    columns: dict[str, list]
    hashed: dict[str, np.ndarray]


def check_columns(
    schema: FeatureSchema, context: dict, candidates: list, max_chars: int, max_items: int
) -> Checked | None:
    """Column-at-a-time check of the features (C-level passes instead of a Python call per
    value). A ``Checked`` means every value is acceptable; None means "not sure": the
    per-value checks then run and raise the error that names the field. Never a ``Checked``
    where those would raise (tests/test_serving_request.py compares both on valid and invalid
    requests)."""
    columns = {f.column: f for f in schema.features}
    names = tuple(columns)
    buckets = tuple(f.num_buckets if plainly_hashed(f) else 0 for f in columns.values())
    scanned = fastrows.scan(candidates, context, names, buckets, schema.hash_seed, max_chars)
    if scanned is None:
        return None
    ids, mixed = scanned
    n = len(candidates)
    out, hashed = {}, {}
    sent = (ids[:, :n] != fastrows.ABSENT).any(axis=1).tolist()
    for j, name in enumerate(names):
        if not sent[j] and name not in context:
            continue
        if buckets[j] and j not in mixed:  # checked and hashed
            hashed[name] = ids[j]
            continue
        spec = columns[name]
        vals = [c.get(name) for c in candidates] if sent[j] else [None] * n
        if sent[j]:
            out[name] = vals[:]
        if name in context:
            vals.append(context[name])
        types = set(map(type, vals))
        if spec.kind == DENSE:
            if not types <= {float, int, _NONE}:
                return None
            nums = [v for v in vals if v is not None]
            try:
                if nums and not np.isfinite(np.asarray(nums, dtype=np.float64)).all():
                    return None
            except OverflowError:
                return None
        elif spec.kind == CATEGORICAL:
            if not _ids_ok(vals, types, max_chars):
                return None
        else:
            if not types <= {list, _NONE}:
                return None
            lists = [v for v in vals if v is not None]
            if lists and max(map(len, lists)) > max_items:
                return None
            flat = [x for v in lists for x in v]
            if not _ids_ok(flat, set(map(type, flat)), max_chars):
                return None
    return Checked(out, hashed)


def check_values(
    schema: FeatureSchema, context: dict, candidates: list, max_chars: int, max_items: int
) -> None:
    """The per-value checks: raise ``InvalidValue`` naming the first bad field."""
    columns = {f.column: f for f in schema.features}
    _check_features(context, "context", columns, max_chars, max_items)
    for i, cand in enumerate(candidates):
        if not isinstance(cand, dict):
            raise InvalidValue(
                "invalid_type",
                f"expected an object of features, got {describe(cand)}",
                f"candidates[{i}]",
            )
        _check_features(cand, f"candidates[{i}]", columns, max_chars, max_items)


def _check_features(feats: dict, where: str, columns: dict, max_chars: int, max_items: int):
    for name, value in feats.items():
        spec = columns.get(name)
        if spec is None:
            raise InvalidValue(
                "unknown_feature",
                f"unknown feature {_short(name)!r} (the model's features: {', '.join(columns)})",
                f"{where}.{_short(name)}",
            )
        if value is None:
            continue
        field = f"{where}.{name}"
        if spec.kind == DENSE:
            problem = number_problem(value)
        elif spec.kind == CATEGORICAL:
            problem = categorical_problem(value, max_chars)
        elif not isinstance(value, list):
            problem = "invalid_type", f"{spec.kind} feature: expected a list, got {describe(value)}"
        elif len(value) > max_items:
            problem = "value_too_long", f"{len(value)} ids, the limit is {max_items}"
        elif _ids_ok(value, set(map(type, value)), max_chars):  # the whole list at once
            problem = None
        else:
            for j, v in enumerate(value):
                bad = None if v is None else categorical_problem(v, max_chars)
                if bad is not None:
                    raise InvalidValue(*bad, f"{field}[{j}]")
            problem = None
        if problem is not None:
            raise InvalidValue(*problem, field)


# ----------------------------------------------------------------------------- encoding


def encode(
    schema: FeatureSchema,
    context: dict,
    candidates: list,
    *,
    max_chars: int = 1024,
    max_items: int = 1024,
) -> FeatureColumns:
    """The candidates' ``FeatureColumns`` (``len(candidates)`` rows) with the context broadcast,
    or ``InvalidValue`` naming the field. ``max_chars``: the longest string value;
    ``max_items``: the longest id_list."""
    columns = {f.column: f for f in schema.features}
    full_context = context
    _check_features(context, "context", columns, max_chars, max_items)  # one row: per value
    seqs = [f for f in schema.features if f.is_sequence]
    if seqs:
        _check_sequences(seqs, context, candidates)
        seq_cols = {f.column for f in seqs}
        context = {k: v for k, v in context.items() if k not in seq_cols}
    checked = check_columns(schema, context, candidates, max_chars, max_items)
    if checked is None:
        check_values(schema, context, candidates, max_chars, max_items)
    try:
        cols = _broadcast(schema, context, candidates, checked)
        if seqs:
            cols = _request_sequences(schema, cols, seqs, full_context)
        return cols
    except DataError as e:  # the feature pipeline refused a value; it names the column
        raise InvalidValue("invalid_value", str(e), getattr(e, "column", None)) from None


def _check_sequences(seqs: list, context: dict, candidates: list) -> None:
    """A sequence is the user's history: sent once, in ``context``; a side sequence has its
    main sequence's length."""
    for i, cand in enumerate(candidates):
        if isinstance(cand, dict):
            for f in seqs:
                if f.column in cand:
                    raise InvalidValue(
                        "invalid_value",
                        f"sequence feature {f.name!r} is the user's history: send it once in "
                        "context, not per candidate",
                        f"candidates[{i}].{f.column}",
                    )
    by_name = {f.name: f for f in seqs}
    for f in seqs:
        side = context.get(f.column)
        if not f.side_of or not side:
            continue
        main = context.get(by_name[f.side_of].column) or []
        if len(side) != len(main):
            raise InvalidValue(
                "invalid_value",
                f"side sequence {f.name!r} has {len(side)} ids where {f.side_of!r} has "
                f"{len(main)}; they are aligned position by position",
                f"context.{f.column}",
            )


def _request_sequences(
    schema: FeatureSchema, cols: FeatureColumns, seqs: list, context: dict
) -> FeatureColumns:
    """``cols`` with the sequence features as one row, the request's, that every candidate
    reads (``seq_of`` zeros): the model looks the history up and projects it once."""
    ids, lengths = dict(cols.ids), dict(cols.lengths)
    for f in seqs:
        one = column_from_values(f, [context.get(f.column)])
        ids[f.name], lengths[f.name] = sparse_values(schema, f, one, "<request>")
    for f in seqs:
        if f.side_of:
            ids[f.name], lengths[f.name] = align_side(
                f, ids[f.name], lengths[f.name], lengths[f.side_of], RowChecks("<request>", 1)
            )
    n = len(cols)
    return FeatureColumns(
        cols.dense,
        ids,
        lengths,
        cols.labels,
        cols.jagged,
        cols.bad,
        np.zeros(n, dtype=np.int64),
        cols.seq_keys,
    )


def _candidate_columns(
    schema: FeatureSchema, candidates: list, checked: Checked | None
) -> tuple[FeatureColumns, dict]:
    """The candidates' ``FeatureColumns``, and the features the check already hashed (their
    candidate and context bucket ids)."""
    if checked is None:
        table = table_from_rows(schema, candidates)
        return columns_from_arrow(schema, table, source="<request>", with_labels=False), {}
    n = len(candidates)
    by_column = {f.column: f for f in schema.features}
    hashed = {by_column[c].name: ids for c, ids in checked.hashed.items()}
    # sequences come from the context only, once per request (``_request_sequences``)
    skip = frozenset(hashed) | frozenset(schema.sequence_keys)
    if len(skip) < len(schema.features):
        table = table_from_columns(schema, checked.columns, n, skip)
        cols = columns_from_arrow(schema, table, source="<request>", with_labels=False, skip=skip)
    else:  # every feature was hashed in the check (plainly hashed categoricals, sequences)
        cols = FeatureColumns(
            np.empty((n, 0), np.float32),
            {},
            {},
            np.zeros((n, len(schema.tasks)), np.float32),
            frozenset(f.name for f in schema.sparse_features if f.kind != CATEGORICAL),
            seq_keys=frozenset(schema.sequence_keys),
        )
    ones = np.ones(n, dtype=np.int64)
    for name, ids in hashed.items():
        # a candidate without the key has no value of its own (NULL_BUCKET = 0 unless the
        # context's is broadcast, in _broadcast)
        cols.ids[name], cols.lengths[name] = np.maximum(ids[:n], NULL_BUCKET), ones
    return cols, hashed


def _broadcast(
    schema: FeatureSchema, context: dict, candidates: list, checked: Checked | None
) -> FeatureColumns:
    """Candidate features, plus context features broadcast to every candidate that does not
    send its own value. Only the features the context sends are converted for it (one row
    each)."""
    cand, hashed = _candidate_columns(schema, candidates, checked)
    if not context:
        return cand
    n = len(candidates)
    rows = np.arange(1, n + 1, dtype=np.int64)
    dense_pos = {f.column: j for j, f in enumerate(schema.dense_features)}
    dense = cand.dense
    ids, lengths = dict(cand.ids), dict(cand.lengths)
    for f in schema.features:
        if f.column not in context:
            continue
        if f.name in hashed:  # the check hashed the context's value too
            row = hashed[f.name]
            ids[f.name] = np.where(row[:n] != fastrows.ABSENT, cand.ids[f.name], row[n])
            continue
        if checked is not None and f.column not in checked.columns:
            own = np.zeros(n, dtype=bool)  # no candidate sends it
        else:
            own = np.fromiter((f.column in c for c in candidates), dtype=bool, count=n)
        one = column_from_values(f, [context[f.column]])
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
    return FeatureColumns(dense, ids, lengths, cand.labels, cand.jagged, seq_keys=cand.seq_keys)


def merged_batch(schema: FeatureSchema, parts: list[FeatureColumns]) -> Batch:
    """One ``Batch`` holding the rows of several requests, in order."""
    return to_batch(schema, FeatureColumns.concat(parts))


def _short(s: str, n: int = 64) -> str:
    s = str(s)
    return s if len(s) <= n else s[:n] + "..."
