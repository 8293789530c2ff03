"""``mixrank bench ...``: reproducible benchmarks. Each prints JSON lines, then a table.

Each benchmark is a module here with ``add_arguments(parser)`` and ``run(args) -> int``; they can
also be run directly as ``python -m benchmarks.<module>``. Results are recorded in
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import importlib
import importlib.util

# name -> (module, one-line help). One line per benchmark.
BENCHMARKS = {
    "data": ("benchmarks.bench_data", "rows/s of reading Parquet and converting to Batch"),
    "model": ("benchmarks.bench_model", "forward samples/s and FLOP/s vs measured matmul peak"),
    "kernels": ("benchmarks.bench_kernels", "Triton kernels vs roofline and eager (GPU only)"),
    "stack": ("benchmarks.bench_stack_gpu", "mixer stacks on a GPU: Triton vs eager, % of peak"),
    "train": ("benchmarks.bench_train", "training samples/s with 1 and 2 processes, step/forward"),
    "quality": ("benchmarks.quality", "AUC/logloss of every arch on Frappe and MovieLens, scaling"),
    "serve": ("benchmarks.bench_serve", "Ray Serve /v1/rank latency and throughput vs forward"),
    "loop": ("benchmarks.bench_loop", "request-logging cost (A/B) and rollout/rollback under load"),
    "scale": ("benchmarks.bench_scale", "10^7-10^8-row tables: samples/s, RSS vs plan, DCP, serve"),
    "quant": ("benchmarks.bench_quant_tables", "int8/int4 tables: bytes, p50, AUC change vs fp32"),
    "int8": (
        "benchmarks.bench_int8",
        "int8 dense inference: AUC change and p50 vs fp32 on real data",
    ),
}


def register(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark (JSON lines, then a table)")
    bsub = p.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    for name, (modname, help_) in BENCHMARKS.items():
        if importlib.util.find_spec(modname) is None:
            continue  # not built yet
        bp = bsub.add_parser(name, help=help_)
        bp.set_defaults(func=_runner(modname), bench_module=modname)
        bp.add_argument("--json-only", action="store_true", help="print only the JSON lines")
        _lazy_args(bp, modname)


def _lazy_args(parser, modname: str) -> None:
    # Argument definitions are cheap; the module defers torch imports to run().
    importlib.import_module(modname).add_arguments(parser)


def _runner(modname: str):
    def run(args):
        return importlib.import_module(modname).run(args)

    return run
