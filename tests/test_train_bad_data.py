"""The training job under bad data and I/O faults (#26).

The corpus: more than 20 bad files or directories, one per problem, over a schema with every
column kind (dense, categorical of strings and of integers, id list, label). Each has its one-line
message, and the stage that catches it:

- ``footer``: ``mixrank train`` refuses it before spawning, from the Parquet footers (exit 2,
  one line, no run directory);
- ``read``: only the rows show it; the reader (the code every rank runs) raises a ``DataError``
  naming file, row group, row and column under ``on_bad_rows: fail``, and under ``skip`` drops
  exactly the bad rows, counted per cause against counts computed here from the file.

Then real torchrun jobs (2 ranks, gloo): a bad row met while training (one line, exit 2), the
``skip`` policy end to end (``summary.json`` against the files' own counts), the fraction
limit, a data file deleted mid-run (clear error; restore it and the rerun resumes), and a
checkpoint write that fails (the newest complete checkpoint stays the newest; the rerun
resumes from it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from ranking.cli import main as cli
from ranking.data.errors import DataError
from ranking.data.reader import ParquetBatches
from ranking.features import FeatureSchema

ROWS = 2048  # rows per good file
SCHEMA = {
    "name": "kinds",
    "hash_seed": 0,
    "max_list_length": 4,
    "tasks": [{"name": "click", "label": "label"}],
    "groups": ["a", "b"],
    "features": [
        {"name": "d1", "kind": "dense", "transform": "log1p", "group": "a"},
        {"name": "d2", "kind": "dense", "group": "a"},
        {"name": "cat", "kind": "categorical", "num_buckets": 64, "dim": 8, "group": "a"},
        {"name": "cat_i", "kind": "categorical", "num_buckets": 64, "dim": 8, "group": "b"},
        {"name": "tags", "kind": "id_list", "num_buckets": 64, "dim": 8, "group": "b"},
    ],
}


def good_table(rows: int = ROWS, seed: int = 0) -> pa.Table:
    """Rows of every column kind with a learnable signal (the label follows ``cat``)."""
    rng = np.random.default_rng(seed)
    cat = rng.integers(0, 20, rows)
    tags = [[f"t{x}" for x in rng.integers(0, 30, rng.integers(0, 4))] for _ in range(rows)]
    label = (rng.random(rows) < np.where(cat % 2 == 0, 0.8, 0.2)).astype(np.int64)
    return pa.table(
        {
            "d1": rng.exponential(3.0, rows),
            "d2": rng.integers(-5, 5, rows),
            "cat": pa.array([f"c{x}" for x in cat]),
            "cat_i": rng.integers(0, 50, rows),
            "tags": pa.array(tags, pa.list_(pa.string())),
            "label": label,
        }
    )


def _set(t: pa.Table, col: str, arr) -> pa.Table:
    return t.set_column(t.schema.get_field_index(col), col, arr)


def _with(t: pa.Table, col: str, row: int, value, typ=None) -> pa.Table:
    vals = t.column(col).to_pylist()
    vals[row] = value
    return _set(t, col, pa.array(vals, typ or t.schema.field(col).type))


def _invalid_utf8(strings: list[str], bad_row: int) -> pa.Array:
    """A string array whose value at ``bad_row`` is the bytes ``b"\\xff\\xfe"`` (not UTF-8:
    Arrow checks UTF-8 only when asked, so such files exist)."""
    raw = [s.encode() for s in strings]
    raw[bad_row] = b"\xff\xfe"
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in raw])]).astype(np.int32)
    return pa.Array.from_buffers(
        pa.string(), len(raw), [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(raw))]
    )


def _bad_utf8_list(t: pa.Table, row: int) -> pa.Table:
    col = t.column("tags").combine_chunks()
    flat = col.flatten().to_pylist()
    at = int(col.offsets[row].as_py())
    if col.value_lengths()[row].as_py() == 0:  # give the row one element to spoil
        vals = t.column("tags").to_pylist()
        vals[row] = ["x"]
        t = _set(t, "tags", pa.array(vals, pa.list_(pa.string())))
        col = t.column("tags").combine_chunks()
        flat = col.flatten().to_pylist()
        at = int(col.offsets[row].as_py())
    values = _invalid_utf8(flat, at)
    return _set(t, "tags", pa.ListArray.from_arrays(col.offsets, values))


def _write(t: pa.Table, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(t, path, **kw)
    return path


# ------------------------------------------------------------------------------ the corpus
# Each case builds, under a directory, the data set to point data.train at (a file, a
# directory or a glob, beside one good file where a directory), and gives the message expected
# in the one line. Footer cases name the file; read cases the file, row group, row and column.
def _dir_with(bad: pa.Table | None, name: str = "bad.parquet", **kw):
    def build(root: Path) -> tuple[str, Path]:
        _write(good_table(), root / "a.parquet")
        if bad is not None:
            _write(bad, root / name, **kw)
        return str(root), root / name

    return build


def _raw_file(content: bytes):
    def build(root: Path) -> tuple[str, Path]:
        _write(good_table(), root / "a.parquet")
        (root / "bad.parquet").write_bytes(content)
        return str(root), root / "bad.parquet"

    return build


def _truncated(root: Path) -> tuple[str, Path]:
    _write(good_table(), root / "a.parquet")
    data = (root / "a.parquet").read_bytes()
    (root / "bad.parquet").write_bytes(data[: len(data) // 2])
    return str(root), root / "bad.parquet"


def _glob_nothing(root: Path) -> tuple[str, Path]:
    _write(good_table(), root / "a.parquet")
    return str(root / "*.parq"), root / "*.parq"


def _no_parquet(root: Path) -> tuple[str, Path]:
    root.mkdir(parents=True)
    (root / "data.csv").write_text("d1,label\n1,0\n")
    return str(root), root


def _all_empty(root: Path) -> tuple[str, Path]:
    _write(good_table().slice(0, 0), root / "a.parquet")
    _write(good_table().slice(0, 0), root / "b.parquet")
    return str(root), root


def _mixed_schemas(root: Path) -> tuple[str, Path]:
    # two files whose types differ: each is checked against the schema on its own (an integer
    # and a string categorical both hash), so the one with a wrong type is named
    _write(good_table(), root / "a.parquet")
    _write(_set(good_table(seed=1), "cat", pa.array(np.arange(ROWS))), root / "b.parquet")
    _write(
        _set(good_table(seed=2), "d2", pa.array([str(i) for i in range(ROWS)])), root / "c.parquet"
    )
    return str(root), root / "c.parquet"


def _label_null_second_row_group(root: Path) -> tuple[str, Path]:
    _write(good_table(), root / "a.parquet")
    _write(_with(good_table(), "label", ROWS - 3, None), root / "bad.parquet", row_group_size=1000)
    return str(root), root / "bad.parquet"


G = good_table()
FOOTER_CASES = {
    "label_string": (
        _dir_with(_set(G, "label", G.column("label").cast(pa.string()))),
        "column 'label': label has type string, expected 0/1 numbers",
    ),
    "label_null": (
        _dir_with(_with(G, "label", 10, None)),
        "column 'label': label has 1 null(s) by the file's column statistics",
    ),
    "label_null_second_row_group": (
        _label_null_second_row_group,
        "column 'label': label has 1 null(s)",
    ),
    "dense_string": (
        _dir_with(_set(G, "d1", G.column("d1").cast(pa.string()))),
        "column 'd1': dense feature 'd1' has type string, expected a number",
    ),
    "dense_list": (
        _dir_with(_set(G, "d2", pa.array([[1.0]] * ROWS))),
        "column 'd2': dense feature 'd2' has type list<element: double>, expected a number",
    ),
    "categorical_list": (
        _dir_with(_set(G, "cat", pa.array([["a"]] * ROWS))),
        "column 'cat': categorical feature 'cat' has type list<element: string>, expected strings",
    ),
    "categorical_struct": (
        _dir_with(_set(G, "cat_i", pa.array([{"a": 1}] * ROWS))),
        "column 'cat_i': categorical feature 'cat_i' has type struct<a: int64>, expected strings",
    ),
    "id_list_scalar": (
        _dir_with(_set(G, "tags", pa.array(["x"] * ROWS))),
        "column 'tags': id_list feature 'tags' has type string, expected a list",
    ),
    "id_list_of_booleans": (
        _dir_with(_set(G, "tags", pa.array([[True]] * ROWS))),
        "column 'tags': id_list feature 'tags' has type list<element: bool>, expected a list of",
    ),
    "categorical_timestamps": (
        _dir_with(_set(G, "cat", pa.array(np.arange(ROWS).astype("datetime64[s]")))),
        "column 'cat': categorical feature 'cat' has type timestamp[ms], expected strings",
    ),
    "missing_column": (_dir_with(G.drop(["cat_i"])), "column 'cat_i': missing"),
    "empty_file": (_raw_file(b""), "not a readable Parquet file"),
    "not_parquet": (_raw_file(b"d1,label\n1,0\n"), "not a readable Parquet file"),
    "truncated": (_truncated, "not a readable Parquet file"),
    "mixed_schemas": (_mixed_schemas, "column 'd2': dense feature 'd2' has type string"),
    "glob_nothing": (_glob_nothing, "data.train: no file or directory matches"),
    "no_parquet_files": (_no_parquet, "directory holds no *.parquet files"),
    "zero_rows": (_all_empty, "the data set has no rows"),
}


def _schema_file(root: Path) -> Path:
    path = root / "schema.yaml"
    path.write_text(yaml.safe_dump(SCHEMA))
    return path


def _config(root: Path, train: str, valid: str | None = None, **over) -> Path:
    cfg = {
        "name": "bad-data",
        "schema": str(_schema_file(root)),
        "model": {"arch": "rankmixer", "dim": 16, "num_tokens": 2, "num_layers": 1, "ffn_mult": 2},
        "data": {"train": train, "batch_size": 256, "eval_batch_size": 1024},
        "train": {"epochs": 1, "lr": 0.003, "log_every": 4, "threads": 1, "seed": 3},
    }
    if valid:
        cfg["data"]["valid"] = valid
    for key, value in over.items():
        section, _, name = key.partition("__")
        cfg[section][name] = value
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("case", sorted(FOOTER_CASES))
def test_footer_corpus_is_refused_before_spawning(case, tmp_path, capsys):
    """Exit 2, exactly one line naming the file (or pattern) and the column, nothing spawned,
    no run directory."""
    build, message = FOOTER_CASES[case]
    train, named = build(tmp_path / "data")
    cfg = _config(tmp_path, train)
    rc = cli(["train", "--config", str(cfg), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("mixrank: error: "), err
    assert message in err[0] and str(named) in err[0], err[0]
    assert not (tmp_path / "run").exists()


def test_bad_validation_set_is_named_by_its_key(tmp_path, capsys):
    train, _ = _dir_with(None)(tmp_path / "train")
    valid, named = _dir_with(_set(G, "label", G.column("label").cast(pa.string())))(
        tmp_path / "valid"
    )
    cfg = _config(tmp_path, train, valid)
    rc = cli(["train", "--config", str(cfg), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("mixrank: error: data.valid: ") and str(named) in err
    assert "\n" not in err and not (tmp_path / "run").exists()


def test_a_file_without_rows_is_skipped_with_a_warning(tmp_path, capsys):
    """An empty file (as Spark writes for an empty partition) among good ones: one warning line
    naming it; the data set is the other files' rows."""
    from ranking.train.commands import check_data
    from ranking.train.config import load_experiment

    root = tmp_path / "data"
    _write(good_table(), root / "a.parquet")
    _write(good_table().slice(0, 0), root / "empty.parquet")
    check_data(load_experiment(_config(tmp_path, str(root))))
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mixrank: warning: data.train: {root / 'empty.parquet'}: no rows; skipped"]
    reader = ParquetBatches(FeatureSchema.from_dict(SCHEMA), str(root), 256, shuffle=False)
    assert reader.num_rows == ROWS


# ------------------------------------------------------------------------------ while reading
def _corrupt_page(root: Path) -> tuple[Path, str]:
    """A file whose footer is intact and whose first column chunk's bytes are not."""
    path = _write(good_table(), root / "bad.parquet", compression="zstd")
    meta = pq.ParquetFile(path).metadata
    col = meta.row_group(0).column(0)
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    data = bytearray(path.read_bytes())
    for i in range(start + 16, start + col.total_compressed_size - 8):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    return path, "cannot read row group 0"


READ_CASES = {
    # name: (table, the cause it counts under when skipped (None: it cannot be skipped, the
    # column as a whole is unusable), expected message)
    "categorical_fractional_float": (
        _set(G, "cat_i", pa.array(np.arange(ROWS) + 0.5)),
        None,
        "column 'cat_i': categorical feature 'cat_i': expected integral values, got fractional",
    ),
    "label_two": (_with(G, "label", 10, 2), "label", "column 'label': label is 2 at row 10"),
    "label_minus_one": (_with(G, "label", 7, -1), "label", "label is -1 at row 7"),
    "label_nan": (
        _set(G, "label", pa.array(np.where(np.arange(ROWS) == 5, np.nan, 1.0))),
        "label",
        "column 'label': label is nan at row 5",
    ),
    "dense_inf": (
        _with(G, "d1", 33, float("inf")),
        "dense",
        "column 'd1': dense feature 'd1' is inf at row 33, expected a finite number or null",
    ),
    "dense_minus_inf": (
        _with(G, "d2", 34, -np.inf, pa.float64()),
        "dense",
        "dense feature 'd2' is -inf at row 34",
    ),
    "categorical_not_utf8": (
        _set(G, "cat", _invalid_utf8(G.column("cat").to_pylist(), 40)),
        "utf8",
        "column 'cat': categorical feature 'cat' holds a string that is not UTF-8 at row 40",
    ),
    "id_list_not_utf8": (
        _bad_utf8_list(G, 41),
        "utf8",
        "column 'tags': id_list feature 'tags' holds a string that is not UTF-8 at row 41",
    ),
    "id_list_over_limit": (
        _with(G, "tags", 42, [f"t{i}" for i in range(40)]),
        "list_length",
        "column 'tags': id_list feature 'tags' has 40 ids at row 42, the limit is 32",
    ),
}


def _reader(path, on_bad_rows="fail", batch_size=256):
    return ParquetBatches(
        FeatureSchema.from_dict(SCHEMA),
        str(path),
        batch_size,
        shuffle=False,
        on_bad_rows=on_bad_rows,
        max_list_items=32,
        unit_rows=500,
    )


@pytest.mark.parametrize("case", sorted(READ_CASES))
def test_read_corpus_fails_naming_file_row_group_row_and_column(case, tmp_path):
    table, cause, message = READ_CASES[case]
    path = _write(table, tmp_path / "bad.parquet")
    with pytest.raises(DataError) as e:
        list(_reader(path))
    assert str(e.value).startswith(f"{path}: row group 0: "), str(e.value)
    assert message in str(e.value) and "\n" not in str(e.value)
    if cause is None:  # not a bad row: skipping does not apply
        with pytest.raises(DataError, match="expected integral values"):
            list(_reader(path, "skip"))
        return
    dropped = [b.bad_rows for b in _reader(path, "skip")]
    assert [d for d in dropped if d] == [{cause: 1}]


def _reference_bad_rows(t: pa.Table) -> dict[str, np.ndarray]:
    """Bad rows of a table by cause, computed here without the reader's code."""
    label = t.column("label").to_pylist()
    causes = {
        "label": np.array([v is None or v != v or v not in (0, 1) for v in label]),
        "dense": np.zeros(t.num_rows, bool),
        "utf8": np.zeros(t.num_rows, bool),
        "list_length": pc.list_value_length(t.column("tags")).to_numpy() > 32,
    }
    for c in ("d1", "d2"):
        causes["dense"] |= np.isinf(np.asarray(t.column(c).to_pylist(), dtype=float))
    for c in ("cat",):
        for i, v in enumerate(t.column(c).combine_chunks().view(pa.binary()).to_pylist()):
            try:
                v.decode()
            except UnicodeDecodeError:
                causes["utf8"][i] = True
    lists = t.column("tags").combine_chunks()
    parents = pc.list_parent_indices(lists).to_numpy()
    for j, v in enumerate(lists.flatten().view(pa.binary()).to_pylist()):
        try:
            v.decode()
        except UnicodeDecodeError:
            causes["utf8"][parents[j]] = True
    return causes


def _many_bad_rows() -> pa.Table:
    """Every read case's bad row in one table (rows 5-42), one row with two causes (33: an
    infinite dense value and a bad label), and one more in the second row group (1500)."""
    label = np.asarray(G.column("label").to_pylist(), dtype=float)
    label[[10, 7, 5, 33, 1500]] = [2, -1, np.nan, 2, 3]
    d2 = np.asarray(G.column("d2").to_pylist(), dtype=float)
    d2[34] = -np.inf
    t = _set(G, "label", pa.array(label))
    t = _with(_set(t, "d2", pa.array(d2)), "d1", 33, float("inf"))
    t = _set(t, "cat", _invalid_utf8(t.column("cat").to_pylist(), 40))
    t = _bad_utf8_list(_with(t, "tags", 42, [f"t{i}" for i in range(40)]), 41)
    return t


def test_skip_drops_exactly_the_bad_rows_and_counts_them(tmp_path):
    """``skip`` yields the good rows only (the same rows, in the same order, as the file without
    the bad ones) and counts the dropped rows per cause, against causes computed here."""
    t = _many_bad_rows()
    path = _write(t, tmp_path / "bad.parquet", row_group_size=1024)
    ref = _reference_bad_rows(t)
    bad_any = np.zeros(t.num_rows, bool)
    for m in ref.values():
        bad_any |= m
    assert int(bad_any.sum()) == 9  # rows 5, 7, 10, 33, 34, 40, 41, 42, 1500
    batches = list(_reader(path, "skip"))
    dropped: dict[str, int] = {}
    for b in batches:
        for c, n in b.bad_rows.items():
            dropped[c] = dropped.get(c, 0) + n
    assert sum(dropped.values()) == int(bad_any.sum())
    assert set(dropped) == {c for c, m in ref.items() if m.any()}
    for c, n in dropped.items():  # row 33 counts under one of its two causes
        assert int(ref[c].sum()) - 1 <= n <= int(ref[c].sum())
    got = np.concatenate([b.labels[:, 0].numpy() for b in batches])
    want = np.asarray(t.column("label").to_pylist(), dtype=float)[~bad_any]
    np.testing.assert_array_equal(got, want)
    assert sum(len(b.labels) for b in batches) == t.num_rows - 9
    examples = {}
    for b in batches:
        examples.update(b.bad_examples)
    assert examples["label"].startswith(f"{path}: row group 0: column 'label': label is ")
    assert set(examples) == set(dropped)


def test_skip_resumes_exactly(tmp_path):
    """``skip_batches`` under ``skip``: the resumed stream is the rest of the uninterrupted one,
    rows and dropped counts alike (a batch keeps its place in the stream; only its bad rows go)."""
    path = _write(_many_bad_rows(), tmp_path / "bad.parquet", row_group_size=512)
    schema = FeatureSchema.from_dict(SCHEMA)

    def reader():
        return ParquetBatches(
            schema,
            str(path),
            128,
            seed=5,
            on_bad_rows="skip",
            max_list_items=32,
            unit_rows=256,
            shuffle_buffer=512,
        )

    full = list(reader())
    for k in (1, 5, len(full) - 1):
        r = reader()
        r.skip_batches(k)
        rest = list(r)
        assert len(rest) == len(full) - k
        for a, b in zip(full[k:], rest, strict=True):
            assert a.bad_rows == b.bad_rows
            assert a.labels.equal(b.labels) and a.dense.equal(b.dense)
            assert a.sparse.values().equal(b.sparse.values())


def test_row_numbers_are_rows_of_the_file(tmp_path):
    """A bad row in the third row group is named by that row group and its row in the file."""
    path = _write(_with(G, "label", 2000, 5), tmp_path / "bad.parquet", row_group_size=700)
    with pytest.raises(
        DataError,
        match=r"bad.parquet: row group 2: column 'label': label is 5 "
        r"at row 2000, expected 0 or 1",
    ):
        list(_reader(path))


def test_nan_in_a_dense_column_is_a_missing_value_not_a_bad_row(tmp_path):
    t = _with(G, "d1", 3, float("nan"))
    path = _write(t, tmp_path / "nan.parquet")
    b = next(iter(_reader(path)))
    assert b.dense[3, 0].item() == 0.0 and not b.bad_rows  # fill 0.0, then log1p(0) = 0


def test_a_corrupt_page_fails_even_when_skipping(tmp_path):
    path, message = _corrupt_page(tmp_path)
    for policy in ("fail", "skip"):
        with pytest.raises(DataError, match=message) as e:
            list(_reader(path, policy))
        assert str(e.value).startswith(str(path))


# ------------------------------------------------------------------------------ real torchrun
def _train(cfg: Path, run: Path, *extra: str, env: dict | None = None, timeout: int = 300):
    cmd = [sys.executable, "-m", "ranking.cli", "train", "--config", str(cfg), "--nproc", "2"]
    cmd += ["--run-dir", str(run), *extra]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def _one_error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("mixrank: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.mark.slow
def test_bad_row_met_while_training_is_one_line_exit_2(tmp_path):
    """#26: a label of 2 at row 10 of one file is not in the footer; both ranks would die with
    tracebacks. Now: one line naming file, row group, row and column; exit code 2."""
    root = tmp_path / "data"
    _write(good_table(), root / "a.parquet")
    _write(_with(good_table(seed=1), "label", 10, 2), root / "b.parquet")
    proc = _train(_config(tmp_path, str(root)), tmp_path / "run")
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_error_line(proc)
    assert f"{root / 'b.parquet'}: row group 0: column 'label': label is 2 at row 10" in line
    assert len(proc.stderr.splitlines()) < 40, proc.stderr


def _skip_data(root: Path) -> tuple[Path, dict[str, int]]:
    """Two files of 2048 rows with a few bad rows of two causes; their counts from the files."""
    a = good_table(seed=4)
    for r in (3, 700, 1500):
        a = _with(a, "label", r, 2)
    b = _with(good_table(seed=5), "d1", 99, float("inf"))
    _write(a, root / "a.parquet")
    _write(b, root / "b.parquet")
    counts = {}
    for t in (a, b):
        for c, m in _reference_bad_rows(t).items():
            if m.any():
                counts[c] = counts.get(c, 0) + int(m.sum())
    return root, counts


@pytest.mark.slow
def test_skip_policy_end_to_end_counts_in_summary(tmp_path):
    """``on_bad_rows: skip``: the job finishes; ``summary.json`` counts every epoch's dropped
    rows per cause (2 epochs over 2 x 2048 rows: every row is read, each rank 8 full batches)."""
    root, counts = _skip_data(tmp_path / "data")
    cfg = _config(
        tmp_path, str(root), train__epochs=2, data__on_bad_rows="skip", data__max_bad_fraction=0.01
    )
    proc = _train(cfg, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["bad_rows"]["train"] == {c: 2 * n for c, n in sorted(counts.items())}
    assert "bad rows skipped" in proc.stderr
    assert "row group 0: column 'label': label is 2" in summary["bad_rows"]["examples"]["label"]


@pytest.mark.slow
def test_skip_policy_fails_past_the_fraction(tmp_path):
    root, _ = _skip_data(tmp_path / "data")
    cfg = _config(tmp_path, str(root), data__on_bad_rows="skip", data__max_bad_fraction=0.0005)
    proc = _train(cfg, tmp_path / "run")
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_error_line(proc)
    assert "more than data.max_bad_fraction=0.0005" in line and "first: " in line


def _wait_for(pred, timeout: float, proc=None) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        if proc is not None and proc.poll() is not None:
            return pred()
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_data_file_deleted_mid_run_then_restored_resumes(tmp_path):
    """A data file deleted while the job runs: one line naming it, exit 2; the newest complete
    checkpoint is intact, and once the file is back the same command resumes from it. Under
    ``skip``, with bad rows in both files: the resumed run's counts are every epoch's (they
    come back from the checkpoint; the batches it skips are not read again)."""
    from ranking.train import checkpoint as ckpt

    root, counts = _skip_data(tmp_path / "data")
    epochs = 12
    cfg = _config(
        tmp_path,
        str(root),
        train__epochs=epochs,
        train__checkpoint_every=4,
        data__on_bad_rows="skip",
        data__max_bad_fraction=0.01,
    )
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ranking.cli", "train", "--config", str(cfg), "--nproc", "2"]
    cmd += ["--run-dir", str(run)]
    proc = subprocess.Popen(
        cmd,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert _wait_for(lambda: ckpt.latest(run / "checkpoints") is not None, 240, proc)
    shutil.move(root / "b.parquet", tmp_path / "b.parquet")
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 2, err[-3000:]

    class P:
        stderr = err

    line = _one_error_line(P)
    assert f"{root / 'b.parquet'}: no such file" in line, line
    saved = ckpt.latest(run / "checkpoints")
    assert saved is not None and 4 <= ckpt.read_marker(saved)["step"] < epochs * 8
    shutil.move(tmp_path / "b.parquet", root / "b.parquet")
    again = _train(cfg, run)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {saved.name}" in again.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == epochs * summary["steps_per_epoch"] == epochs * 8
    assert summary["bad_rows"]["train"] == {c: epochs * n for c, n in sorted(counts.items())}


@pytest.mark.slow
def test_failed_checkpoint_write_keeps_the_previous_one_newest(tmp_path):
    """A checkpoint write that fails (here ENOSPC, from the fault-injecting storage writer):
    one line saying so and naming the checkpoint that stays the newest; no directory a resume
    takes for complete; the rerun resumes from the previous checkpoint."""
    from ranking.train import checkpoint as ckpt

    root = tmp_path / "data"
    _write(good_table(seed=8), root / "a.parquet")
    cfg = _config(tmp_path, str(root), train__epochs=3, train__checkpoint_every=4)
    run = tmp_path / "run"
    proc = _train(cfg, run, env={"MIXRANK_FAULT_CHECKPOINT": "8"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_error_line(proc)
    assert "step-00000008.partial: checkpoint of step 8 could not be written" in line, line
    assert "No space left on device" in line
    assert (
        f"the newest complete checkpoint is still {run / 'checkpoints' / 'step-00000004'}" in line
    )
    assert [s for s, _ in ckpt.complete_checkpoints(run / "checkpoints")] == [4]
    again = _train(cfg, run)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step-00000004" in again.stderr


@pytest.mark.slow
def test_checkpoint_on_a_full_filesystem(tmp_path):
    """The same with a real ENOSPC: the checkpoint directory on a 320 KiB tmpfs, which holds the
    first checkpoint (about 220 KB) but not the second (skipped where mounting is not allowed)."""
    from ranking.train import checkpoint as ckpt

    root = tmp_path / "data"
    _write(good_table(seed=8), root / "a.parquet")
    cfg = _config(tmp_path, str(root), train__epochs=3, train__checkpoint_every=4)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(run / "checkpoints")],
        capture_output=True,
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mount.stderr.decode().strip()}")
    try:
        proc = _train(cfg, run)
        assert proc.returncode == 2, proc.stderr[-3000:]
        line = _one_error_line(proc)
        assert "checkpoint of step 8 could not be written" in line, line
        assert "No space left on device" in line, line
        assert [s for s, _ in ckpt.complete_checkpoints(run / "checkpoints")] == [4]
        assert ckpt.latest(run / "checkpoints") == run / "checkpoints" / "step-00000004"
    finally:
        subprocess.run(["umount", str(run / "checkpoints")], capture_output=True)
