"""``ranking.data.fastrows.scan``: the C extension and the pure-Python path against a slow loop
that follows the contract value by value, with the hash written out from its formula
(``ref_bucket`` of tests/test_features.py, from ranking/data/hashing.py's docstring), not taken
from the code under test."""

from __future__ import annotations

import random
import shutil
import sysconfig

import numpy as np
import pytest
from test_features import ref_bucket  # the hash written out from its formula

from ranking.data import fastrows
from ranking.data.hashing import hash_value

PATHS = [
    pytest.param(
        True, id="c", marks=pytest.mark.skipif(not fastrows.AVAILABLE, reason="not built")
    ),
    pytest.param(False, id="python"),
]
_MISSING = object()


def _reference(rows, context, columns, buckets, seed, max_chars):
    if any(type(r) is not dict for r in rows):
        return None
    if any(set(r) - set(columns) for r in rows):
        return None
    srcs = [*rows, context]
    ids = np.full((len(columns), len(srcs)), fastrows.ABSENT, dtype=np.int64)
    mixed = []
    for j, (col, nb) in enumerate(zip(columns, buckets)):
        vals = [s.get(col, _MISSING) for s in srcs]
        present = [v is not _MISSING for v in vals]
        if nb < 2 or any(v is not _MISSING and v is not None and type(v) is not str for v in vals):
            if nb >= 2:
                mixed.append(j)
            ids[j] = [fastrows.PRESENT if p else fastrows.ABSENT for p in present]
            continue
        for i, v in enumerate(vals):
            if v is _MISSING:
                continue
            if v is None:
                ids[j, i] = 0
                continue
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return None
            if len(v) > max_chars:
                return None
            ids[j, i] = ref_bucket(v, nb, seed)
    return ids, tuple(mixed)


COLUMNS = ("user", "item", "city", "price", "tag")
BUCKETS = (2, 1000, 2**40 + 7, 0, 97)  # price: not hashed here (a dense feature, say)
WORDS = ["", "a", "item-2067", "Zürich", "東京", "😀 emoji", "x" * 12, "naïve café"]


def _value(rng: random.Random, bad: bool):
    r = rng.random()
    if r < 0.1:
        return None
    if bad and r < 0.16:
        return rng.choice([7, 2.0, True, ["a"], {"k": 1}])  # not a string: a "mixed" column
    if bad and r < 0.19:
        return rng.choice(["\ud800", "y" * 13])  # no UTF-8 form; over max_chars = 12
    return rng.choice(WORDS) + (str(rng.randrange(50)) if rng.random() < 0.5 else "")[:12]


def _rows(rng: random.Random, bad: bool):
    n = rng.randrange(0, 7)
    rows = []
    for _ in range(n):
        row = {c: _value(rng, bad) for c in COLUMNS if rng.random() < 0.7}
        if bad and rng.random() < 0.03:
            row["colour"] = "red"  # not a column
        rows.append(row if not (bad and rng.random() < 0.02) else ["not", "a", "dict"])
    context = {c: _value(rng, bad) for c in COLUMNS if rng.random() < 0.3}
    return rows, context


@pytest.mark.parametrize("native", PATHS)
def test_scan_matches_the_value_by_value_reference(native):
    rng = random.Random(0)
    outcomes = set()
    for case in range(1500):
        rows, context = _rows(rng, bad=case % 2 == 1)
        seed = rng.choice([0, 1, 12345])
        want = _reference(rows, context, COLUMNS, BUCKETS, seed, 12)
        got = fastrows.scan(rows, context, COLUMNS, BUCKETS, seed, 12, native=native)
        if want is None:
            assert got is None, (rows, context)
            outcomes.add("none")
            continue
        assert got is not None, (rows, context)
        assert got[1] == want[1], (rows, context)
        outcomes.add("mixed" if want[1] else "ok")
        for j in range(len(COLUMNS)):
            if j in want[1]:  # only presence is defined for a mixed column
                np.testing.assert_array_equal(got[0][j] >= 0, want[0][j] >= 0)
            else:
                np.testing.assert_array_equal(got[0][j], want[0][j], err_msg=f"{rows} {context}")
    assert outcomes == {"none", "mixed", "ok"}  # the cases cover every outcome


def test_formula_agrees_with_the_vectorised_hash():
    """The test's own hash is the library's (so the reference above is the contract)."""
    for s in WORDS:
        for nb, seed in ((2, 0), (1000, 3), (2**40 + 7, 12345)):
            assert ref_bucket(s, nb, seed) == hash_value(s, nb, seed)


def test_c_extension_refuses_a_wrong_buffer():
    if not fastrows.AVAILABLE:
        pytest.skip("not built")
    from ranking.data import _fastrows

    out = np.empty((2, 3), dtype=np.int64)  # 2 rows need (k=2) x (n + 1 = 3): fine ...
    assert _fastrows.scan([{}, {}], {}, ("a", "b"), (5, 0), 0, 8, out) == ()
    with pytest.raises(ValueError, match="int64"):  # ... one row short is not
        _fastrows.scan([{}, {}], {}, ("a", "b"), (5, 0), 0, 8, np.empty((2, 2), np.int64))
    with pytest.raises(ValueError, match="int64"):
        _fastrows.scan([{}, {}], {}, ("a", "b"), (5, 0), 0, 8, np.empty((2, 3), np.int32))


def test_the_extensions_are_built_where_a_c_compiler_is():
    """``pip install -e .`` (make setup) builds it; a silent build failure would only show as
    a slower service."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc})")
    from serving import request

    assert fastrows.AVAILABLE, "ranking.data._fastrows is not built: run `make setup`"
    assert request.FAST_PROTO, "serving._fastproto is not built: run `make setup`"
