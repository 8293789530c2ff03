"""Rows (Arrow tables or per-candidate dicts) -> ``Batch``, through one code path.

Conventions (shared by training and serving):

- categorical: every row has exactly one id (length 1 in the KJT); a null or missing value gets
  the reserved bucket ``NULL_BUCKET = 0``.
- id_list: a null or missing list has length 0 (an empty bag; mean pooling gives zeros); a null
  element inside a list gets bucket 0; lists are truncated to ``schema.max_list_length``.
- sequence: as an id_list, truncated to its own ``max_length`` (most recent first, so the oldest
  ids go); a side sequence must have its main sequence's length in every row (a null side list
  is all null ids at that length); any other length is a bad row (cause ``sequence``).
- dense: null / NaN / missing -> ``fill``; then ``clip`` (on the raw scale); then ``transform``
  (``log1p``: log1p(max(x, 0)); ``signed_log1p``: sign(x) * log1p(|x|)). Output float32.
- labels: must be 0/1 (any numeric or boolean type); anything else is a bad row.
- bad rows (what only the data shows: a label that is null or not 0/1, an infinite dense value,
  and, read from files, a string that is not UTF-8 or an id list over ``max_list_items``):
  ``RowChecks`` either raises a ``DataError`` naming the file, row group, row and column
  (``on_bad_rows: fail``), or marks the rows in ``FeatureColumns.bad`` with their cause
  (``skip``) so that the reader drops them when it cuts batches.

The numpy core works on ``FeatureColumns`` (per-row arrays), which the reader also uses to
shuffle and cut batches without going back to Arrow.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ranking.data.errors import DataError
from ranking.data.hashing import (
    HashTypeError,
    canonical_strings,
    hash_array,
    hash_columns,
    id_type_ok,
    load_vocab,
    vocab_lookup,
)
from ranking.data.values import categorical_problem
from ranking.features import CATEGORICAL, DENSE, Batch, FeatureSchema, FeatureSpec


def column_error(source: str, column: str | None, msg: str) -> DataError:
    """A ``DataError`` whose message names the file and the column; both are also attributes
    (``e.source``, ``e.column``) for callers that report them separately (serving)."""
    where = f"{source}: column {column!r}: " if column is not None else f"{source}: "
    e = DataError(where + msg)
    e.source = source  # type: ignore[attr-defined]
    e.column = column  # type: ignore[attr-defined]
    return e


@dataclass
class FeatureColumns:
    """A batch of rows in numpy form (one entry per row, before tensors are made).

    Attributes:
        dense: ``[n, Nd]`` float32.
        ids: per sparse key, ``[total]`` int64 bucket ids (categorical: total = n).
        lengths: per sparse key, ``[n]`` int64 ids per row.
        labels: ``[n, n_tasks]`` float32.
        jagged: the keys whose rows may hold other than one id (id_list and sequence features).
        seq_keys: the sequence features' keys (``Batch.sequences``).
        bad: ``[n]`` uint8 cause of each bad row (``BAD_CAUSES[code - 1]``, 0: a good row), or
            None when every row is good; bad rows hold placeholder values.
        seq_of: ``[n]`` int64, the row of the sequence keys' ids/lengths each row reads (their
            arrays then have as many rows as there are distinct histories: serving's one per
            request), or None: the sequence keys have one row per row, like the others.
    """

    dense: np.ndarray
    ids: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    labels: np.ndarray
    jagged: frozenset[str] = field(default_factory=frozenset)
    bad: np.ndarray | None = None
    seq_of: np.ndarray | None = None
    seq_keys: frozenset[str] = field(default_factory=frozenset)

    def __len__(self) -> int:
        return int(self.dense.shape[0])

    def take(self, idx: np.ndarray) -> FeatureColumns:
        """The rows ``idx`` (``[m]`` int64), in that order."""
        assert self.seq_of is None, "take() of per-request sequences"
        # np.take, not fancy indexing: the same rows, and 2-4x faster for the 2-D dense block
        # (docs/BENCHMARKS.md, "Measurements behind code choices")
        ids, lengths = {}, {}
        for k, v in self.ids.items():
            if k in self.jagged:
                ids[k], lengths[k] = jagged_take(v, self.lengths[k], idx)
            else:
                ids[k], lengths[k] = np.take(v, idx), np.take(self.lengths[k], idx)
        bad = None if self.bad is None else np.take(self.bad, idx)
        return FeatureColumns(
            np.take(self.dense, idx, axis=0),
            ids,
            lengths,
            np.take(self.labels, idx, axis=0),
            self.jagged,
            bad,
            None,
            self.seq_keys,
        )

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays."""
        arrays = [self.dense, self.labels, *self.ids.values(), *self.lengths.values()]
        arrays += [a for a in (self.bad, self.seq_of) if a is not None]
        return int(sum(a.nbytes for a in arrays))

    def drop_bad(self) -> tuple[FeatureColumns, dict[str, int]]:
        """The good rows, and how many rows were dropped per cause."""
        if self.bad is None or not self.bad.any():
            return self, {}
        counts = np.bincount(self.bad, minlength=len(BAD_CAUSES) + 1)
        dropped = {c: int(counts[i + 1]) for i, c in enumerate(BAD_CAUSES) if counts[i + 1]}
        good = self.take(np.flatnonzero(self.bad == 0))
        good.bad = None
        return good, dropped

    def split(self, size: int, count: int) -> tuple[list[FeatureColumns], FeatureColumns]:
        """The first ``count`` runs of ``size`` rows, and the rest (views, no copies)."""
        assert self.seq_of is None, "split() of per-request sequences"
        bounds = [i * size for i in range(count + 1)] + [len(self)]
        starts = {k: np.concatenate([[0], np.cumsum(self.lengths[k])]) for k in self.jagged}
        parts = []
        for a, b in itertools.pairwise(bounds):
            ids = {
                k: v[starts[k][a] : starts[k][b]] if k in self.jagged else v[a:b]
                for k, v in self.ids.items()
            }
            lengths = {k: v[a:b] for k, v in self.lengths.items()}
            bad = None if self.bad is None else self.bad[a:b]
            parts.append(
                FeatureColumns(
                    self.dense[a:b],
                    ids,
                    lengths,
                    self.labels[a:b],
                    self.jagged,
                    bad,
                    None,
                    self.seq_keys,
                )
            )
        return parts[:-1], parts[-1]

    @staticmethod
    def concat(parts: list[FeatureColumns]) -> FeatureColumns:
        """Rows of all parts, in order."""
        if len(parts) == 1:
            return parts[0]
        keys = parts[0].ids.keys()
        seq_of = None
        if any(p.seq_of is not None for p in parts):
            assert all(p.seq_of is not None for p in parts), "mixed sequence layouts"
            k0 = next(iter(parts[0].seq_keys))
            offsets = np.cumsum([0] + [len(p.lengths[k0]) for p in parts])
            seq_of = np.concatenate([p.seq_of + o for p, o in zip(parts, offsets)])
        bad = None
        if any(p.bad is not None for p in parts):
            bad = np.concatenate(
                [p.bad if p.bad is not None else np.zeros(len(p), np.uint8) for p in parts]
            )
        return FeatureColumns(
            np.concatenate([p.dense for p in parts]),
            {k: np.concatenate([p.ids[k] for p in parts]) for k in keys},
            {k: np.concatenate([p.lengths[k] for p in parts]) for k in keys},
            np.concatenate([p.labels for p in parts]),
            parts[0].jagged,
            bad,
            seq_of,
            parts[0].seq_keys,
        )


def jagged_take(values: np.ndarray, lengths: np.ndarray, idx: np.ndarray):
    """Rows ``idx`` of a jagged array: values ``[total]``, lengths ``[n]`` -> (values', lengths')."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    new_len = lengths[idx]
    total = int(new_len.sum())
    if total == 0:
        return values[:0].copy(), new_len
    new_starts = np.cumsum(new_len) - new_len
    gather = np.repeat(starts[idx] - new_starts, new_len) + np.arange(total, dtype=np.int64)
    return values[gather], new_len


# ------------------------------------------------------------------------------ bad rows
# Causes of bad rows, in the order of their codes in ``FeatureColumns.bad`` (code = index + 1);
# the names are the keys of the per-cause counts in logs and ``summary.json``.
BAD_CAUSES = ("label", "dense", "utf8", "list_length", "sequence")
ON_BAD_ROWS = ("fail", "skip")


class RowChecks:
    """The value checks of one slice of rows, and what a bad row does.

    ``fail``: the first bad row raises a ``DataError`` naming ``source`` (the file and row
    group), the column and the row (``row_offset`` + its index: the row of the file).
    ``skip``: bad rows are recorded in ``codes`` (the first cause of each row) and the first
    message of each cause in ``examples``; the caller keeps placeholder values in them.

    ``utf8`` (strings must be UTF-8) and ``max_list_items`` (ids per list) are the checks of
    rows read from files; requests are checked before they get here (``ranking.data.values``).
    """

    def __init__(
        self,
        source: str,
        n: int,
        *,
        row_offset: int = 0,
        on_bad_rows: str = "fail",
        utf8: bool = False,
        max_list_items: int | None = None,
    ):
        if on_bad_rows not in ON_BAD_ROWS:
            raise ValueError(f"on_bad_rows: expected one of {ON_BAD_ROWS}, got {on_bad_rows!r}")
        self.source, self.n, self.row_offset = source, n, row_offset
        self.skip = on_bad_rows == "skip"
        self.utf8, self.max_list_items = utf8, max_list_items
        self.codes: np.ndarray | None = None
        self.examples: dict[str, str] = {}

    def flag(self, cause: str, column: str, mask: np.ndarray, what) -> None:
        """Rows ``mask`` (``[n]`` bool) have a bad value of ``cause`` in ``column``;
        ``what(i)`` describes row ``i``'s problem (\"label is 2\", ...)."""
        if not mask.any():
            return
        i = int(np.argmax(mask))
        text, _, expected = what(i).partition("; ")
        msg = f"{text} at row {self.row_offset + i}" + (f", {expected}" if expected else "")
        if not self.skip:
            raise column_error(self.source, column, msg)
        self.examples.setdefault(cause, str(column_error(self.source, column, msg)))
        if self.codes is None:
            self.codes = np.zeros(self.n, np.uint8)
        self.codes[(self.codes == 0) & mask] = BAD_CAUSES.index(cause) + 1


def _utf8_problem_rows(col, checks: RowChecks) -> np.ndarray | None:
    """For rows read from files: the elements of a string column (``[m]``) that are not
    UTF-8, as a bool mask, or None when all are (Arrow's full validation: a SIMD pass)."""
    if not checks.utf8:
        return None
    t = col.type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        return None
    try:
        col.validate(full=True)
        return None
    except pa.ArrowInvalid:
        pass
    binary = pa.large_binary() if pa.types.is_large_string(t) else pa.binary()
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    bad = []
    for ch in chunks:
        for v in ch.view(binary).to_pylist():
            try:
                bad.append(v is not None and v.decode("utf-8") is None)
            except UnicodeDecodeError:
                bad.append(True)
    return np.array(bad, dtype=bool)


def _check_categorical_utf8(schema: FeatureSchema, data, checks: RowChecks, skip):
    """Categorical string columns read from files must be UTF-8: bad rows flagged, their
    values made null (hashed like a missing value while the row waits to be dropped)."""
    for f in schema.sparse_features:
        if f.kind != CATEGORICAL or f.name in skip:
            continue
        col = data.column(f.column)
        bad = _utf8_problem_rows(col, checks)
        if bad is None:
            continue
        checks.flag(
            "utf8",
            f.column,
            bad,
            lambda i, f=f: f"categorical feature {f.name!r} holds a string that is not UTF-8",
        )
        i = data.schema.get_field_index(f.column)
        data = data.set_column(i, f.column, _null_where(col, bad))
    return data


def _null_where(col, mask: np.ndarray):
    """``col`` with the elements of ``mask`` made null (bad values of a skipped row)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    return pc.if_else(pa.array(mask), pa.scalar(None, col.type), col)


# ------------------------------------------------------------------------------ arrow -> numpy
def columns_from_arrow(
    schema: FeatureSchema,
    data: pa.Table | pa.RecordBatch,
    source: str = "<arrow>",
    with_labels: bool = True,
    skip: frozenset[str] = frozenset(),
    checks: RowChecks | None = None,
) -> FeatureColumns:
    """Convert rows to ``FeatureColumns``; ``source`` names the file in error messages.

    With ``with_labels=False`` labels are zeros and label columns are not read. ``skip``: names
    of sparse features whose columns are not read; the caller adds their ids and lengths.
    ``checks``: the bad-row checks and policy (default: fail on the first bad value).
    """
    n = data.num_rows
    checks = checks if checks is not None else RowChecks(source, n)
    names = set(data.schema.names)
    need = [f.column for f in schema.features if f.name not in skip]
    need += schema.label_columns if with_labels else []
    for col in need:
        if col not in names:
            raise column_error(source, col, f"missing (the file has {sorted(names)})")
    dense = np.empty((n, schema.num_dense), dtype=np.float32)
    for j, f in enumerate(schema.dense_features):
        dense[:, j] = dense_values(f, data.column(f.column), source, checks)
    if checks.utf8:
        data = _check_categorical_utf8(schema, data, checks, skip)
    ids, lengths = {}, {}
    if n * len(schema.sparse_features) <= SMALL_BATCH_VALUES:
        ids.update(_hash_small(schema, data, source, skip))
    for f in schema.sparse_features:
        if f.name in skip:
            continue
        if f.name in ids:
            lengths[f.name] = np.ones(n, dtype=np.int64)
            continue
        ids[f.name], lengths[f.name] = sparse_values(
            schema, f, data.column(f.column), source, checks
        )
    labels = np.zeros((n, len(schema.tasks)), dtype=np.float32)
    if with_labels:
        for j, col in enumerate(schema.label_columns):
            labels[:, j] = label_values(data.column(col), col, source, checks)
    for f in schema.features:
        if f.is_sequence and f.side_of and f.name not in skip and f.side_of not in skip:
            ids[f.name], lengths[f.name] = align_side(
                f, ids[f.name], lengths[f.name], lengths[f.side_of], checks
            )
    jagged = frozenset(f.name for f in schema.sparse_features if f.kind != CATEGORICAL)
    seq_keys = frozenset(schema.sequence_keys)
    return FeatureColumns(dense, ids, lengths, labels, jagged, checks.codes, None, seq_keys)


def align_side(
    f: FeatureSpec, ids: np.ndarray, lengths: np.ndarray, main: np.ndarray, checks: RowChecks
) -> tuple[np.ndarray, np.ndarray]:
    """A side sequence aligned with its main sequence's ``main`` lengths: an empty side list
    where the main one is not becomes null ids (bucket 0) at the main length; any other
    mismatch is a bad row (cause ``sequence``), whose side list is then null ids too."""
    if np.array_equal(lengths, main):
        return ids, lengths
    fill = (lengths == 0) & (main > 0)
    bad = (lengths != main) & ~fill
    if bad.any():
        checks.flag(
            "sequence",
            f.column,
            bad,
            lambda i: (
                f"side sequence {f.name!r} has {lengths[i]} ids where {f.side_of!r} has "
                f"{main[i]}; expected the same length (aligned position by position)"
            ),
        )
    keep = lengths == main
    starts = np.concatenate([[0], np.cumsum(lengths)])[:-1]
    out = np.zeros(int(main.sum()), dtype=np.int64)
    ostarts = np.concatenate([[0], np.cumsum(main)])[:-1]
    rows = np.flatnonzero(keep & (main > 0))
    if len(rows):
        n = main[rows]
        src = np.repeat(starts[rows], n) + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
        dst = np.repeat(ostarts[rows], n) + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
        out[dst] = ids[src]
    return out, main.copy()


# A request-sized table hashes all its hashed categorical columns in one pass
# (``hash_columns``): per-column hashing costs a few numpy steps per byte position whatever the
# column's length (docs/BENCHMARKS.md, "Measurements behind code choices").
SMALL_BATCH_VALUES = 1 << 16


def plainly_hashed(f: FeatureSpec) -> bool:
    """A categorical feature hashed from its values' canonical strings (no vocabulary)."""
    return f.kind == CATEGORICAL and f.vocab is None


def _hash_small(
    schema: FeatureSchema, data, source: str, skip: frozenset[str] = frozenset()
) -> dict[str, np.ndarray]:
    """Bucket ids of every plainly hashed categorical column (no vocabulary, not dictionary
    encoded), hashed together; the same ids ``sparse_values`` gives one column at a time."""
    feats, arrs = [], []
    for f in schema.sparse_features:
        if not plainly_hashed(f) or f.name in skip:
            continue
        col = data.column(f.column)
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
        t = col.type
        if pa.types.is_dictionary(t) or pa.types.is_nested(t):
            continue  # the per-column path handles (or refuses, naming the column) these
        try:
            arrs.append(canonical_strings(col))
        except HashTypeError as e:
            raise column_error(source, f.column, f"{f.kind} feature {f.name!r}: {e}") from None
        feats.append(f)
    hashed = hash_columns(arrs, [f.num_buckets for f in feats], schema.hash_seed)
    return {f.name: h for f, h in zip(feats, hashed)}


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def type_problem(kind: str, t: pa.DataType) -> str | None:
    """What is wrong with a column of Arrow type ``t`` holding ``kind`` (``"label"``, or a
    feature kind), or None: the one rule the conversion below and the footer check before
    training (``ranking.data.reader``) share."""
    numeric = pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
    if kind == "label":
        return None if numeric else f"label has type {t}, expected 0/1 numbers"
    if kind == DENSE:
        ok = numeric or pa.types.is_null(t) or pa.types.is_decimal(t)
        return None if ok else f"has type {t}, expected a number"
    if kind == CATEGORICAL:
        ok = not _is_list(t) and id_type_ok(t)
        return None if ok else f"has type {t}, expected strings or integers"
    if pa.types.is_null(t):
        return None
    if not _is_list(t):
        return f"has type {t}, expected a list"
    if not id_type_ok(t.value_type):
        return f"has type {t}, expected a list of strings or integers"
    return None


def dense_values(
    f: FeatureSpec,
    col: pa.Array | pa.ChunkedArray,
    source: str,
    checks: RowChecks | None = None,
) -> np.ndarray:
    """One dense column: ``[n]`` Arrow numbers -> ``[n]`` float32 (fill, clip, transform).
    A null or NaN is a missing value (``fill``); an infinite one is a bad row."""
    t = col.type
    problem = type_problem(DENSE, t)
    if problem:
        raise column_error(source, f.column, f"dense feature {f.name!r} {problem}")
    x = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False) if len(col) else np.zeros(0)
    inf = np.isinf(x)
    if inf.any():
        checks = checks if checks is not None else RowChecks(source, len(x))
        checks.flag(
            "dense",
            f.column,
            inf,
            lambda i: f"dense feature {f.name!r} is {x[i]:g}; expected a finite number or null",
        )
        x = np.where(inf, np.nan, x)
    x = np.where(np.isnan(x), f.fill, x)
    if f.clip is not None:
        x = np.clip(x, f.clip[0], f.clip[1])
    if f.transform == "log1p":
        x = np.log1p(np.maximum(x, 0.0))
    elif f.transform == "signed_log1p":
        x = np.sign(x) * np.log1p(np.abs(x))
    return x.astype(np.float32)


def sparse_values(
    schema: FeatureSchema,
    f: FeatureSpec,
    col: pa.Array | pa.ChunkedArray,
    source: str,
    checks: RowChecks | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One sparse column -> (ids ``[total]`` int64, lengths ``[n]`` int64)."""
    t = col.type
    problem = type_problem(f.kind, t)
    if problem:
        raise column_error(source, f.column, f"{f.kind} feature {f.name!r} {problem}")
    checks = checks if checks is not None else RowChecks(source, len(col))
    if f.kind == CATEGORICAL:
        return _bucket(schema, f, col, source), np.ones(len(col), dtype=np.int64)
    if pa.types.is_null(t):
        return np.zeros(0, np.int64), np.zeros(len(col), np.int64)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    lengths = (
        pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    )
    limit = checks.max_list_items
    if limit is not None and len(lengths) and int(lengths.max()) > limit:
        checks.flag(
            "list_length",
            f.column,
            lengths > limit,
            lambda i: (
                f"{f.kind} feature {f.name!r} has {lengths[i]} ids; the limit is {limit} "
                f"(data.max_list_items)"
            ),
        )
    flat = pc.list_flatten(col)
    bad = _utf8_problem_rows(flat, checks)
    if bad is not None:
        rows = np.zeros(len(col), dtype=bool)
        rows[pc.list_parent_indices(col).to_numpy()[bad]] = True
        checks.flag(
            "utf8",
            f.column,
            rows,
            lambda i: f"{f.kind} feature {f.name!r} holds a string that is not UTF-8",
        )
        flat = _null_where(flat, bad)
    ids = _bucket(schema, f, flat, source) if len(flat) else np.zeros(0, np.int64)
    cap = f.max_length if f.is_sequence else schema.max_list_length
    if len(lengths) and int(lengths.max()) > cap:
        pos = np.arange(len(ids), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        ids = ids[pos < cap]
        lengths = np.minimum(lengths, cap)
    return ids, lengths


def _bucket(schema: FeatureSchema, f: FeatureSpec, arr, source: str) -> np.ndarray:
    try:
        if f.vocab is None:
            return hash_array(arr, f.num_buckets, schema.hash_seed)
        vocab = load_vocab(resolve_vocab_path(schema, f))
        if len(vocab) + 2 > f.num_buckets:
            raise column_error(
                source,
                f.column,
                f"vocabulary of {f.name!r} has {len(vocab)} values; num_buckets must be >= {len(vocab) + 2}, got {f.num_buckets}",
            )
        return vocab_lookup(arr, vocab)
    except HashTypeError as e:
        raise column_error(source, f.column, f"{f.kind} feature {f.name!r}: {e}") from None
    except OSError as e:
        raise column_error(
            source, f.column, f"cannot read vocabulary file of {f.name!r}: {e}"
        ) from None


def resolve_vocab_path(schema: FeatureSchema, f: FeatureSpec) -> Path:
    """A feature's vocabulary file; a relative path is relative to the schema file's folder."""
    p = Path(f.vocab or "")
    if not p.is_absolute() and schema.source not in ("<dict>", ""):
        cand = Path(schema.source).parent / p
        if cand.exists() or not p.exists():
            return cand
    return p


def label_values(
    col: pa.Array | pa.ChunkedArray,
    column: str,
    source: str,
    checks: RowChecks | None = None,
) -> np.ndarray:
    """One label column: ``[n]`` 0/1 values -> ``[n]`` float32; a null or any other value is a
    bad row (placeholder 0)."""
    problem = type_problem("label", col.type)
    if problem:
        raise column_error(source, column, problem)
    checks = checks if checks is not None else RowChecks(source, len(col))
    y = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False) if len(col) else np.zeros(0)
    null = np.zeros(len(y), dtype=bool)
    if col.null_count:
        null = pc.is_null(col).to_numpy(zero_copy_only=False)
        checks.flag("label", column, null, lambda i: "label is null; expected 0 or 1")
    bad = (y != 0) & (y != 1) & ~null
    checks.flag("label", column, bad, lambda i: f"label is {float(y[i]):g}; expected 0 or 1")
    return np.where(bad | null, 0.0, y).astype(np.float32)


# ------------------------------------------------------------------------------ numpy -> Batch
def to_batch(schema: FeatureSchema, cols: FeatureColumns) -> Batch:
    """``FeatureColumns`` -> ``Batch`` (dense ``[B, Nd]``, KJT over ``schema.sparse_keys``,
    labels ``[B, n_tasks]``); tensors share memory with the arrays where possible."""
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    def kjt(keys: list[str], stride: int) -> KeyedJaggedTensor:
        values = np.concatenate([cols.ids[k] for k in keys]) if keys else np.zeros(0, np.int64)
        lengths = np.concatenate([cols.lengths[k] for k in keys]) if keys else np.zeros(0, np.int64)
        return KeyedJaggedTensor(
            keys=keys,
            values=torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)),
            lengths=torch.from_numpy(np.ascontiguousarray(lengths, dtype=np.int64)),
            stride=stride,
        )

    sequences = seq_of = None
    if schema.sequence_keys:
        keys = schema.sequence_keys
        if cols.seq_of is None:
            sequences = kjt(keys, len(cols))
        else:
            sequences = kjt(keys, len(cols.lengths[keys[0]]))
            seq_of = torch.from_numpy(np.ascontiguousarray(cols.seq_of, dtype=np.int64))
    return Batch(
        torch.from_numpy(np.ascontiguousarray(cols.dense)),
        kjt(schema.sparse_keys, len(cols)),
        torch.from_numpy(np.ascontiguousarray(cols.labels)),
        sequences=sequences,
        seq_of=seq_of,
    )


def batch_from_arrow(
    schema: FeatureSchema,
    data: pa.Table | pa.RecordBatch,
    source: str = "<arrow>",
    with_labels: bool = True,
) -> Batch:
    """Arrow rows -> ``Batch``. Every feature column must be present (``DataError`` otherwise)."""
    return to_batch(schema, columns_from_arrow(schema, data, source, with_labels))


# ------------------------------------------------------------------------------ dicts (serving)
def table_from_rows(
    schema: FeatureSchema, rows: list[dict[str, Any]], with_labels: bool = False
) -> pa.Table:
    """Per-candidate feature dicts -> an Arrow table with every schema column; a missing key is
    a null. Categorical values may be strings or integers, mixed."""
    cols = {}
    for f in schema.features:
        vals = [r.get(f.column) for r in rows]
        cols[f.column] = column_from_values(f, vals)
    if with_labels:
        for c in schema.label_columns:
            vals = [r.get(c) for r in rows]
            try:
                cols[c] = pa.array(vals, pa.float64())
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as e:
                raise column_error("<rows>", c, f"label: {e}") from None
    return pa.table(cols) if cols else pa.table({"_": pa.nulls(len(rows))})


def table_from_columns(
    schema: FeatureSchema,
    columns: dict[str, list[Any]],
    n: int,
    skip: frozenset[str] = frozenset(),
) -> pa.Table:
    """``table_from_rows`` from per-feature value lists of ``n`` rows (``None`` = missing; a
    feature absent from ``columns`` is missing in every row); features named in ``skip`` are
    left out (see ``columns_from_arrow``)."""
    cols = {}
    for f in schema.features:
        if f.name in skip:
            continue
        vals = columns.get(f.column)
        cols[f.column] = column_from_values(f, vals if vals is not None else [None] * n)
    return pa.table(cols) if cols else pa.table({"_": pa.nulls(n)})


def column_from_values(f: FeatureSpec, vals: list[Any]) -> pa.Array:
    """One feature's values from per-row dicts (``None`` = missing) -> an Arrow array of the
    type ``columns_from_arrow`` reads for that kind (``DataError`` naming the column)."""
    try:
        if f.kind == DENSE:
            if set(map(type, vals)) <= _NUMBER_TYPES:  # fast path: one C-level conversion
                return pa.array(vals, pa.float64())
            for v in vals:
                if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
                    raise column_error(
                        "<rows>",
                        f.column,
                        f"dense feature {f.name!r} got {v!r}, expected a number or null",
                    )
            return pa.array(vals, pa.float64())
        if f.kind == CATEGORICAL:
            return _categorical_array(f, vals)
        lists = []
        for v in vals:
            if v is not None and not isinstance(v, list | tuple):
                raise column_error(
                    "<rows>", f.column, f"{f.kind} feature {f.name!r} got {v!r}, expected a list"
                )
            lists.append(None if v is None else list(v))
        flat = _categorical_array(f, [x for v in lists if v is not None for x in v])
        lengths = [0 if v is None else len(v) for v in lists]
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        mask = pa.array([v is None for v in lists])
        return pa.ListArray.from_arrays(offsets, flat, mask=mask)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
        raise column_error("<rows>", f.column, f"{f.kind} feature {f.name!r}: {e}") from None


_NUMBER_TYPES = {float, int, type(None)}
_STR_TYPES = {str, type(None)}
_INT_TYPES = {int, type(None)}


def _categorical_array(f: FeatureSpec, vals: list[Any]) -> pa.Array:
    """Strings stay strings; integers (and integral floats) become their decimal form, exactly
    as ``canonical_strings`` does for an integer column."""
    types = set(map(type, vals))
    if types <= _STR_TYPES or types <= _INT_TYPES:
        # fast path: all strings, or all ints (hashed as their decimal form, like an integer
        # Parquet column); anything Arrow refuses (a lone surrogate, an int over int64) falls
        # through to the per-value loop, which names the problem.
        try:
            return pa.array(vals, pa.string() if types <= _STR_TYPES else pa.int64())
        except (pa.ArrowException, UnicodeEncodeError, OverflowError):
            pass
    out = []
    for v in vals:
        problem = None if v is None else categorical_problem(v, sys.maxsize)
        if problem is not None:
            raise column_error(
                "<rows>", f.column, f"{f.kind} feature {f.name!r} got {v!r:.80}: {problem[1]}"
            )
        out.append(v if v is None or isinstance(v, str) else str(int(v)))
    return pa.array(out, pa.string())


def batch_from_rows(
    schema: FeatureSchema, rows: list[dict[str, Any]], with_labels: bool = False
) -> Batch:
    """Per-candidate feature dicts -> ``Batch`` (the serving path; labels zeros unless
    ``with_labels``). Goes through ``batch_from_arrow``: the same hashing and transforms."""
    table = table_from_rows(schema, rows, with_labels)
    return batch_from_arrow(schema, table, source="<rows>", with_labels=with_labels)
