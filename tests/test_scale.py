"""Scale (#23): the criteo_large preset (Zipf ids over a huge range, hashed hidden values, in
bounded memory) and ``mixrank bench scale --quick`` end to end at tiny sizes."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc

import numpy as np
import pyarrow.parquet as pq
import yaml

from ranking.data.synth import (
    RANK,
    ZIPF,
    LargeGenerator,
    hashed_hidden,
    splitmix64,
    write_synthetic,
    zipf_ids,
)


def test_splitmix64_reference_values():
    # SplitMix64 seeded with 0: its first outputs (the published reference sequence)
    state = np.arange(1, 4, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    got = splitmix64(state - np.uint64(0x9E3779B97F4A7C15))
    assert [hex(int(x)) for x in got] == [
        "0xe220a8397b1dcdaf",
        "0x6e789e6aa1b965f4",
        "0x6c45d188009454f",
    ]


def test_hashed_hidden_is_standard_normal_and_deterministic():
    ids = np.arange(200000)
    vec, bias = hashed_hidden(ids, salt=7)
    assert vec.shape == (200000, RANK) and bias.shape == (200000,)
    assert abs(bias.mean()) < 0.01 and abs(bias.std() - 1) < 0.01
    assert abs(vec.std() - 1 / np.sqrt(RANK)) < 0.01
    _, b2 = hashed_hidden(ids[[5, 150000]], salt=7)
    np.testing.assert_array_equal(b2, bias[[5, 150000]])
    assert not np.allclose(hashed_hidden(ids[:100], salt=8)[1], bias[:100])


def test_zipf_ids_follow_the_power_law_over_a_huge_range():
    rng = np.random.default_rng(0)
    card, mult, shift = 10**9, 1_000_003, 17
    ids = zipf_ids(rng, 400000, card, mult, shift)
    assert ids.min() >= 0 and ids.max() < card
    # rank r (1-based) has id (mult * (r - 1) + shift) % card; P(rank 1) = P(x < 2) of the
    # continuous power law on [1, card + 1): (1 - 2^(1-s)) / (1 - (card+1)^(1-s))
    e = 1 - ZIPF
    p1 = (1 - 2.0**e) / (1 - (card + 1.0) ** e)
    frac = (ids == shift).mean()
    assert abs(frac - p1) < 4 * np.sqrt(p1 * (1 - p1) / len(ids))
    assert (ids == (mult + shift) % card).mean() < frac


def test_criteo_large_memory_is_bounded_and_rows_round_trip(tmp_path):
    tracemalloc.start()
    gen = LargeGenerator(0, 0, id_range=10**10)  # a table of 10^10 values would be 400 GB
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 300 * 2**20, peak
    files = write_synthetic("criteo_large", 30000, tmp_path, chunk_rows=7000, id_range=10**10,
                            progress=False)  # fmt: skip
    t = pq.read_table(files)
    assert t.num_rows == 30000
    c3 = t["C3"].to_numpy()
    assert c3.max() < 10**10 and c3.max() > 10**8  # spread over the range
    # the planted probability: its mean matches the label rate (calibrated near 30%)
    p = gen.click_probability(t)
    y = t["label"].to_numpy()
    assert abs(p.mean() - y.mean()) < 0.015 and 0.25 < y.mean() < 0.35
    # and it ranks: rows with a higher planted probability click more
    hi = p > np.median(p)
    assert y[hi].mean() > y[~hi].mean() + 0.15


def test_bench_scale_quick(tmp_path, repo_root):
    """One tiny ``mixrank bench scale --quick`` run (train over 2 ranks, checkpoint, export,
    load + serve): the plan's per-rank estimate against the table-bytes formula of the schema,
    rows trained against steps x batch x ranks, rows in the files against rows written."""
    work = tmp_path / "w"
    proc = subprocess.run(
        [sys.executable, "-m", "ranking.cli", "bench", "scale", "--quick", "--work", str(work),
         "--data-rows", "3000", "--table-rows", "5000", "--candidates", "64",
         "--steps", "4", "--batch-size", "128", "--skip-data-curve"],
        capture_output=True, text=True, timeout=180, cwd=repo_root,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    data = next(r for r in recs if r["case"] == "data")
    assert data["rows_read_back"] == 3000
    (r,) = [r for r in recs if r["case"] == "table_rows"]
    schema = yaml.safe_load((repo_root / "configs/schemas/criteo_large_1e7.yaml").read_text())
    sizes = {f["name"]: 5000 if f["name"] == "C3" else f["num_buckets"]
             for f in schema["features"] if f["kind"] == "categorical"}  # fmt: skip
    dp = set(r["data_parallel_tables"])
    rows = sum(sizes.values())
    # sharded tables: fp32 weights (dim 16) + one rowwise-Adagrad fp32 per row, over the ranks;
    # data-parallel ones: weights + AdamW's two fp32 per weight, on each of the 2 ranks
    want = sum(4 * (n * 16 + n) for t, n in sizes.items() if t not in dp)
    want = (want + sum(2 * 4 * n * 16 * 3 for t, n in sizes.items() if t in dp)) / 2**20
    assert abs(sum(r["estimate_mib"].values()) - want) < 1e-6 * want
    assert set(r["peak_rss_mib"]) == {"0", "1"}
    for rank, est in r["estimate_mib"].items():
        assert r["peak_rss_mib"][rank] > est  # a rank holds at least its shards
    assert r["rows_trained"] == 4 * 128 * 2
    assert r["rows_seen_by_trainer"] == 3000
    assert r["checkpoint_bytes"] > 4 * rows * 16  # the weights at least
    serve = r["serve"]
    assert serve["first_answer_s"] > 0 and set(serve["latency_ms"]) == {"64"}
    # --quick also exports the final checkpoint with int8 tables and serves that artifact
    (ex,) = [x for x in recs if x["case"] == "export"]
    assert ex["table_dtype"] == "int8" and ex["export_peak_anon_mib"]["0"] > 0
    assert ex["artifact_bytes"] < r["artifact_bytes"]  # C3's 5,000 x 16 fp32 -> 20-byte rows
    assert set(ex["serve"]["latency_ms"]) == {"64"}
