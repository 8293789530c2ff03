"""The CPU benchmarks run end to end at tiny sizes (their timings are not asserted: the machines
are noisy; docs/BENCHMARKS.md holds measured numbers). A benchmark that crashes is a bug."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from ranking.model.config import load_experiment
from ranking.model.flops import forward_flops


def _bench(*args, timeout=300):
    proc = subprocess.run(
        [sys.executable, "-m", "ranking.cli", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _records(out):
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_bench_model_tiny(repo_root):
    out = _bench(
        "model",
        "--configs",
        "rankmixer_small",
        "tokenmixer_large_small",
        "dlrm_small",
        "--batch",
        "64",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--dtypes",
        "fp32",
        "bf16",
        "int8",
        "--regime-seconds",
        "0.2",
        "--int8-ab-reps",
        "3",
        "--json-only",
    )
    recs = _records(out)
    assert {(r["config"], r["dtype"]) for r in recs} == {
        (c, d)
        for c in ("rankmixer_small", "tokenmixer_large_small", "dlrm_small")
        for d in ("fp32", "bf16", "int8")
    }
    skipped = [r for r in recs if "skipped" in r]  # bf16 on a CPU without native bf16 only
    assert all(r["dtype"] == "bf16" and "no native bf16" in r["skipped"] for r in skipped)
    recs = [r for r in recs if "skipped" not in r]
    for r in recs:
        if r["dtype"] == "int8":  # over the int8 GEMM peak; its speed-ups in the same run
            assert r["int8_routes_gop_s"]["peak"] > 0 and r["int8_vs_fp32"] > 0
            assert r["int8_vs_fp32_paired"] > 0
            assert r["int8_weight_bits"] in (7, 8)
            # the timed peak is the fastest route that quantizes per row (torch.ao's does not)
            routes = {k: v for k, v in r["int8_routes_gop_s"].items() if k != "torch_ao_dynamic"}
            assert r["int8_peak_route"] == max((k for k in routes if k != "peak"), key=routes.get)
        cfg, schema = load_experiment(repo_root / "configs" / "models" / f"{r['config']}.yaml")
        assert r["flops_per_sample"] == pytest.approx(forward_flops(cfg, schema))
        assert r["samples_s"] > 0 and r["dense_gflop_s"] > 0 and r["frac_of_peak"] > 0
        if r["arch"] == "dlrm":
            assert "by_regime" not in r
        else:  # one micro-batch at a time between matmuls, per regime: at least 5 calls kept
            assert 1 <= len(r["by_regime"]) <= 2
            assert sum(g["calls"] for g in r["by_regime"]) >= 5
            assert all(g["frac_of_peak"] > 0 and g["peak_gflop_s"] > 0 for g in r["by_regime"])


class _ScriptedPeak:
    """A matmul "peak" whose timings follow a script (seconds per call)."""

    flops = 1e9

    def __init__(self, seconds):
        self.seconds = list(seconds)

    def __call__(self):
        return self.seconds.pop(0)


def test_by_regime_splits_calls_by_the_matmul_around_them():
    """Calls whose two matmuls disagree are dropped; the rest split into the slow and the fast
    regime, each call's rate against its own matmuls' (a 10 ms sleep of known "FLOPs")."""
    import time

    from benchmarks.bench_model import by_regime

    slow, fast = 1.0, 0.4  # matmul seconds: 1 and 2.5 GFLOP/s
    script = [slow] + [slow, slow] * 5 + [slow, fast] + [fast, fast] * 5
    out = by_regime(lambda: time.sleep(0.01), 0.005e9, _ScriptedPeak(script), 0.0, min_pairs=10)
    assert [g["calls"] for g in out] == [5, 5]
    assert [g["peak_gflop_s"] for g in out] == pytest.approx([1.0, 2.5])
    # fn runs at 0.005e9 / 0.01 s = 0.5 GFLOP/s (a little less: sleep overshoots)
    assert out[0]["frac_of_peak"] == pytest.approx(0.5 / 1.0, rel=0.25)
    assert out[1]["frac_of_peak"] == pytest.approx(0.5 / 2.5, rel=0.25)
    one = by_regime(lambda: None, 1.0, _ScriptedPeak([slow] * 11), 0.0, min_pairs=5)
    assert len(one) == 1 and one[0]["calls"] == 5


def test_ab_fused_pairs_the_two_calls_per_regime():
    """Fused and eager calls alternate between the same two matmuls; per regime each gets its
    ratio and the paired speed-up (scripted: fused 10 ms, eager 20 ms of 0.005 GFLOP)."""
    import time

    from benchmarks.bench_model import ab_fused

    slow, fast = 1.0, 0.4
    script = [slow, slow] * 5 + [slow, fast] + [fast, fast] * 5
    out, calls = ab_fused(
        lambda on: time.sleep(0.01 if on else 0.02),
        0.005e9,
        _ScriptedPeak(script),
        0.0,
        min_pairs=10,
    )
    assert [g["calls"] for g in out] == [5, 5] and len(calls) == 10
    assert [g["peak_gflop_s"] for g in out] == pytest.approx([1.0, 2.5])
    for g, rate in zip(out, (1.0, 2.5)):
        assert g["frac_fused"] == pytest.approx(0.5 / rate, rel=0.25)
        assert g["frac_eager"] == pytest.approx(0.25 / rate, rel=0.25)
        assert g["speedup"] == pytest.approx(2.0, rel=0.2)


def test_bench_model_ab_fused_tiny(tmp_path):
    png = tmp_path / "ab.png"
    out = _bench(
        "model",
        "--configs",
        "rankmixer_small",
        "--batch",
        "64",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--dtypes",
        "bf16",
        "--force-bf16",  # timed even where bf16 is not native (tiny shapes)
        "--regime-seconds",
        "0",
        "--ab-fused-seconds",
        "0.2",
        "--plot",
        str(png),
        "--json-only",
    )
    (r,) = _records(out)
    assert 1 <= len(r["ab_fused"]) <= 2 and sum(g["calls"] for g in r["ab_fused"]) >= 5
    assert all(g["frac_fused"] > 0 and g["frac_eager"] > 0 for g in r["ab_fused"])
    assert "ab_fused_calls" not in r  # the raw calls go to the plot only
    assert png.stat().st_size > 10_000


def test_regimes_split_only_where_the_groups_are_apart():
    from benchmarks.bench_model import _two_regimes

    # one regime with a 2.2x spread between its extremes (an outlier at each end): one group
    spread = [(r, 0) for r in (0.45, 0.65, 0.7, 0.7, 0.72, 0.75, 0.8, 1.0)]
    assert _two_regimes(spread) == [sorted(spread)]
    # two regimes 2.5x apart, each with its own spread: split between them
    fast = [(r, 1) for r in (1.7, 1.8, 1.85, 2.0)]
    assert _two_regimes(spread + fast) == [sorted(spread), sorted(fast)]
    assert _two_regimes([(1.0, 0)]) == [[(1.0, 0)]]


def test_bench_stack_without_gpu_says_so():
    out = _bench("stack", "--configs", "rankmixer_small")
    assert "needs a CUDA GPU" in out


def test_bench_data_tiny():
    recs = _records(
        _bench(
            "data", "--criteo-rows", "2000", "--repeats", "1", "--batch-size", "512", "--json-only"
        )
    )
    by = {r["dataset"]: r for r in recs}
    assert by["criteo"]["rows"] == 2000  # every synthetic row was read
    for r in recs:
        if "note" in r:  # frappe without ../shared/data
            assert r["note"].startswith("skipped")
            continue
        assert r["batches"] == -(-r["rows"] // 512)
        assert r["rows_per_s"] == pytest.approx(r["rows"] / r["seconds"], rel=0.02)


def test_bench_serve_tiny(tmp_path):
    """`mixrank bench serve` end to end on the default model with short phases: a real Ray
    Serve through its proxy, its no-op floor, HTTP, gRPC and concurrency 8; the ratios follow
    from the printed parts (the references are the means of the before/after in-process
    measurements). Direct ingress is left out here to keep the suite short: the same code
    path per mode, and tests/test_serving_direct.py serves through it."""
    png = tmp_path / "serve.png"
    out = _bench(
        "serve", "--models", "default", "--duration", "1", "--iters", "3", "--slices", "2",
        "--ingress", "proxy", "--plot", str(png),
        timeout=600,
    )  # fmt: skip
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recs = {r["ingress"]: r for r in _records(out) if r.get("model") == "default"}
    assert set(recs) == {"proxy"}
    for rec in recs.values():
        assert rec["errors"] == 0
        keys = ("raw_forward_cand_per_s", "answer_p50_ms", "forward_paced_p50_ms")
        for key in (*keys, f"forward_p50_ms_{rec['dtype']}"):
            assert rec[key] == pytest.approx((rec[f"{key}_before"] + rec[f"{key}_after"]) / 2)
            assert rec[key] == recs["proxy"][key]
        fwd = rec[f"forward_p50_ms_{rec['dtype']}"]
        assert rec["latency_ratio"] == pytest.approx(
            rec["http_p50_ms"] / (fwd + rec["noop_p50_ms"])
        )
        assert rec["latency_ratio_paced"] == pytest.approx(
            rec["http_p50_ms"] / (rec["forward_paced_p50_ms"] + rec["noop_p50_ms"])
        )
        assert rec["throughput_ratio"] == pytest.approx(
            rec["c8_cand_per_s"] / rec["raw_forward_cand_per_s"]
        )
        assert rec["noop_throughput_ratio"] == pytest.approx(
            rec["noop_c8_cand_per_s"] / rec["raw_forward_cand_per_s"]
        )
        assert rec["c8_cand_per_s"] > 0 and rec["grpc_p50_ms"] > 0
        # the forward floor: the Ranker's batching and forward with only the no-op's request work
        assert rec["floor_p50_ms"] > 0 and rec["floor_c8_cand_per_s"] > 0
        assert rec["floor_latency_ratio"] == pytest.approx(
            rec["floor_p50_ms"] / (fwd + rec["noop_p50_ms"])
        )
        assert rec["floor_throughput_ratio"] == pytest.approx(
            rec["floor_c8_cand_per_s"] / rec["raw_forward_cand_per_s"]
        )
        assert rec["latency_vs_floor"] == pytest.approx(rec["http_p50_ms"] / rec["floor_p50_ms"])
        assert rec["throughput_vs_floor"] == pytest.approx(
            rec["c8_cand_per_s"] / rec["floor_c8_cand_per_s"]
        )
        for key in ("latency_ratio", "throughput_ratio", "latency_vs_floor", "throughput_vs_floor"):
            # drift-paired: median of the slices
            assert len(rec[f"{key}_slices"]) == 2
            assert rec[f"{key}_paired"] == pytest.approx(statistics.median(rec[f"{key}_slices"]))
            assert all(r > 0 for r in rec[f"{key}_slices"])
    # --replot: the same figure from saved runs' output (here this run, twice), no measuring
    runs = [tmp_path / "run1.txt", tmp_path / "run2.txt"]
    for f in runs:
        f.write_text(out)
    again = tmp_path / "again.png"
    _bench("serve", "--replot", *map(str, runs), "--plot", str(again))
    assert again.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = tmp_path / "bad.txt"
    bad.write_text("table only\n")
    proc = subprocess.run(
        [sys.executable, "-m", "ranking.cli", "bench", "serve", "--replot", str(bad), "--plot", str(again)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert (
        proc.returncode != 0 and "no bench serve records" in proc.stderr and str(bad) in proc.stderr
    )
