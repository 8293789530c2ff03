"""Hashing, vocabularies and row -> Batch conversion, against slow pure-Python references."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ranking.data.convert import batch_from_arrow, batch_from_rows, columns_from_arrow
from ranking.data.errors import DataError
from ranking.data.hashing import hash_array, hash_value, vocab_lookup
from ranking.features import (
    PRESETS,
    FeatureSchema,
    SchemaError,
    load_schema,
)

MASK = 2**64 - 1


def ref_bucket(value, num_buckets: int, seed: int) -> int:
    """The documented hash, one value at a time in plain Python integers."""
    if value is None:
        return 0
    h = 0xCBF29CE484222325
    for b in str(value).encode("utf-8"):
        h = ((h ^ b) * 0x100000001B3) & MASK
    z = (h + (seed + 1) * 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    z ^= z >> 31
    return 1 + z % (num_buckets - 1)


# Literal constants (FNV-1a-64 of "" and "a" are the published test vectors
# 0xcbf29ce484222325 and 0xaf63dc4c8601ec8c; the buckets below follow from the formula).
def test_fnv_published_vectors():
    from ranking.data.hashing import fnv1a64

    h = fnv1a64(pa.array(["", "a", "foobar"]))
    assert [int(x) for x in h] == [0xCBF29CE484222325, 0xAF63DC4C8601EC8C, 0x85944171F73967E8]


def test_literal_buckets():
    assert hash_value("a", 1000, 7) == ref_bucket("a", 1000, 7)
    got = [int(x) for x in hash_array(pa.array(["", "a", "hello", "héllo", "42", None]), 1000, 7)]
    assert got == [712, 274, 219, 273, 469, 0]


def test_hash_matches_reference_on_mixed_strings():
    rng = np.random.default_rng(1)
    alphabet = list("abcXYZ019 _-é漢")
    vals = ["".join(rng.choice(alphabet, rng.integers(0, 25))) for _ in range(2000)]
    vals += [None, "", "x" * 100]
    for nb, seed in [(2, 0), (1000, 0), (2**20, 123456789), (7, 2**40)]:
        got = hash_array(pa.array(vals, pa.string()), nb, seed)
        exp = [ref_bucket(v, nb, seed) for v in vals]
        assert got.tolist() == exp
        assert got.min() >= 0 and got.max() < nb


def test_hash_on_sliced_large_and_dictionary_arrays():
    vals = ["aa", None, "bbb", "c", "aa", "dddd", "", "c"]
    exp = [ref_bucket(v, 97, 3) for v in vals]
    full = pa.array(["pre", *vals, "post"])
    assert hash_array(full.slice(1, len(vals)), 97, 3).tolist() == exp
    assert hash_array(pa.array(vals, pa.large_string()), 97, 3).tolist() == exp
    assert hash_array(pa.array(vals).dictionary_encode(), 97, 3).tolist() == exp
    assert hash_array(pa.chunked_array([vals[:3], vals[3:]]), 97, 3).tolist() == exp
    fixed = ["ab12", "cd34", None, "ef56"]  # the equal-length fast path
    assert hash_array(pa.array(fixed), 97, 3).tolist() == [ref_bucket(v, 97, 3) for v in fixed]


def test_ints_hash_like_their_decimal_strings():
    ints = [0, 42, -7, 2**62, None]
    exp = [ref_bucket(None if v is None else str(v), 5000, 9) for v in ints]
    assert hash_array(pa.array(ints, pa.int64()), 5000, 9).tolist() == exp
    big = [2**64 - 1, 3]
    assert hash_array(pa.array(big, pa.uint64()), 5000, 9).tolist() == [
        ref_bucket(v, 5000, 9) for v in big
    ]
    assert hash_array(pa.array([42, 7], pa.int8()), 5000, 9).tolist() == [
        exp[1],
        ref_bucket("7", 5000, 9),
    ]
    assert hash_value(42, 5000, 9) == hash_value("42", 5000, 9) == exp[1]
    assert hash_array(pa.array([42.0, None]), 5000, 9).tolist() == [exp[1], 0]


def test_hash_columns_equals_one_column_at_a_time():
    from ranking.data.hashing import canonical_strings, hash_columns

    rng = np.random.default_rng(5)
    alphabet = list("abc019_é漢")
    cols = [
        pa.array(["".join(rng.choice(alphabet, rng.integers(0, 12))) for _ in range(40)]),
        pa.array(["pre", "x", None, "", "yy", "post"]).slice(1, 4),  # sliced, with a null
        pa.array(["a" * 30, None], pa.large_string()),
        canonical_strings(pa.array([42, -7, None], pa.int64())),
        pa.array([], pa.string()),
    ]
    nbs, seed = [2, 97, 5000, 2**20, 11], 123
    got = hash_columns(cols, nbs, seed)
    for c, nb, g in zip(cols, nbs, got):
        assert g.tolist() == [ref_bucket(v, nb, seed) for v in c.to_pylist()]
    assert hash_columns([], [], 0) == []
    with pytest.raises(ValueError, match="num_buckets must be >= 2"):
        hash_columns([cols[0]], [1], 0)


def test_small_tables_hash_together_like_large_ones(monkeypatch):
    import ranking.data.convert as convert

    rows = random_rows(200, seed=4)
    table = batch_table(rows)
    together = convert.columns_from_arrow(SCHEMA, table)
    monkeypatch.setattr(convert, "SMALL_BATCH_VALUES", 0)  # force one column at a time
    alone = convert.columns_from_arrow(SCHEMA, table)
    for k in SCHEMA.sparse_keys:
        np.testing.assert_array_equal(together.ids[k], alone.ids[k])
        np.testing.assert_array_equal(together.lengths[k], alone.lengths[k])


def test_hash_stable_across_processes_with_other_hashseed():
    code = (
        "import pyarrow as pa; from ranking.data.hashing import hash_array;"
        "print(hash_array(pa.array(['user_17', 'frappe', '42', None]), 4099, 5).tolist())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    exp = [ref_bucket(v, 4099, 5) for v in ["user_17", "frappe", "42", None]]
    assert out.stdout.strip() == str(exp)


def test_vocab_lookup():
    vocab = pa.array(["b", "a", "7"])
    got = vocab_lookup(pa.array(["a", "b", "zz", None, "7"]), vocab)
    assert got.tolist() == [3, 2, 1, 0, 4]
    assert vocab_lookup(pa.array([7, 8]), vocab).tolist() == [4, 1]


def test_vocab_lookup_small_and_large_paths_agree(monkeypatch):
    """Columns short next to the vocabulary use a cached dict, others Arrow's index_in: same
    ids, including duplicate vocabulary lines (the first wins), nulls, ints and unknown values."""
    import ranking.data.hashing as hashing

    rng = np.random.default_rng(2)
    vocab = pa.array([f"v{i}" for i in rng.integers(0, 300, 400)] + ["", "42"])
    vals = [None if rng.random() < 0.1 else f"v{i}" for i in rng.integers(0, 400, 500)]
    vals += ["", "42", "nope"]
    assert hashing._use_dict(256, 5000) and not hashing._use_dict(4096, 10)
    monkeypatch.setattr(hashing, "_use_dict", lambda n, v: True)
    small = hashing.vocab_lookup(pa.array(vals), vocab)
    ints = hashing.vocab_lookup(pa.array([42, None]), vocab)
    monkeypatch.setattr(hashing, "_use_dict", lambda n, v: False)
    assert small.tolist() == hashing.vocab_lookup(pa.array(vals), vocab).tolist()
    assert ints.tolist() == hashing.vocab_lookup(pa.array([42, None]), vocab).tolist()
    first = {}
    for i, v in enumerate(vocab.to_pylist()):
        first.setdefault(v, i + 2)
    assert small.tolist() == [0 if v is None else first.get(v, 1) for v in vals]


# ------------------------------------------------------------------------------ schemas
def test_presets_load_and_are_sized():
    for name in PRESETS:
        s = load_schema(name)
        assert s.name == name and s.tasks
    fr = load_schema("frappe")
    assert len(fr.sparse_features) == 10 and fr.num_dense == 0
    assert fr.feature("user").num_buckets >= 2 * 957 and fr.feature("item").num_buckets >= 2 * 4082
    cr = load_schema("criteo")
    assert [f.name for f in cr.dense_features] == [f"I{i}" for i in range(1, 14)]
    assert cr.sparse_keys == [f"C{i}" for i in range(1, 27)]
    ml = load_schema("movielens")
    assert ml.feature("genres").kind == "id_list" and ml.feature("genres").pooling == "mean"
    assert set(ml.groups) == {"user", "item", "context"}


def test_load_schema_errors(tmp_path):
    with pytest.raises(SchemaError, match="not a preset"):
        load_schema("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\ntasks: [{name: a, label: y}]\nfeatures: [{name: f, kind: dense, group: g, colour: red}]\n"
    )
    with pytest.raises(SchemaError, match=r"bad.yaml: features\[f\].colour: unknown key"):
        load_schema(str(bad))


# ------------------------------------------------------------------------------ conversion
SCHEMA = FeatureSchema.from_dict(
    {
        "name": "t",
        "hash_seed": 11,
        "max_list_length": 3,
        "tasks": [{"name": "click", "label": "y"}, {"name": "buy", "label": "y2"}],
        "features": [
            {"name": "u", "kind": "categorical", "num_buckets": 101, "dim": 4, "group": "a"},
            {"name": "n", "kind": "dense", "transform": "log1p", "fill": 2.0, "group": "a"},
            {"name": "tags", "kind": "id_list", "num_buckets": 53, "dim": 4, "group": "b"},
            {
                "name": "s",
                "kind": "dense",
                "transform": "signed_log1p",
                "clip": [-50, 50],
                "group": "b",
            },
            {
                "name": "k",
                "kind": "categorical",
                "num_buckets": 17,
                "dim": 4,
                "group": "b",
                "column": "kcol",
            },
        ],
    }
)


def ref_rows(schema, rows):
    """Slow per-row reference: (dense [B][Nd], {key: list of per-row id lists}, labels)."""
    dense, sparse = [], {k: [] for k in schema.sparse_keys}
    for r in rows:
        d = []
        for f in schema.dense_features:
            x = r.get(f.column)
            x = f.fill if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)
            if f.clip:
                x = min(max(x, f.clip[0]), f.clip[1])
            if f.transform == "log1p":
                x = math.log1p(max(x, 0.0))
            elif f.transform == "signed_log1p":
                x = math.copysign(math.log1p(abs(x)), x) if x else 0.0
            d.append(x)
        dense.append(d)
        for f in schema.sparse_features:
            v = r.get(f.column)
            if f.kind == "categorical":
                sparse[f.name].append([ref_bucket(v, f.num_buckets, schema.hash_seed)])
            else:
                vals = [] if v is None else v[: schema.max_list_length]
                sparse[f.name].append(
                    [ref_bucket(x, f.num_buckets, schema.hash_seed) for x in vals]
                )
    labels = [[float(r.get(c, 0)) for c in schema.label_columns] for r in rows]
    return dense, sparse, labels


def random_rows(n, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        r = {
            "u": None if rng.random() < 0.1 else f"user{rng.integers(0, 30)}",
            "n": None if rng.random() < 0.1 else float(rng.integers(-5, 1000)),
            "tags": None
            if rng.random() < 0.1
            else [f"t{x}" for x in rng.integers(0, 9, rng.integers(0, 6))],
            "s": None if rng.random() < 0.1 else float(rng.normal() * 100),
            "kcol": None if rng.random() < 0.1 else int(rng.integers(0, 40)),
            "y": int(rng.integers(0, 2)),
            "y2": int(rng.integers(0, 2)),
        }
        if i % 7 == 0:
            del r["u"]  # missing key
        rows.append(r)
    return rows


def assert_batch_matches(batch, schema, rows):
    dense, sparse, labels = ref_rows(schema, rows)
    assert batch.dense.dtype.is_floating_point and tuple(batch.dense.shape) == (
        len(rows),
        schema.num_dense,
    )
    np.testing.assert_allclose(
        batch.dense.numpy(), np.array(dense, dtype=np.float32), rtol=1e-6, atol=1e-6
    )
    assert batch.sparse.keys() == schema.sparse_keys
    jt = batch.sparse.to_dict()
    for k in schema.sparse_keys:
        got = [x.tolist() for x in jt[k].to_dense()]
        assert got == sparse[k], k
        assert jt[k].values().dtype.__str__() == "torch.int64"
    np.testing.assert_array_equal(batch.labels.numpy(), np.array(labels, dtype=np.float32))


def batch_table(rows):
    return pa.table(
        {
            "u": pa.array([r.get("u") for r in rows], pa.string()),
            "n": pa.array([r["n"] for r in rows], pa.float64()),
            "tags": pa.array([r["tags"] for r in rows], pa.list_(pa.string())),
            "s": pa.array([r["s"] for r in rows], pa.float32()),
            "kcol": pa.array([r["kcol"] for r in rows], pa.int64()),
            "y": pa.array([r["y"] for r in rows], pa.int8()),
            "y2": pa.array([bool(r["y2"]) for r in rows], pa.bool_()),
        }
    )


def test_batch_from_arrow_matches_reference_loop():
    rows = random_rows(300)
    table = batch_table(rows)
    rows32 = [{**r, "s": None if r["s"] is None else float(np.float32(r["s"]))} for r in rows]
    assert_batch_matches(batch_from_arrow(SCHEMA, table), SCHEMA, rows32)
    # record batches and slices of a table go through the same path
    assert_batch_matches(
        batch_from_arrow(SCHEMA, table.slice(13, 50).to_batches()[0]), SCHEMA, rows32[13:63]
    )


def test_batch_from_rows_matches_reference_and_arrow():
    rows = random_rows(120, seed=3)
    assert_batch_matches(batch_from_rows(SCHEMA, rows, with_labels=True), SCHEMA, rows)
    serving = batch_from_rows(SCHEMA, rows)
    assert float(serving.labels.abs().sum()) == 0.0
    # ints and their decimal strings, mixed in one request, give the same ids
    a = batch_from_rows(SCHEMA, [{"kcol": 42}, {"kcol": "42"}, {"kcol": 42.0}, {}])
    ids = a.sparse["k"].values().tolist()
    assert ids == [ref_bucket("42", 17, 11)] * 3 + [0]
    assert a.sparse["tags"].lengths().tolist() == [0, 0, 0, 0]


def test_real_frappe_rows_match_reference(shared_data):
    schema = load_schema("frappe")
    table = pq.read_table(shared_data / "frappe" / "valid.parquet").slice(0, 500)
    rows = table.to_pylist()
    assert_batch_matches(batch_from_arrow(schema, table), schema, rows)
    assert_batch_matches(batch_from_rows(schema, rows, with_labels=True), schema, rows)


def test_real_movielens_rows_match_reference(shared_data):
    schema = load_schema("movielens")
    table = pq.read_table(shared_data / "movielens100k" / "valid.parquet").slice(0, 400)
    rows = table.to_pylist()
    assert_batch_matches(batch_from_arrow(schema, table), schema, rows)


def test_vocab_features(tmp_path):
    (tmp_path / "u.txt").write_text("user3\nuser1\n")
    d = SCHEMA.to_dict()
    d["features"][0]["vocab"] = "u.txt"
    path = tmp_path / "s.yaml"
    import yaml

    path.write_text(yaml.safe_dump(d))
    schema = FeatureSchema.from_yaml(path)
    b = batch_from_rows(schema, [{"u": "user1"}, {"u": "user3"}, {"u": "other"}, {}])
    assert b.sparse["u"].values().tolist() == [3, 2, 1, 0]


# ------------------------------------------------------------------------------ errors
def _table(**cols):
    base = {"u": pa.array(["a"]), "n": pa.array([1.0]), "tags": pa.array([["x"]]), "s": pa.array([1.0]),
            "kcol": pa.array([1]), "y": pa.array([1]), "y2": pa.array([0])}  # fmt: skip
    base.update(cols)
    return pa.table({k: v for k, v in base.items() if v is not None})


@pytest.mark.parametrize(
    "cols, match",
    [
        ({"n": None}, r"f.parquet: column 'n': missing"),
        ({"n": pa.array(["1.5"])}, r"f.parquet: column 'n': dense feature 'n' has type string"),
        ({"y": pa.array([2])}, r"f.parquet: column 'y': label is 2 at row 0, expected 0 or 1"),
        ({"y2": pa.array([None], pa.int8())}, r"f.parquet: column 'y2': label is null"),
        ({"y": pa.array(["1"])}, r"f.parquet: column 'y': label has type string"),
        (
            {"tags": pa.array(["x"])},
            r"f.parquet: column 'tags': id_list feature 'tags' has type string",
        ),
        (
            {"kcol": pa.array([[1]])},
            r"f.parquet: column 'kcol': categorical feature 'k' has type list",
        ),
        (
            {"u": pa.array([True])},
            r"f.parquet: column 'u': categorical feature 'u': expected strings or integers",
        ),
    ],
)
def test_conversion_errors_name_file_and_column(cols, match):
    with pytest.raises(DataError, match=match):
        columns_from_arrow(SCHEMA, _table(**cols), source="f.parquet")


def test_rows_errors_name_the_field():
    with pytest.raises(DataError, match=r"column 'n': dense feature 'n' got 'abc'") as e:
        batch_from_rows(SCHEMA, [{"n": "abc"}])
    assert e.value.column == "n"
    with pytest.raises(DataError, match=r"column 'tags': id_list feature 'tags' got 'x'"):
        batch_from_rows(SCHEMA, [{"tags": "x"}])
    with pytest.raises(DataError, match=r"column 'u': categorical feature 'u' got 1.5"):
        batch_from_rows(SCHEMA, [{"u": 1.5}])


def test_float_ids_hash_alike_in_training_and_serving():
    """Integral floats are ids in both paths (1e16, -0.0, 42.0 -> the integer's digits);
    fractional floats are refused by both, naming the column."""
    import pyarrow as pa

    from ranking.data.errors import DataError

    schema = FeatureSchema.from_dict(
        {
            "name": "f",
            "tasks": [{"name": "t", "label": "label"}],
            "features": [{"name": "item", "kind": "categorical", "num_buckets": 10007,
                          "dim": 4, "group": "g"}],
        }
    )  # fmt: skip
    vals = [1e16, -0.0, 42.0, 123456789012.0]
    table = pa.table({"item": pa.array(vals, pa.float64()), "label": pa.array([0, 1, 0, 1])})
    trained = batch_from_arrow(schema, table).sparse["item"].values()
    served = batch_from_rows(schema, [{"item": v} for v in vals]).sparse["item"].values()
    as_ints = batch_from_rows(schema, [{"item": int(v)} for v in vals]).sparse["item"].values()
    assert trained.tolist() == served.tolist() == as_ints.tolist()
    bad = pa.table({"item": pa.array([1.5], pa.float64()), "label": pa.array([0])})
    with pytest.raises(DataError, match="item"):
        batch_from_arrow(schema, bad)
    with pytest.raises(DataError, match="item"):
        batch_from_rows(schema, [{"item": 1.5}])


def test_schema_refuses_two_features_on_one_column():
    from ranking.features import FeatureSchema, SchemaError

    with pytest.raises(SchemaError, match="column 'x' is the source of several features"):
        FeatureSchema.from_dict(
            {
                "name": "f",
                "tasks": [{"name": "t", "label": "label"}],
                "features": [
                    {"name": "a", "column": "x", "kind": "dense", "group": "g"},
                    {"name": "b", "column": "x", "kind": "categorical", "num_buckets": 8,
                     "dim": 4, "group": "g"},
                ],
            }
        )  # fmt: skip


def test_preset_name_is_not_shadowed_by_a_folder(tmp_path, monkeypatch):
    from ranking.features import load_schema

    (tmp_path / "frappe").mkdir()
    monkeypatch.chdir(tmp_path)
    assert load_schema("frappe").name == "frappe"
