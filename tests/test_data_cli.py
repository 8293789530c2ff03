"""``mixrank data ...`` in-process (``ranking.cli.main``) and once as a subprocess."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from ranking.cli import main
from ranking.data.reader import ParquetBatches
from ranking.features import FeatureSchema, load_schema


def run_cli(args, capsys):
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize(
    "preset, rows", [("frappe", 30000), ("movielens", 20000), ("criteo", 20000)]
)
def test_synth_presets(tmp_path, capsys, preset, rows):
    out = tmp_path / preset
    rc, stdout, stderr = run_cli(
        [
            "data",
            "synth",
            "--preset",
            preset,
            "--rows",
            str(rows),
            "--out",
            str(out),
            "--chunk-rows",
            "8192",
        ],
        capsys,
    )
    assert rc == 0 and "rows/s" in stderr and "ETA" in stderr
    table = pq.read_table(out)
    assert table.num_rows == rows
    meta = pq.ParquetFile(json.loads(stdout)["files"][0]).metadata
    assert meta.row_group(0).num_rows == 8192  # written chunk by chunk
    rate = float(np.mean(table.column("label").to_numpy()))
    assert 0.25 <= rate <= 0.35
    schema = load_schema(preset)
    # the preset schema reads it: every row once
    assert sum(b.size for b in ParquetBatches(schema, out, 4096)) == rows
    # Zipf: the most frequent value of the first categorical is far above the median value
    col = schema.sparse_features[0].column
    counts = np.array(sorted(collections.Counter(table.column(col).to_pylist()).values()))
    assert counts[-1] > 10 * np.median(counts)


def test_synth_deterministic_by_seed(tmp_path, capsys):
    for name, seed in [("a", 1), ("b", 1), ("c", 2)]:
        main(["data", "synth", "--preset", "frappe", "--rows", "3000", "--out", str(tmp_path / name),
              "--seed", str(seed), "--quiet"])  # fmt: skip
    a, b, c = (pq.read_table(tmp_path / n) for n in "abc")
    assert a.equals(b) and not a.equals(c)


def test_synth_signal_is_in_the_interactions(tmp_path):
    """Per-cell click rates of daytime x weekday fit the labels better than the additive (logit)
    combination of the two marginals, by far more than sampling noise: the planted signal
    includes the pairwise interaction, which a first-order (logistic) model cannot represent."""
    from ranking.data.synth import write_synthetic

    write_synthetic("frappe", 200000, tmp_path, seed=0, progress=False)
    t = pq.read_table(tmp_path)
    y = t.column("label").to_numpy().astype(float)

    def codes(name):
        return np.unique(t.column(name).to_numpy(zero_copy_only=False), return_inverse=True)[1]

    def cell_rate(c):
        return (np.bincount(c, weights=y) / np.maximum(np.bincount(c), 1))[c].clip(1e-3, 1 - 1e-3)

    def ll(p):
        return float(np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))

    def logit(p):
        return np.log(p / (1 - p))

    a, b = codes("daytime"), codes("weekday")
    pair = cell_rate(a * 100 + b)
    m = y.mean()
    additive = 1 / (1 + np.exp(-(logit(cell_rate(a)) + logit(cell_rate(b)) - logit(m))))
    # Without an interaction, 2 * rows * gain ~ chi2(36): gain ~ 9e-5 +- 2e-5 (sampling noise).
    assert ll(pair) - ll(additive) > 6e-4


def test_convert_criteo_sample(tmp_path, capsys, shared_data):
    src = shared_data / "criteo_sample" / "train.txt"
    rc, stdout, _ = run_cli(["data", "convert-criteo", str(src), "--out", str(tmp_path)], capsys)
    assert rc == 0 and json.loads(stdout)["rows"] == 1000
    got = pq.read_table(tmp_path)
    assert got.num_rows == 1000 and got.column_names[0] == "label"
    names = ["Id", "Label", *got.column_names[1:]]
    types = {"Label": pa.int8(), **{f"I{i}": pa.int64() for i in range(1, 14)},
             **{f"C{i}": pa.string() for i in range(1, 27)}}  # fmt: skip
    ref = pacsv.read_csv(
        shared_data / "criteo_sample" / "train.tiny.csv",
        convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=True),
    ).slice(0, 1000)
    assert ref.column_names == names
    raw_lines = src.read_bytes().split(b"\n")
    short = [i for i, line in enumerate(raw_lines) if line.count(b"\t") < 39]
    assert len(short) == 498
    i = short[0]
    assert got.slice(i, 1).to_pylist()[0] == {
        ("label" if k == "Label" else k): v
        for k, v in ref.slice(i, 1).to_pylist()[0].items()
        if k != "Id"
    }
    ref = ref.drop_columns(["Id"]).rename_columns(got.column_names)
    assert got.equals(ref)
    assert got.column("C26").null_count >= 498


def test_convert_criteo_errors(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("1\t2\n" + "\t".join(["0"] * 41) + "\n")
    rc, _, err = run_cli(["data", "convert-criteo", str(bad), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "bad.txt: line 2: 41 fields, expected at most 40" in err
    bad.write_text("2\t1\n")
    rc, _, err = run_cli(["data", "convert-criteo", str(bad), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "bad.txt: column 'label': a value is not 0/1" in err
    rc, _, err = run_cli(
        ["data", "convert-criteo", str(tmp_path / "none.txt"), "--out", str(tmp_path)], capsys
    )
    assert rc == 2 and "none.txt: cannot open" in err


def test_inspect(tmp_path, capsys):
    t = pa.table({"label": pa.array([1, 0, 0, 1, 1], pa.int8()), "user": ["a", "b", None, "a", "c"],
                  "genres": pa.array([["x"], ["x", "y"], [], None, ["z"]])})  # fmt: skip
    pq.write_table(t, tmp_path / "d.parquet")
    rc, out, _ = run_cli(["data", "inspect", str(tmp_path / "d.parquet"), "--json"], capsys)
    info = json.loads(out)
    assert rc == 0 and info["rows"] == 5 and info["label_rate"] == {"label": pytest.approx(0.6)}
    cols = {c["name"]: c for c in info["columns"]}
    assert cols["user"]["distinct"] == 3 and cols["user"]["nulls"] == 1
    assert cols["genres"]["distinct"] == 3
    rc, out, _ = run_cli(["data", "inspect", str(tmp_path)], capsys)
    assert rc == 0 and "label rate (label): 0.6000" in out
    rc, _, err = run_cli(
        ["data", "inspect", str(tmp_path / "d.parquet"), "--schema", "frappe"], capsys
    )
    assert rc == 2 and "d.parquet: column 'item': missing" in err
    rc, _, err = run_cli(["data", "inspect", str(tmp_path / "*.csv")], capsys)
    assert rc == 2 and "no files match" in err


def test_vocab(tmp_path, capsys):
    rng = np.random.default_rng(0)
    users = [f"u{x}" for x in rng.zipf(1.5, 3000) % 50]
    genres = [[f"g{x}" for x in rng.integers(0, 6, rng.integers(0, 3))] for _ in range(3000)]
    t = pa.table({"label": pa.array(rng.integers(0, 2, 3000), pa.int8()), "user": users, "age": rng.integers(10, 15, 3000),
                  "genres": pa.array(genres, pa.list_(pa.string()))})  # fmt: skip
    pq.write_table(t, tmp_path / "d.parquet", row_group_size=1000)
    schema = tmp_path / "s.yaml"
    schema.write_text(
        "name: v\ntasks: [{name: click, label: label}]\nfeatures:\n"
        "  - {name: user, kind: categorical, num_buckets: 1000, dim: 4, group: a}\n"
        "  - {name: age, kind: categorical, num_buckets: 1000, dim: 4, group: a}\n"
        "  - {name: genres, kind: id_list, num_buckets: 1000, dim: 4, group: a}\n"
    )
    out = tmp_path / "vocab"
    rc, _stdout, _ = run_cli(["data", "vocab", "--schema", str(schema), "--data", str(tmp_path / "d.parquet"),
                             "--out", str(out), "--min-count", "2"], capsys)  # fmt: skip
    assert rc == 0
    counts = collections.Counter(users)
    expect = sorted((v for v, c in counts.items() if c >= 2), key=lambda v: (-counts[v], v))
    assert (out / "user.txt").read_text().splitlines() == expect
    age_counts = collections.Counter(str(a) for a in t.column("age").to_pylist())
    assert set((out / "age.txt").read_text().splitlines()) == set(age_counts)
    g = collections.Counter(x for row in genres for x in row)
    assert (out / "genres.txt").read_text().splitlines() == sorted(g, key=lambda v: (-g[v], v))
    # the written schema uses the vocabularies
    vs = FeatureSchema.from_yaml(out / "schema.yaml")
    assert vs.feature("user").num_buckets == len(expect) + 2
    b = next(iter(ParquetBatches(vs, tmp_path / "d.parquet", 3000, shuffle=False)))
    ids = b.sparse["user"].values().tolist()
    assert ids == [expect.index(u) + 2 if u in expect else 1 for u in users]


def test_cli_as_subprocess(tmp_path):
    env = {**os.environ, "PYTHONHASHSEED": "7"}
    r = subprocess.run(
        [sys.executable, "-m", "ranking.cli", "data", "synth", "--preset", "movielens", "--rows", "1000",
         "--out", str(tmp_path), "--quiet"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert pq.read_table(tmp_path).num_rows == 1000
    r = subprocess.run(
        [sys.executable, "-m", "ranking.cli", "data", "inspect", str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert (
        r.returncode == 2
        and "nope: no such file or directory" in r.stderr
        and "Traceback" not in r.stderr
    )


def test_vocab_schema_survives_export_to_a_self_contained_artifact(tmp_path, capsys):
    """An artifact of a model with vocabulary features carries copies of the vocab files: moved
    away from the originals, it maps ids exactly as the training-time schema did."""
    import shutil

    import torch

    from ranking.data.convert import batch_from_arrow
    from ranking.export import load_artifact, write_artifact
    from ranking.model.config import ModelConfig
    from ranking.model.ranker import build_model

    rng = np.random.default_rng(1)
    users = [f"u{x}" for x in rng.integers(0, 30, 500)]
    t = pa.table({"label": pa.array(rng.integers(0, 2, 500), pa.int8()), "user": users})
    pq.write_table(t, tmp_path / "d.parquet")
    (tmp_path / "s.yaml").write_text(
        "name: v\ntasks: [{name: click, label: label}]\nfeatures:\n"
        "  - {name: user, kind: categorical, num_buckets: 1000, dim: 8, group: a}\n"
    )
    rc, _, _ = run_cli(["data", "vocab", "--schema", str(tmp_path / "s.yaml"), "--data",
                        str(tmp_path / "d.parquet"), "--out", str(tmp_path / "voc")], capsys)  # fmt: skip
    assert rc == 0
    schema = FeatureSchema.from_yaml(tmp_path / "voc" / "schema.yaml")
    cfg = {"name": "v", "schema": "unused", "model": {"arch": "dlrm", "dlrm": {
                                                      "dense_arch": [8], "over_arch": [8]}}}  # fmt: skip
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict(cfg["model"]), schema).eval()
    want = torch.sigmoid(model(batch_from_arrow(schema, t)).logits)
    write_artifact(tmp_path / "art", model.state_dict(), config=cfg, schema=schema,
                   dtype="fp32", metrics={}, step=0)  # fmt: skip
    shutil.rmtree(tmp_path / "voc")  # the originals are gone
    moved = tmp_path / "elsewhere" / "art"
    moved.parent.mkdir()
    (tmp_path / "art").rename(moved)
    art = load_artifact(moved)
    assert (moved / "vocab" / "user.txt").is_file()
    got = art.predict(batch_from_arrow(art.schema, t))
    assert torch.allclose(got, want, atol=1e-6)


def test_convert_criteo_corrupt_gzip_is_a_clear_error(tmp_path, capsys):
    import gzip

    good = gzip.compress(b"0\t1\t2\n" * 2000)
    bad = good[:10] + b"\xff" * 64 + good[74:]  # a valid header, then a broken deflate stream
    (tmp_path / "x.txt.gz").write_bytes(bad)
    rc, _out, err = run_cli(["data", "convert-criteo", str(tmp_path / "x.txt.gz"), "--out",
                             str(tmp_path / "o"), "--quiet"], capsys)  # fmt: skip
    assert rc == 2
    assert "x.txt.gz" in err and "Traceback" not in err
