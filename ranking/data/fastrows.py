"""Rows of Python values (a ranking request's candidates and context) -> bucket ids of their
plainly hashed categorical features, in one pass.

``scan`` is the serving path's per-request hashing: the C extension ``_fastrows``
(ranking/data/_fastrows.c, built by ``pip install -e .`` where a C compiler is at hand) reads
the dicts and hashes each string's UTF-8 bytes in place, instead of gathering the values in
Python, building Arrow arrays and hashing them with numpy (about 10x slower per request:
docs/BENCHMARKS.md, "Measurements behind code choices"). Without the extension the same
function runs on that Python path
(``AVAILABLE`` says which); tests/test_fastrows.py checks both against ``hash_value`` one value
at a time.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ranking.data.hashing import hash_concatenated

try:
    from ranking.data import _fastrows
except ImportError:  # not built (no C compiler at install time): the Python path below
    _fastrows = None

AVAILABLE = _fastrows is not None

ABSENT = -1  # the row (or the context) does not have the key
PRESENT = 1  # a column that is not hashed here: the row has the key (any value)
_STRS = {str, type(None)}


def scan(
    rows: list,
    context: dict,
    columns: tuple[str, ...],
    buckets: tuple[int, ...],
    seed: int,
    max_chars: int,
    native: bool | None = None,
) -> tuple[np.ndarray, tuple[int, ...]] | None:
    """Read ``rows`` (dicts) and ``context`` over ``columns``; ``buckets[j]`` is column j's
    bucket count if it is a plainly hashed categorical column, else 0.

    Returns ``(ids, mixed)``: ``ids [k, n + 1]`` int64 with, for column j and row i (row n is
    the context), the bucket of a string value, ``NULL_BUCKET`` (0) for None, ``ABSENT`` (-1)
    when the row lacks the key; for a column that is not hashed, ``PRESENT`` (1) or ``ABSENT``.
    ``mixed``: the hashed columns holding a value other than a str or None (the caller handles
    them; their ids only tell present (``>= 0``) from ``ABSENT``). ``None`` when the rows need per-value checks: a row that is
    not a dict, a key that is not in ``columns``, a string over ``max_chars`` characters or
    with no UTF-8 form (a lone surrogate). ``native``: force (True) or bypass (False) the C
    extension; by default it is used where built.
    """
    if native is None:
        native = AVAILABLE
    if native:
        if not AVAILABLE:
            raise RuntimeError(
                "ranking.data._fastrows is not built (pip install -e . with a C compiler)"
            )
        ids = np.empty((len(columns), len(rows) + 1), dtype=np.int64)
        mixed = _fastrows.scan(rows, context, columns, buckets, seed, max_chars, ids)
        return None if mixed is None else (ids, mixed)
    return _scan_python(rows, context, columns, buckets, seed, max_chars)


def _scan_python(rows, context, columns, buckets, seed, max_chars):
    n, k = len(rows), len(columns)
    if not all(type(r) is dict for r in rows):
        return None
    keys = set().union(*rows)
    if not keys <= set(columns):
        return None
    ids = np.full((k, n + 1), ABSENT, dtype=np.int64)
    mixed, hashed, values, sizes, present = [], [], [], [], []
    for j, (col, nb) in enumerate(zip(columns, buckets)):
        sent, shared = col in keys, col in context
        if not (sent or shared):
            continue
        has = (
            np.fromiter((col in r for r in rows), dtype=bool, count=n)
            if sent
            else np.zeros(n, dtype=bool)
        )
        has = np.append(has, shared)
        if nb < 2:
            ids[j][has] = PRESENT
            continue
        vals = [r.get(col) for r in rows] if sent else [None] * n
        vals.append(context.get(col))
        if not set(map(type, vals)) <= _STRS:
            mixed.append(j)
            ids[j][has] = PRESENT
            continue
        hashed.append(j)
        values += vals
        sizes.append(n + 1)
        present.append(has)
    if hashed:
        try:
            arr = pa.array(values, pa.string())
        except (pa.ArrowException, UnicodeEncodeError):  # a lone surrogate
            return None
        longest = pc.max(pc.utf8_length(arr)).as_py()  # characters, as len(str) counts them
        if longest is not None and longest > max_chars:
            return None
        out = hash_concatenated(arr, sizes, [buckets[j] for j in hashed], seed)
        for j, b, has in zip(hashed, out, present):
            ids[j] = np.where(has, b, ABSENT)
    return ids, tuple(mixed)
