"""``mixrank bench model``: forward throughput of each architecture and its achieved dense FLOP/s
over the bf16 matmul peak measured in the same run.

For each config (default: the ``*_medium`` presets) at ``--batch`` rows it measures, in eval
mode with no grad:

- ``fp32``: the whole forward (embeddings + dense part) in fp32;
- ``bf16``: the served model, ``ranking.inference.optimize_for_inference(dtype="bf16")`` with the
  preset's ``inference:`` options (bf16 dense weights), or autocast (``--bf16 autocast``);
- samples/s of the whole forward and of the dense part alone (tokens -> logits; the whole
  forward for DLRM/DCNv2), achieved dense FLOP/s (analytic FLOPs per sample from
  ``ranking.model.flops`` x dense samples/s), and ``frac_of_peak``: its ratio to a 2048^3
  (``peak_n``^3 where that is too slow, see ``MatmulPeak``) matmul of the same dtype timed right before and after each measurement (median over pairs;
  the machines are shared, so unpaired peaks drift);
- ``by_regime`` (mixers): the host runs the matmul in regimes about 2.5x apart that switch
  within seconds, so the whole-forward ratio depends on which regime a run lands in. For
  ``--regime-seconds`` one micro-batch of the dense part runs at a time between two matmuls;
  calls whose matmuls agree are split by regime and each regime gets its own median ratio
  (printed as ``frac_by_regime``: ``frac @ matmul GFLOP/s``, slowest regime first).

- ``int8``: ``optimize_for_inference(dtype="int8")`` (per-token GEMMs in int8, ``kernels.cpu.int8``);
  its ``frac_of_peak`` is over the int8 GEMM peak (``Int8Peak``: the fastest of oneDNN's u8s8
  kernel, ``torch._int_mm`` and ``kernels.cpu.vnni``'s own loops (VNNI tiles; AMX-INT8 tiles
  where the CPU has them) at 2048^3, named in ``int8_peak_route``; every route's rate in
  ``int8_routes_gop_s``; the ops' GEMM backend in ``int8_gemm_backend``), and ``int8_vs_bf16`` / ``int8_vs_fp32`` are its
  dense-part speed-ups over the other dtypes of the same config in the same run;
  ``int8_vs_fp32_paired`` (``_bf16_paired``) the median ratio over ``--int8-ab-reps`` pairs of
  one micro-batch run back to back (the number to read on a host whose speed drifts). bf16 is skipped,
  with the reason, on a CPU without native bf16 (``--force-bf16`` times it anyway). With
  ``cpu_fused_block`` (the mixer presets) int8 runs ``kernels.cpu.vnni``'s fused blocks where
  the CPU has AVX512-VNNI (``int8_fused_blocks``), and ``int8_fused_vs_unfused_paired`` times
  them against the same model with each int8 GEMM on its own, in pairs.

- ``ab_fused`` (``--ab-fused-seconds``; RankMixer and TokenMixer-Large in bf16): the dense part
  of one micro-batch with the fused ``kernels.cpu`` ops and with the eager block, alternately,
  between two
  matmuls; per matmul regime each one's ratio and the speed-up (paired per call). ``--plot``
  draws every call's ratio against the matmul's rate.

Run: ``python -m benchmarks.bench_model --configs rankmixer_medium tokenmixer_large_medium``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import emit, machine_info, table

DEFAULT_CONFIGS = [
    "rankmixer_medium",
    "tokenmixer_large_medium",
    "unimixer_medium",
    "unimixer_lite_medium",
    "dlrm_medium",
    "dcnv2_medium",
]
MODELS_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--configs", nargs="+", default=DEFAULT_CONFIGS, help="preset names or YAML paths"
    )
    parser.add_argument("--batch", type=int, default=4096, help="rows per forward (default 4096)")
    parser.add_argument("--iters", type=int, default=5, help="timed forwards per measurement")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=["fp32", "bf16", "int8"],
        choices=["fp32", "bf16", "int8"],
        help="int8: optimize_for_inference(dtype='int8'), its ratio to the int8 GEMM peak and "
        "its speed-up over bf16 and fp32 in the same run; bf16 is skipped (with the reason) "
        "on a CPU without native bf16, where it runs hundreds of times slower than fp32",
    )
    parser.add_argument(
        "--bf16",
        default="weights",
        choices=["weights", "autocast"],
        help="bf16 by converting the dense weights (default) or by autocast",
    )
    parser.add_argument(
        "--micro-batch", type=int, default=None, help="override inference.micro_batch (0 = off)"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the mixer stack")
    parser.add_argument(
        "--compile-epilogues",
        action="store_true",
        help="torch.compile only the norms and SwiGLU activations between the GEMMs",
    )
    parser.add_argument(
        "--cpu-fused-block",
        choices=["preset", "on", "off"],
        default="preset",
        help="mixer blocks as one kernels.cpu op: bf16 on AMX, int8 on AVX512-VNNI (default: "
        "the preset's setting); with int8 and it on, int8_fused_vs_unfused_paired times the "
        "fused blocks against int8 GEMMs one at a time",
    )
    parser.add_argument(
        "--ab-fused-seconds",
        type=float,
        default=0.0,
        help="per RankMixer / TokenMixer-Large config in bf16: this long of fused / eager calls "
        "alternately between matmuls, reported per regime (ab_fused; 0 = off)",
    )
    parser.add_argument("--plot", default=None, help="with --ab-fused-seconds: a PNG of the calls")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--int8-ab-reps",
        type=int,
        default=20,
        help="with int8: pairs of one micro-batch of the dense part, int8 against fp32 (and "
        "bf16), back to back; their median ratio is int8_vs_fp32_paired (0 = off)",
    )
    parser.add_argument(
        "--replica-allocator",
        choices=["on", "off"],
        default="on",
        help="glibc malloc as a serving replica sets it (serving/runtime.py: one arena, 256 MiB "
        "mmap threshold, no trimming) or glibc's defaults",
    )
    parser.add_argument(
        "--force-bf16", action="store_true", help="time bf16 even on a CPU without native bf16"
    )
    parser.add_argument(
        "--regime-seconds",
        type=float,
        default=15.0,
        help="per mixer config and dtype: this long of one micro-batch at a time between two "
        "matmuls, reported per matmul regime (by_regime; 0 = off)",
    )


def _time(fn, iters: int, warmup: int) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class MatmulPeak:
    """An n^3 matmul in ``dtype``: the machine's practical GEMM peak, timed on demand.

    ``n`` is 2048, or the largest power of two from 256 whose matmul stays under about
    ``max_seconds``: a CPU without native bf16 (AVX2 only) runs a 2048^3 bf16 matmul about
    1,000x slower than one with AMX, for minutes per call. The record says which ``n`` ran."""

    def __init__(self, dtype, n: int = 2048, max_seconds: float = 0.25):
        import torch

        size = 256
        while True:
            self.n = size
            self.a = torch.randn(size, size, dtype=dtype)
            self.b = torch.randn(size, size, dtype=dtype)
            self()  # warm-up
            if size >= n or 8 * self() > max_seconds:  # the next size costs 8x
                break
            size *= 2

    def __call__(self) -> float:
        """Seconds of one matmul."""
        t = time.perf_counter()
        self.a @ self.b
        return time.perf_counter() - t

    @property
    def flops(self) -> float:
        return 2.0 * self.n**3


class Int8Peak:
    """The int8 GEMM peak, timed on demand like ``MatmulPeak``: oneDNN's u8s8 kernel at n^3
    (what int8 inference runs, activation quantization excluded). ``routes`` holds every
    route's GOP/s measured once at construction (``kernels.cpu.int8.int8_gemm_rate``: oneDNN,
    ``kernels.cpu.vnni`` on VNNI tiles and, where the CPU has AMX-INT8, on AMX tiles,
    ``torch._int_mm``, torch.ao's dynamic linear); the fastest of oneDNN, ``torch._int_mm`` and
    the op's own loops becomes the timed route (``route``). torch.ao's is left out: its
    activations take one scale per tensor, not the per-row quantization int8 inference runs."""

    def __init__(self, n: int = 2048):
        import torch

        from kernels.cpu import int8, vnni

        self.routes = int8.int8_gemm_rate(n)
        self.n = n
        g = torch.Generator().manual_seed(0)
        timed = ("onednn_u8s8", "torch_int_mm", "vnni", "amx_int8")
        self.route = max((r for r in timed if r in self.routes), key=self.routes.get)
        if self.route == "torch_int_mm":
            a = torch.randint(-63, 64, (n, n), dtype=torch.int8, generator=g)
            b = torch.randint(-63, 64, (n, n), dtype=torch.int8, generator=g)
            self.fn = lambda: torch._int_mm(a, b)
        elif self.route in ("vnni", "amx_int8"):
            w = int8.Int8Weight(torch.randn(n, n, generator=g), keep_q=True)
            prepared = vnni.prepare(w.q.unsqueeze(0), w.scale.unsqueeze(0))
            x = torch.randn(1, n, n, generator=g)
            backend = "amx" if self.route == "amx_int8" else "vnni"

            def run():
                with vnni.gemm_backend(backend):
                    return vnni.linear(x, prepared)

            self.fn = run
        else:
            w = int8.Int8Weight(torch.randn(n, n, generator=g), keep_q=True)
            q, _ = int8.quantize_rows(torch.randn(n, n, generator=g))
            self.fn = lambda: w.product(q)
        self.fn()

    def __call__(self) -> float:
        t = time.perf_counter()
        self.fn()
        return time.perf_counter() - t

    @property
    def flops(self) -> float:
        return 2.0 * self.n**3


def paired(fn, peak: MatmulPeak, iters: int, warmup: int) -> tuple[float, float, float]:
    """Time ``fn`` and the matmul peak alternately (the machine is shared and its speed drifts):
    returns (min seconds of fn, min seconds of the matmul, median over pairs of
    (1 / t_fn) / (1 / t_matmul)), the last being robust to slow drifts in contention."""
    for _ in range(warmup):
        fn()
    tf, tp, ratios = [], [], []
    for _ in range(iters):
        p0 = peak()
        t = time.perf_counter()
        fn()
        t = time.perf_counter() - t
        p1 = peak()
        tf.append(t)
        tp.append(min(p0, p1))
        ratios.append(min(p0, p1) / t)
    return min(tf), min(tp), statistics.median(ratios)


def by_regime(fn, fn_flops: float, peak: MatmulPeak, seconds: float, min_pairs: int = 5) -> list:
    """The host runs the matmul in regimes (about 2.5x apart here) that switch within seconds,
    while a whole 4096-row forward takes 0.2-1.5 s: an edge-paired ratio then compares a
    forward that lived through a mix of regimes with one of the two matmuls next to it. Here
    ``fn`` is short (one micro-batch) and runs between two matmuls for ``seconds``; a call
    counts only where the two matmuls agree within 20% (the regime held around it). The
    counted calls are split into regimes where their matmul rates fall into two groups whose
    medians are 1.6x or more apart (``_two_regimes``). Returns one entry per regime,
    slowest first: its median matmul GFLOP/s, the median of ``fn``'s FLOP/s over the matmul's
    of the same call, and the number of calls."""
    fn()
    peak()
    pairs = []  # (matmul FLOP/s, fn FLOP/s)
    end = time.perf_counter() + seconds
    tries = 0
    # until the deadline; past it only while too few calls counted (at most 50 x min_pairs tries)
    while time.perf_counter() < end or (len(pairs) < min_pairs and tries < 50 * min_pairs):
        tries += 1
        p0 = peak()
        t = time.perf_counter()
        fn()
        t = time.perf_counter() - t
        p1 = peak()
        if max(p0, p1) <= 1.2 * min(p0, p1):
            pairs.append((2 * peak.flops / (p0 + p1), fn_flops / t))
    if not pairs:
        return []
    return [
        {
            "peak_gflop_s": statistics.median(p for p, _ in g) / 1e9,
            "frac_of_peak": statistics.median(f / p for p, f in g),
            "calls": len(g),
        }
        for g in _two_regimes(pairs)
    ]


def ab_fused(call, fn_flops: float, peak: MatmulPeak, seconds: float, min_pairs: int = 5):
    """``call(True)`` (fused block) and ``call(False)`` (eager) back to back between two
    matmuls for ``seconds``; calls count where the matmuls agree within 20% (as in
    ``by_regime``). Returns (per regime, slowest first: matmul GFLOP/s, each one's median
    ratio to it, the median paired speed-up eager time / fused time, calls; and the raw calls
    as (matmul FLOP/s, fused s, eager s))."""
    call(True)
    call(False)
    rows = []
    end = time.perf_counter() + seconds
    tries = 0
    while time.perf_counter() < end or (len(rows) < min_pairs and tries < 50 * min_pairs):
        tries += 1
        p0 = peak()
        t = time.perf_counter()
        call(True)
        t_on = time.perf_counter() - t
        t = time.perf_counter()
        call(False)
        t_off = time.perf_counter() - t
        p1 = peak()
        if max(p0, p1) <= 1.2 * min(p0, p1):
            rows.append((2 * peak.flops / (p0 + p1), t_on, t_off))
    if not rows:
        return [], []
    groups = _two_regimes([(p, i) for i, (p, _, _) in enumerate(rows)])
    out = []
    for g in groups:
        sel = [rows[i] for _, i in g]
        out.append(
            {
                "peak_gflop_s": statistics.median(p for p, _, _ in sel) / 1e9,
                "frac_fused": statistics.median(fn_flops / on / p for p, on, _ in sel),
                "frac_eager": statistics.median(fn_flops / off / p for p, _, off in sel),
                "speedup": statistics.median(off / on for _, on, off in sel),
                "calls": len(sel),
            }
        )
    return out, [(p, on, off) for p, on, off in rows]


def plot_ab(records: list[dict], path: str) -> None:
    """Each A/B call's ratio (fused and eager) against the matmul rate next to it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in records if r.get("ab_fused_calls")]
    if not recs:
        return
    fig, axes = plt.subplots(1, len(recs), figsize=(5.2 * len(recs), 3.8), squeeze=False)
    for ax, r in zip(axes[0], recs):
        fl = r["flops_per_sample"] * (r["micro_batch"] or r["batch"])
        calls = r["ab_fused_calls"]
        for idx, color, label in ((2, "tab:blue", "eager block"), (1, "tab:red", "fused block")):
            xs = [c[0] / 1e9 for c in calls]
            ys = [fl / c[idx] / c[0] for c in calls]
            ax.plot(xs, ys, ".", color=color, ms=3, alpha=0.35)
            for g in r["ab_fused"]:
                key = "frac_eager" if idx == 2 else "frac_fused"
                ax.plot(g["peak_gflop_s"], g[key], "o", color=color, ms=9, mec="k")
            ax.plot([], [], "o", color=color, mec="k", label=f"{label} (median per regime)")
        ax.axhline(0.4, color="k", ls="--", lw=1, label="target 0.40")
        n = records[0].get("peak_n", 2048) if records else 2048
        ax.set_xlabel(f"{n}^3 bf16 matmul next to the call (GFLOP/s)")
        ax.set_ylabel("dense FLOP/s / matmul FLOP/s")
        ax.set_title(
            f"{r['config']} (bf16, {r['micro_batch'] or r['batch']} rows per call)", fontsize=9
        )
        ax.legend(fontsize=7)
    fig.suptitle(
        "mixrank bench model --ab-fused-seconds: the fused kernels.cpu ops vs the eager blocks",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _two_regimes(pairs: list, apart: float = 1.6) -> list[list]:
    """``pairs`` sorted by matmul rate and cut in two where the split leaves the least spread
    of log rate inside the groups (1-D two-means); kept as two only if the groups' medians are
    ``apart`` or more apart, else one group."""
    pairs = sorted(pairs)
    logs = [math.log(p) for p, _ in pairs]
    n = len(logs)
    if n < 2:
        return [pairs]

    def spread(xs):
        mean = sum(xs) / len(xs)
        return sum((x - mean) ** 2 for x in xs)

    cut = min(range(1, n), key=lambda i: spread(logs[:i]) + spread(logs[i:]))
    lo, hi = pairs[:cut], pairs[cut:]
    if statistics.median(p for p, _ in hi) < apart * statistics.median(p for p, _ in lo):
        return [pairs]
    return [lo, hi]


def _resolve(name: str) -> Path:
    p = Path(name)
    return p if p.suffix in (".yaml", ".yml") else MODELS_DIR / f"{name}.yaml"


def bench_config(name: str, args) -> list[dict]:
    import torch

    from ranking.inference import optimize_for_inference
    from ranking.lowered import EPILOGUES
    from ranking.model.flops import forward_flops
    from ranking.model.ranker import Ranker, build_model
    from ranking.model.synthetic import random_batch
    from ranking.train.config import load_experiment

    # each config starts with no compiled graphs, as the one model of a serving process does:
    # shared across configs, the epilogues' graphs reached torch._dynamo's recompile limit
    # (8) by the fourth config, whose epilogues then ran eagerly
    torch._dynamo.reset()
    EPILOGUES.clear()
    path = _resolve(name)
    exp = load_experiment(path, require_data=False)
    cfg, schema, opts = exp.model, exp.schema, exp.inference
    if args.micro_batch is not None:
        opts.micro_batch = args.micro_batch
    opts.compile = bool(args.compile or opts.compile)
    opts.compile_epilogues = bool(args.compile_epilogues or opts.compile_epilogues)
    fused = getattr(args, "cpu_fused_block", "preset")
    opts.cpu_fused_block = opts.cpu_fused_block if fused == "preset" else fused == "on"
    torch.manual_seed(0)
    model = build_model(cfg, schema).eval()
    batch = random_batch(schema, args.batch)
    flops = forward_flops(cfg, schema)
    is_mixer = isinstance(model, Ranker)
    records = []
    ab_calls = {}  # dtype -> one micro-batch of the dense part (the whole forward: baselines)
    chunks = {}  # dtype -> that micro-batch's tokens (mixers)
    peaks = {"bf16": MatmulPeak(torch.bfloat16), "fp32": MatmulPeak(torch.float32)}
    if "int8" in args.dtypes:
        peaks["int8"] = Int8Peak()
    bf16_rate = peaks["bf16"].flops / min(peaks["bf16"]() for _ in range(3))
    fp32_rate = peaks["fp32"].flops / min(peaks["fp32"]() for _ in range(3))
    for dt in args.dtypes:
        if dt == "bf16" and bf16_rate < fp32_rate / 4 and not getattr(args, "force_bf16", False):
            records.append(
                {
                    "config": path.stem,
                    "arch": cfg.arch,
                    "dtype": dt,
                    "skipped": f"no native bf16 on this CPU: a {peaks['bf16'].n}^3 bf16 matmul "
                    f"ran at {bf16_rate / 1e9:.1f} GFLOP/s against {fp32_rate / 1e9:.0f} in "
                    "fp32 (--force-bf16 times it anyway)",
                }
            )
            continue
        autocast = dt == "bf16" and args.bf16 == "autocast"
        # the served model: optimize_for_inference in this dtype with the preset's options;
        # --bf16 autocast instead runs the fp32 lowering under autocast
        m = optimize_for_inference(model, dtype="fp32" if autocast else dt, **opts.options())

        def ctx(on=autocast):
            return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()

        def forward(m=m):
            with torch.no_grad(), ctx():
                return m(batch)

        t_full = _time(forward, max(args.iters // 2, 1), args.warmup)
        if is_mixer:
            with torch.no_grad(), ctx():
                tokens = m.tokenizer(batch.dense, batch.sparse)

            def dense_only(m=m, tokens=tokens):
                with torch.no_grad(), ctx():
                    return m.chunks(tokens)

            dense_fn = dense_only
        else:
            dense_fn = forward
        peak = peaks[dt]
        t_dense, t_peak, ratio = paired(dense_fn, peak, args.iters, args.warmup)
        t_bf16 = min(peaks["bf16"]() for _ in range(3))
        per_sample = flops / peak.flops
        rec = {
            "config": path.stem,
            "arch": cfg.arch,
            "dtype": dt,
            "batch": args.batch,
            "micro_batch": opts.micro_batch if is_mixer else None,
            "compile": bool(is_mixer and opts.compile),
            "compile_epilogues": bool(is_mixer and opts.compile_epilogues),
            "cpu_fused_block": bool(is_mixer and opts.cpu_fused_block),
            "flops_per_sample": flops,
            "samples_s": args.batch / t_full,
            "dense_samples_s": args.batch / t_dense,
            "dense_gflop_s": flops * args.batch / t_dense / 1e9,
            "peak_gflop_s": peak.flops / t_peak / 1e9,
            "peak_n": peak.n,  # the matmul is peak_n^3 (2048 unless that is too slow here)
            "peak_bf16_gflop_s": peaks["bf16"].flops / t_bf16 / 1e9,
            # paired ratio: achieved dense FLOP/s over the matmul FLOP/s timed next to it
            "frac_of_peak": ratio * per_sample * args.batch,
        }
        rec["frac_of_bf16_peak"] = rec["dense_gflop_s"] / rec["peak_bf16_gflop_s"]
        if dt == "int8":
            from kernels.cpu import int8, vnni

            rec["int8_routes_gop_s"] = peak.routes
            rec["int8_peak_route"] = peak.route
            rec["int8_gemm_backend"] = vnni.backend() if vnni.ops() is not None else None
            rec["int8_weight_bits"] = int8.weight_bits()
        step = opts.micro_batch if 0 < opts.micro_batch < args.batch else args.batch
        if is_mixer and args.regime_seconds > 0:
            one = tokens[:step]

            def chunk(m=m, one=one):
                with torch.no_grad(), ctx():
                    return m.dense_part(one)

            rec["by_regime"] = by_regime(chunk, flops * step, peak, args.regime_seconds)
        ab_seconds = getattr(args, "ab_fused_seconds", 0.0)
        fusable = cfg.arch in ("rankmixer", "tokenmixer_large")
        if is_mixer and dt == "bf16" and ab_seconds > 0 and fusable:
            one = tokens[:step]
            lowered = {
                on: optimize_for_inference(
                    model, dtype="bf16", **{**opts.options(), "cpu_fused_block": on}
                )
                for on in (True, False)
            }

            def call(on, one=one, lowered=lowered):
                with torch.no_grad():
                    return lowered[on].dense_part(one)

            rec["ab_fused"], rec["ab_fused_calls"] = ab_fused(call, flops * step, peak, ab_seconds)
        records.append(rec)
        if is_mixer:
            one_chunk = tokens[: opts.micro_batch if 0 < opts.micro_batch < args.batch else None]
            ab_calls[dt] = lambda m=m, one=one_chunk: m.dense_part(one)
            chunks[dt] = one_chunk
        else:
            ab_calls[dt] = forward
    q = next((r for r in records if r["dtype"] == "int8" and "skipped" not in r), None)
    reps = getattr(args, "int8_ab_reps", 0)
    if q is not None and reps > 0:
        for other in ("fp32", "bf16"):
            if other in ab_calls:
                q[f"int8_vs_{other}_paired"] = ab_speedup(
                    ab_calls[other], ab_calls["int8"], reps, args.warmup
                )
        if is_mixer and opts.cpu_fused_block:
            from kernels.cpu import vnni

            q["int8_fused_blocks"] = vnni.ops() is not None
            unfused = optimize_for_inference(
                model, dtype="int8", **{**opts.options(), "cpu_fused_block": False}
            )
            q["int8_fused_vs_unfused_paired"] = ab_speedup(
                lambda: unfused.dense_part(chunks["int8"]), ab_calls["int8"], reps, args.warmup
            )
    return records


def ab_speedup(base, new, reps: int, warmup: int) -> float:
    """``base`` and ``new`` called back to back ``reps`` times (the order alternating): the
    median over pairs of ``t_base / t_new`` (the host's speed drifts within seconds, so the
    two are compared call by call, not run after run)."""
    import torch

    with torch.no_grad():
        for _ in range(max(warmup, 1)):
            base()
            new()
        ratios = []
        for i in range(reps):
            t = {}
            for name, fn in (("b", base), ("n", new)) if i % 2 == 0 else (("n", new), ("b", base)):
                t0 = time.perf_counter()
                fn()
                t[name] = time.perf_counter() - t0
            ratios.append(t["b"] / t["n"])
    return statistics.median(ratios)


def run(args) -> int:
    import torch

    from serving.runtime import tune_allocator

    if args.threads:
        torch.set_num_threads(args.threads)
    # the allocator a serving replica runs with (serving/runtime.py); --replica-allocator off:
    # glibc's defaults
    allocator = getattr(args, "replica_allocator", "on") == "on" and tune_allocator()
    info = {**machine_info(), "replica_allocator": allocator}
    if not getattr(args, "json_only", False):
        print(f"# machine: {info}", file=sys.stderr)
    records = []
    for name in args.configs:
        recs = bench_config(name, args)
        by_dtype = {r["dtype"]: r for r in recs if "skipped" not in r}
        q = by_dtype.get("int8")
        for other in ("bf16", "fp32"):  # int8's speed-up, dense part, measured in this run
            if q is not None and other in by_dtype:
                q[f"int8_vs_{other}"] = q["dense_samples_s"] / by_dtype[other]["dense_samples_s"]
        for rec in recs:
            rec["bf16_mode"] = args.bf16
            emit({k: v for k, v in rec.items() if k != "ab_fused_calls"})
            if "skipped" in rec:
                if not getattr(args, "json_only", False):
                    print(f"# {rec['config']} {rec['dtype']}: skipped: {rec['skipped']}")
                continue
            records.append(rec)
    if getattr(args, "plot", None):
        plot_ab(records, args.plot)
    for rec in records:  # "fused 0.44 / eager 0.33 (1.32x) @ 1,714" per regime
        rec["ab_fused_by_regime"] = " | ".join(
            f"{g['frac_fused']:.2f} / {g['frac_eager']:.2f} ({g['speedup']:.2f}x) @ "
            f"{g['peak_gflop_s']:,.0f}"
            for g in rec.get("ab_fused", [])
        )
        rec.pop("ab_fused_calls", None)
    for rec in records:  # e.g. "0.50 @ 790 | 0.36 @ 1,850" (frac @ matmul GFLOP/s)
        rec["frac_by_regime"] = " | ".join(
            f"{r['frac_of_peak']:.2f} @ {r['peak_gflop_s']:,.0f}" for r in rec.get("by_regime", [])
        )
    if not getattr(args, "json_only", False):
        table(
            records,
            [
                "config",
                "dtype",
                "compile",
                "samples_s",
                "dense_samples_s",
                "dense_gflop_s",
                "peak_gflop_s",
                "frac_of_peak",
                "frac_by_regime",
            ]
            + (
                [
                    "int8_vs_bf16",
                    "int8_vs_fp32",
                    "int8_vs_bf16_paired",
                    "int8_vs_fp32_paired",
                    "int8_fused_vs_unfused_paired",
                ]
                if "int8" in args.dtypes
                else []
            )
            + (["ab_fused_by_regime"] if getattr(args, "ab_fused_seconds", 0) else []),
        )
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--json-only", action="store_true")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
