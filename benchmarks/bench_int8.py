"""Int8 (and FP8) dense inference on real data: the AUC change of an int8 / fp8 artifact, and
int8's p50 beside fp32.

For each experiment (Frappe and MovieLens, RankMixer, TokenMixer-Large and UniMixer(-Lite), and
Frappe DLRM) the real training job runs briefly on ../shared/data (``mixrank train``; a run
directory that already holds its artifact is reused) and its fp32 artifact is re-exported with
``mixrank export --artifact R/artifact --out ... --dtype int8`` (in this process: the export's
lowering check runs). Then, in one process:

- AUC / logloss of the fp32 and the int8 artifact on the evaluation split (MovieLens: ``test``;
  Frappe: ``valid``), the change, and the largest |probability| difference;
- p50 of ``Artifact.predict`` (what the Ranker runs) on 256-row batches of that split, paired:
  each repetition runs every dtype once on the same batch in a shuffled order; bf16 is included
  only on a CPU with native bf16 (elsewhere it runs hundreds of times slower than fp32);
- ``fp8`` (in ``--dtypes``, default on): the fp8 artifact's AUC / logloss change through the
  CPU emulation of the GPU's e4m3 GEMMs (the same quantization, ``kernels.grouped_linear_fp8``'s
  reference twin): FP8's accuracy, measurable without a GPU; its speed is a GPU figure
  (``benchmarks/gpu_check.sh``), so it is not timed here;
- ``int8_onednn``: the same int8 artifact lowered as int8 ran before its own kernels: each
  GEMM on its own (no ``cpu_fused_block``) and on oneDNN (``MIXRANK_INT8_ROUTE=onednn``), timed
  in the same pairs: ``vs_int8_auto`` is its p50 over the shipped one's (the routes are
  bit-identical and the fused blocks differ only at rounding ties: the same AUC; the routes
  the shipped load chose are ``int8_routes``, empty where every block is fused);
- with ``--serve`` (default: the first experiment) the int8 artifact served by the real Ray
  Serve application, one request of 256 real rows over HTTP and gRPC, its scores against the
  in-process int8 ones and the fp32 artifact's.

The speed of int8 on the larger presets (against fp32, bf16 and the int8 GEMM peak) is
``mixrank bench model --dtypes fp32 bf16 int8``. Run it under the shared lock::

    mixrank bench int8
    python -m benchmarks.bench_int8 --configs frappe_rankmixer --epochs 1   # a quick check
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
from collections import Counter
from pathlib import Path

from benchmarks.bench_quant_tables import DATA, _train, evaluate, paired_p50, serve_check
from benchmarks.common import emit, machine_info, table

# (config, epochs of the brief training run, evaluation split)
EXPERIMENTS = (
    ("frappe_rankmixer", 4, "frappe/valid.parquet"),
    ("frappe_tokenmixer_large", 3, "frappe/valid.parquet"),
    ("movielens_rankmixer", 3, "movielens100k/test.parquet"),
    ("movielens_tokenmixer_large", 3, "movielens100k/test.parquet"),
    ("frappe_dlrm", 3, "frappe/valid.parquet"),
    # UniMixer: the per-token SwiGLU in int8 (fused with the streams' norms), the mixing fp32
    ("frappe_unimixer", 3, "frappe/valid.parquet"),
    ("frappe_unimixer_lite", 3, "frappe/valid.parquet"),
    ("movielens_unimixer", 3, "movielens100k/test.parquet"),
    ("movielens_unimixer_lite", 3, "movielens100k/test.parquet"),
    # MoE: int8 runs the experts as grouped int8 GEMMs (Int8SparseMoE), fp8 on e4m3 (Fp8SparseMoE)
    ("frappe_rankmixer_moe", 3, "frappe/valid.parquet"),
    ("movielens_tokenmixer_large_moe", 3, "movielens100k/test.parquet"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work-dir", default="/tmp/mixrank-bench-int8", help="runs, artifacts")
    parser.add_argument(
        "--configs", nargs="*", default=None, help="a subset of " + ", ".join(e[0] for e in EXPERIMENTS)
    )  # fmt: skip
    parser.add_argument("--epochs", type=int, default=None, help="override every run's epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--candidates", type=int, default=256, help="rows per timed forward")
    parser.add_argument("--reps", type=int, default=200, help="timed forwards per dtype")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=["int8", "fp8"],
        choices=["int8", "fp8"],
        help="quantized dtypes to export and score against fp32 (fp8: accuracy only)",
    )
    parser.add_argument(
        "--no-onednn-row",
        dest="onednn_row",
        action="store_false",
        help="skip the int8_onednn row (the int8 artifact with every GEMM forced onto oneDNN, "
        "timed beside the routed one)",
    )
    parser.add_argument(
        "--serve",
        nargs="*",
        default=None,
        help="serve these experiments' int8 artifacts through Ray Serve (default: the first; "
        "none: --serve with no names)",
    )


@contextlib.contextmanager
def _env(key: str, value: str):
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def native_bf16() -> bool:
    """Whether a bf16 matmul here runs at least a quarter of the fp32 rate (AMX / AVX512-BF16);
    without it bf16 is emulated, hundreds of times slower."""
    import torch

    a32 = torch.randn(256, 256)
    a16 = a32.bfloat16()
    rates = {}
    for name, a in (("fp32", a32), ("bf16", a16)):
        a @ a
        t0 = time.perf_counter()
        a @ a
        rates[name] = 1 / max(time.perf_counter() - t0, 1e-9)
    return rates["bf16"] >= rates["fp32"] / 4


def run(args) -> int:
    import torch

    from ranking.data.reader import ParquetBatches
    from ranking.export import export_artifact, load_artifact

    if args.threads:
        torch.set_num_threads(args.threads)
    if not (DATA / "frappe").is_dir():
        print(f"bench int8: needs the real data under {DATA}", file=sys.stderr)
        return 2
    from kernels.cpu import int8
    from ranking.inference import optimize_for_inference
    from ranking.lowered import int8_gemms
    from serving.runtime import tune_allocator

    # the allocator a serving replica runs with (serving/runtime.py), as bench model
    allocator = tune_allocator()
    info = {
        **machine_info(),
        "int8_weight_bits": int8.weight_bits(),
        "replica_allocator": allocator,
    }
    print(f"# machine: {info}", file=sys.stderr)
    bf16 = native_bf16()
    if not bf16:
        print("# bf16: not timed (no native bf16 on this CPU)", file=sys.stderr)
    work = Path(args.work_dir)
    chosen = [e for e in EXPERIMENTS if not args.configs or e[0] in args.configs]
    serve = [chosen[0][0]] if args.serve is None and chosen else (args.serve or [])
    records = []
    for config, epochs, split in chosen:
        fp32_dir = _train(config, args.epochs or epochs, args.seed, work / config)
        arts, t_export = {"fp32": load_artifact(fp32_dir)}, {}
        for q in args.dtypes:
            t0 = time.perf_counter()
            export_artifact(fp32_dir, work / config / f"artifact-{q}", dtype=q)
            t_export[q] = time.perf_counter() - t0
            arts[q] = load_artifact(work / config / f"artifact-{q}")
        routes = {}
        if "int8" in arts:
            routes = Counter(g.route for g in int8_gemms(arts["int8"].lowered()))
            print(f"[int8] {config}: GEMM routes {dict(routes)}", file=sys.stderr, flush=True)
            if args.onednn_row and set(routes) != {"onednn"}:
                # the same artifact as int8 ran before its own kernels: no fused blocks, every
                # GEMM on oneDNN; timed side by side
                opts = {**arts["int8"].inference.options(), "cpu_fused_block": False}
                with _env("MIXRANK_INT8_ROUTE", "onednn"):
                    low = optimize_for_inference(arts["int8"].model, dtype="int8", **opts)
                arts["int8_onednn"] = dataclasses.replace(arts["int8"], _fast=("int8", low))
        if bf16:
            arts["bf16"] = load_artifact(fp32_dir, dtype="bf16")
        data = DATA / split
        metrics, probs = {}, {}
        for dt, art in arts.items():
            metrics[dt], probs[dt] = evaluate(art, data)
        batches = list(
            ParquetBatches(
                arts["fp32"].schema, data, args.candidates, rank=0, world_size=1, shuffle=False
            )
        )[:50]
        timed = {dt: a.predict for dt, a in arts.items() if dt != "fp8"}  # fp8: emulated here
        p50 = paired_p50(timed, batches, args.reps, args.seed)
        served = (
            serve_check(arts["int8"], arts["fp32"], data, args.candidates)
            if config in serve and "int8" in arts
            else {}
        )
        for dt in arts:
            rec = {
                "config": config,
                "dtype": dt,
                "rows": metrics[dt].get("rows"),
                "auc": metrics[dt]["auc"],
                "logloss": metrics[dt]["logloss"],
                "auc_change": metrics[dt]["auc"] - metrics["fp32"]["auc"],
                "logloss_change": metrics[dt]["logloss"] - metrics["fp32"]["logloss"],
                "max_prob_diff": float((probs[dt] - probs["fp32"]).abs().max()),
                "p50_ms": p50.get(dt),
                "p50_vs_fp32": p50["fp32"] / p50[dt] if dt in p50 else None,
            }
            if dt in t_export:
                rec["export_s"] = t_export[dt]
            if dt == "int8":
                rec.update(served)
                rec["int8_routes"] = dict(routes)
            if dt == "int8_onednn":
                rec["vs_int8_auto"] = p50["int8"] / p50[dt]
            emit(rec)
            records.append(rec)
    table(
        records,
        ["config", "dtype", "auc", "auc_change", "logloss_change", "max_prob_diff", "p50_ms",
         "p50_vs_fp32", "vs_int8_auto"],
    )  # fmt: skip
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--json-only", action="store_true")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
