"""``mixrank bench quality``: model quality of every architecture on real data, and a scaling sweep.

Every run is the real training job (``mixrank train``'s preparation, then its worker under
torchrun, DistributedModelParallel) with the experiment configs ``configs/<dataset>_<arch>.yaml``;
up to ``--runs-per-launch`` consecutive runs train one after the other in one torchrun (one start
of the workers and the process group instead of one per run). The
protocol is the same for every architecture of a data set: at most the same number of epochs
(``--epochs`` overrides all of them), best valid epoch kept, one of two documented training
recipes per arch (A: fused rowwise-Adagrad tables + L2 on the looked-up embeddings; B:
data-parallel tables decayed as a whole by Adam, global batch 4096), chosen on valid with seed 0
(light tuning on valid only), the global batch of each config (``--global-batch`` forces one),
and ``--seeds`` seeds per (data set, arch). Per run it records the
validation AUC/logloss of the exported model (``summary.json``: with ``train.select_best`` in the
configs, the best per-epoch evaluation on valid, and the epoch it came from), for MovieLens also
the test AUC/logloss of that exported artifact (the code path of ``mixrank eval``), training
samples/s (median of the logged rates) and wall time; per arch the analytic dense parameters,
embedding parameters and forward GEMM FLOPs per sample (``ranking.model.flops``) of the model
the run trained (its resolved config, whose schema is the run's own vocabulary).

The scaling sweep trains every mixer architecture on Frappe at ``--scale-dims`` widths D (one
seed; the D of the main config reuses its seed-0 run), and fits AUC = a + b log10(x) by least
squares against FLOPs per sample and against dense parameters.

Outputs: JSON lines on stdout, a progress line per run (with ETA) on stderr, the tables between
the ``<!-- quality:begin -->`` / ``<!-- quality:end -->`` markers of ``--out`` (docs/RESULTS.md;
the prose around them is kept), ``quality_results.json`` and PNG plots next to it.

Finished runs are cached: a run directory under ``--work-dir`` that holds a ``summary.json`` for
the same parsed config (comments do not count) and overrides is not trained again (``--fresh`` ignores the cache).

    mixrank bench quality                   # the full protocol (55 min on 2 idle cores)
    mixrank bench quality --quick           # a subset, one seed, short runs: checks the harness
    python -m benchmarks.quality --quick --out /tmp/q/RESULTS.md
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
ARCHS = (
    "dlrm",
    "dcnv2",
    "rankmixer",
    "rankmixer_moe",
    "tokenmixer_large",
    "tokenmixer_large_moe",
    "unimixer",
    "unimixer_lite",
)
MIXERS = ("rankmixer", "tokenmixer_large", "unimixer", "unimixer_lite")
BASELINES = ("dlrm", "dcnv2")
DATASETS = ("frappe", "movielens")
# logistic-regression floors (shared/data/README.md)
LR_FLOOR = {"frappe": {"valid": 0.9376}, "movielens": {"valid": 0.6865, "test": 0.7010}}
TEST_SPLIT = {"movielens": "movielens100k/test.parquet"}
BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="subset, 1 seed, short runs")
    parser.add_argument("--archs", default=None, help=f"comma list (default: all of {ARCHS})")
    parser.add_argument("--datasets", default=None, help="comma list (default: frappe,movielens)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per arch (default 3)")
    parser.add_argument("--nproc", type=int, default=2, help="processes per run (default 2)")
    parser.add_argument(
        "--global-batch",
        type=int,
        default=None,
        help="global batch for every run; per rank = this / nproc (default: each config's own, "
        "whose data.batch_size is per rank at --nproc 2)",
    )
    parser.add_argument("--epochs", type=int, default=None, help="override every config's epochs")
    parser.add_argument("--max-steps", type=int, default=None, help="override train.max_steps")
    parser.add_argument(
        "--scale-dims",
        default=None,
        help="D values of the Frappe scaling sweep (default 8,16,24,32)",
    )
    parser.add_argument("--no-scaling", action="store_true", help="skip the scaling sweep")
    parser.add_argument("--compare-nproc", action="store_true", help="time nproc 1 vs 2 first")
    parser.add_argument("--data", default=str(DATA), help="the shared data folder")
    parser.add_argument("--out", default=str(REPO / "docs" / "RESULTS.md"), help="results page")
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "quality"), help="run dirs")
    parser.add_argument("--fresh", action="store_true", help="retrain even if a run is cached")
    parser.add_argument(
        "--runs-per-launch",
        type=int,
        default=10,
        help="consecutive runs trained in one torchrun (one start of the workers for them all; "
        "default 10, 1: a torchrun per run)",
    )
    parser.add_argument(
        "--cached-only",
        action="store_true",
        help="train nothing: write the page from the finished (cached) runs, listing the rest",
    )


# --------------------------------------------------------------------------- one run


def _config(dataset: str, arch: str) -> Path:
    return REPO / "configs" / f"{dataset}_{arch}.yaml"


def config_digest(path: Path) -> str:
    """The cache key of a config: its parsed content (comments and layout do not count)."""
    import yaml

    canon = json.dumps(yaml.safe_load(path.read_text()), sort_keys=True)
    return "yaml:" + hashlib.sha256(canon.encode()).hexdigest()[:16]


def recipe_name(exp) -> str:
    """Which of the two documented training recipes a run used (docs/RESULTS.md): ``A``
    (fused rowwise-Adagrad tables, L2 on the looked-up embeddings), ``B`` (data-parallel tables
    decayed as a whole by the dense Adam), ``other``."""
    t = exp.train
    if t.embedding_l2 and not t.embedding_weight_decay:
        return "A"
    if t.embedding_weight_decay and t.sharding.get("*") == "data_parallel":
        return "B"
    return "other"


def _global_batch(dataset: str, arch: str, args) -> int:
    """``--global-batch``, else the config's own: its ``data.batch_size`` is per rank at the
    documented ``--nproc 2``."""
    if args.global_batch:
        return args.global_batch
    import yaml

    raw = yaml.safe_load(_config(dataset, arch).read_text())
    return 2 * int(raw.get("data", {}).get("batch_size", 512))


def _model_counts(config: Path) -> dict:
    """Counts of the model a run trained: from its resolved ``config.yaml`` (whose schema is the
    run's own vocabulary schema under ``data.vocab_from_train``)."""
    from ranking.model import flops
    from ranking.train.config import load_experiment

    exp = load_experiment(config, require_data=False)
    return {
        "dense_params": flops.dense_params(exp.model, exp.schema),
        "emb_params": flops.embedding_params(exp.schema),
        "flops": flops.forward_flops(exp.model, exp.schema, batch_size=exp.data.batch_size),
        "epochs": exp.train.epochs,
        "batch_per_rank": exp.data.batch_size,
        "recipe": recipe_name(exp),
    }


def _eval_test(artifact: Path, data: Path) -> dict:
    """What ``mixrank eval --artifact A --data P`` prints, computed in this process."""
    from ranking.data.reader import ParquetBatches
    from ranking.export import load_artifact
    from ranking.metrics import EvalAccumulator

    art = load_artifact(artifact)
    acc = EvalAccumulator(art.schema.task_names)
    for batch in ParquetBatches(art.schema, data, 8192, rank=0, world_size=1, shuffle=False):
        acc.update(art.predict(batch), batch.labels)
    m = acc.compute()
    return next(iter(m.values())) if m and isinstance(next(iter(m.values())), dict) else m


def _run_key(spec: dict, args) -> dict:
    """What a run's cache is keyed by: processes, command-line overrides, parsed config."""
    ds, arch, seed, nproc = spec["dataset"], spec["arch"], spec["seed"], spec["nproc"]
    data = Path(args.data)
    split = {"frappe": "frappe", "movielens": "movielens100k"}[ds]
    overrides = [
        f"data.train={data / split / 'train.parquet'}",
        f"data.valid={data / split / 'valid.parquet'}",
        f"data.batch_size={_global_batch(ds, arch, args) // nproc}",
        f"train.seed={seed}",
        "train.checkpoint_every=0",
        "train.keep_checkpoints=1",
        *spec["overrides"],
    ]
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    if args.max_steps:
        overrides.append(f"train.max_steps={args.max_steps}")
    return {"nproc": nproc, "overrides": overrides, "config_sha": config_digest(_config(ds, arch))}


def _is_cached(spec: dict, args) -> bool:
    run_dir = Path(args.work_dir) / spec["key"]
    key_file = run_dir / "quality_overrides.json"
    return (
        not args.fresh
        and (run_dir / "summary.json").is_file()
        and key_file.is_file()
        and json.loads(key_file.read_text()) == _run_key(spec, args)
    )


def _prepare(spec: dict, args) -> Path:
    """What ``mixrank train --config C --run-dir R overrides`` does before torchrun (validation,
    vocabulary, run directory), done in this process: torch and torchrec are imported here
    already, which saves a CLI start (~4 s) per run."""
    from ranking.errors import UserError
    from ranking.train.commands import prepare_run

    run_dir = Path(args.work_dir) / spec["key"]
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    try:
        return prepare_run(
            str(_config(spec["dataset"], spec["arch"])),
            _run_key(spec, args)["overrides"],
            str(run_dir),
        )
    except UserError as e:
        raise RuntimeError(f"{spec['key']}: {e}") from e


def _launch(specs: list[dict], args):
    """Train the prepared ``specs`` (same ``nproc``) one after the other in one torchrun
    (``ranking.train.worker --run-dir A --run-dir B ...``): one start of torchrun, Python,
    TorchRec and the process group for them all instead of ~6-8 s per run. Yields each spec when
    its ``summary.json`` appears, with its wall seconds (since the previous run ended, or since
    the launch for the first: the start is charged to it; the last one's include the process
    exit) and the seconds it stood stopped (the machine is shared, and another engineer's
    timing benchmarks SIGSTOP niced jobs while they measure: the worker's state is sampled every
    0.25 s from ``/proc/<pid>/stat``, state ``T``, and a sampling gap over 2 s counts as stopped
    too, as this harness, niced as well, is stopped with the run)."""
    import tempfile
    from argparse import Namespace

    from ranking.train.commands import launch_env, torchrun_command

    nproc = specs[0]["nproc"]
    dirs = [Path(args.work_dir) / s["key"] for s in specs]
    launch = Namespace(nproc=nproc, rdzv_endpoint=None, nnodes="1", node_rank=None, rdzv_id=None)
    cmd = torchrun_command(dirs[0], launch) + [a for d in dirs[1:] for a in ("--run-dir", str(d))]
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=err, text=True, cwd=REPO, env=launch_env(nproc)
        )
        stat = Path(f"/proc/{proc.pid}/stat")
        t_prev = last = time.perf_counter()
        paused = 0.0

        def failed(key: str) -> RuntimeError:
            err.seek(0)
            return RuntimeError(
                f"{key}: mixrank train failed (exit {proc.returncode}):\n{err.read()[-3000:]}"
            )

        try:
            for i, (spec, d) in enumerate(zip(specs, dirs)):
                final = i == len(specs) - 1
                while not (d / "summary.json").is_file() or (final and proc.poll() is None):
                    if proc.poll() is not None and not (d / "summary.json").is_file():
                        raise failed(spec["key"])
                    time.sleep(0.25)
                    now = time.perf_counter()
                    try:
                        state = stat.read_text().rsplit(")", 1)[1].split()[0]
                    except (OSError, IndexError):
                        state = ""
                    if state in ("T", "t"):
                        paused += now - last
                    elif now - last > 2.0:  # this process itself was stopped
                        paused += now - last - 0.25
                    last = now
                if final and proc.returncode:
                    raise failed(spec["key"])
                now = time.perf_counter()
                yield spec, now - t_prev, paused
                t_prev, paused = time.perf_counter(), 0.0
        finally:
            if proc.poll() is None:  # the caller stopped early, or a record failed
                proc.kill()
                proc.wait()


def _record(spec: dict, args, cached: bool) -> dict:
    """The result record of a finished run, from its run directory."""
    ds = spec["dataset"]
    run_dir = Path(args.work_dir) / spec["key"]
    summary = json.loads((run_dir / "summary.json").read_text())
    paused_file = run_dir / "paused_s"
    ev = summary["eval"]
    per_task = {t: m["auc"] for t, m in ev.items() if isinstance(m, dict)}  # several tasks
    ev = ev if "auc" in ev else next(v for v in ev.values() if isinstance(v, dict))
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in recs if "samples_per_s" in r]
    rates = rates[1:] or rates  # the first window includes warm-up
    spe = summary.get("steps_per_epoch") or 0
    exported = summary.get("exported_step", summary["step"])
    rec = {
        "bench": "quality",
        **{k: spec[k] for k in ("dataset", "arch", "seed", "group", "size")},
        "nproc": spec["nproc"],
        "valid_auc": ev["auc"],
        "valid_logloss": ev["logloss"],
        "samples_per_s": statistics.median(rates) if rates else None,
        "wall_s": float((run_dir / "wall_s").read_text()),
        # seconds the run stood stopped (SIGSTOP by another job on the shared machine); None
        # for runs cached from before this was measured
        "paused_s": float(paused_file.read_text()) if paused_file.is_file() else None,
        "steps": summary["step"],
        "best_epoch": round(exported / spe, 2) if spe else None,  # epochs of the reported model
        "epochs_run": round(summary["step"] / spe, 2) if spe else None,
        "stopped_early": bool(summary.get("stopped_early")),
        "cached": cached,
        **_model_counts(run_dir / "config.yaml"),
    }
    if per_task:  # the headline columns are the first task's; every task's AUC kept here
        rec["valid_auc_by_task"] = per_task
    if ds in TEST_SPLIT:
        te = _eval_test(run_dir / "artifact", Path(args.data) / TEST_SPLIT[ds])
        rec["test_auc"], rec["test_logloss"] = te["auc"], te["logloss"]
    return rec


def train_runs(specs: list[dict], args):
    """Yields ``(spec, record)`` for every spec in order; ``record`` is None for a run not
    trained yet under ``--cached-only``. Cached runs are read back; the others are prepared and
    trained in launches of up to ``--runs-per-launch`` consecutive runs with the same ``nproc``."""
    i = 0
    while i < len(specs):
        spec = specs[i]
        if _is_cached(spec, args):
            yield spec, _record(spec, args, cached=True)
            i += 1
            continue
        if getattr(args, "cached_only", False):
            yield spec, None
            i += 1
            continue
        batch = [spec]
        while (
            i + len(batch) < len(specs)
            and len(batch) < max(1, args.runs_per_launch)
            and specs[i + len(batch)]["nproc"] == spec["nproc"]
            and not _is_cached(specs[i + len(batch)], args)
        ):
            batch.append(specs[i + len(batch)])
        for s in batch:
            _prepare(s, args)
        for s, wall, paused in _launch(batch, args):
            run_dir = Path(args.work_dir) / s["key"]
            (run_dir / "quality_overrides.json").write_text(json.dumps(_run_key(s, args)))
            (run_dir / "wall_s").write_text(f"{wall:.1f}")
            (run_dir / "paused_s").write_text(f"{paused:.1f}")
            yield s, _record(s, args, cached=False)
        i += len(batch)


def train_run(spec: dict, args) -> dict | None:
    """Train (or read back) one run; returns its record."""
    return next(train_runs([spec], args))[1]


# --------------------------------------------------------------------------- the plan


def plan(args) -> list[dict]:
    quick = args.quick
    archs = args.archs.split(",") if args.archs else (
        ["dlrm", "rankmixer"] if quick else list(ARCHS)
    )  # fmt: skip
    datasets = args.datasets.split(",") if args.datasets else list(DATASETS)
    seeds = args.seeds or (1 if quick else 3)
    dims = [int(x) for x in args.scale_dims.split(",")] if args.scale_dims else (
        [16] if quick else [8, 16, 24, 32]
    )  # fmt: skip
    specs = []
    for ds in datasets:
        for arch in archs:
            for seed in range(seeds):
                specs.append(dict(dataset=ds, arch=arch, seed=seed, group="main", size=None,
                                  overrides=[], nproc=args.nproc, key=f"{ds}_{arch}_s{seed}"))  # fmt: skip
    if not args.no_scaling and "frappe" in datasets:
        import yaml

        for arch in [a for a in archs if a in MIXERS]:
            base_d = yaml.safe_load(_config("frappe", arch).read_text())["model"]["dim"]
            for d in dims:
                if d == base_d:
                    continue  # the main table's seed-0 run is this point
                specs.append(dict(dataset="frappe", arch=arch, seed=0, group="scaling", size=d,
                                  overrides=[f"model.dim={d}"], nproc=args.nproc,
                                  key=f"scale_frappe_{arch}_d{d}"))  # fmt: skip
    return specs


# --------------------------------------------------------------------------- aggregation


def _ms(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def aggregate(records: list[dict]) -> list[dict]:
    rows = []
    keys = list(dict.fromkeys((r["dataset"], r["arch"]) for r in records if r["group"] == "main"))
    for ds, arch in keys:
        rs = [
            r for r in records if r["group"] == "main" and (r["dataset"], r["arch"]) == (ds, arch)
        ]
        row = {"dataset": ds, "arch": arch, "seeds": len(rs)}
        for m in ("valid_auc", "valid_logloss", "test_auc", "test_logloss"):
            if any(m in r for r in rs):
                row[m], row[m + "_std"] = _ms([r.get(m) for r in rs])
        for m in ("dense_params", "emb_params", "flops", "epochs"):
            row[m] = rs[0][m]
        row["recipe"] = rs[0].get("recipe", "A")
        row["global_batch"] = rs[0]["nproc"] * rs[0].get("batch_per_rank", 512)
        be = [r.get("best_epoch") for r in rs if r.get("best_epoch") is not None]
        row["best_epochs"] = "/".join(f"{b:g}" for b in be) if be else "-"
        row["samples_per_s"] = statistics.median([r["samples_per_s"] for r in rs])
        row["wall_s"] = statistics.fmean([r["wall_s"] for r in rs])
        rows.append(row)
    return rows


def scaling_points(records: list[dict]) -> dict[str, list[dict]]:
    """Per mixer arch: (D, flops, params, valid AUC) of the sweep plus the main seed-0 run."""
    out: dict[str, list[dict]] = {}
    for r in records:
        if r["dataset"] != "frappe" or r["arch"] not in MIXERS:
            continue
        if r["group"] == "scaling" or (r["group"] == "main" and r["seed"] == 0):
            out.setdefault(r["arch"], []).append(r)
    return {a: sorted(v, key=lambda r: r["flops"]) for a, v in out.items() if len(v) >= 2}


def fit_log(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares y = a + b log10(x); returns (a, b, R^2)."""
    lx = [math.log10(x) for x in xs]
    mx, my = statistics.fmean(lx), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in lx)
    b = sum((x - mx) * (y - my) for x, y in zip(lx, ys)) / sxx if sxx else 0.0
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (a + b * x)) ** 2 for x, y in zip(lx, ys))
    return a, b, (1 - ss_res / ss_tot) if ss_tot else float("nan")


# --------------------------------------------------------------------------- plots


def plot(
    rows: list[dict], scaling: dict[str, list[dict]], out_dir: Path, prefix: str
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    if datasets:
        fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
        for ax, ds in zip(axes[0], datasets):
            rs = [r for r in rows if r["dataset"] == ds]
            names = [r["arch"] for r in rs]
            colors = ["tab:gray" if a in BASELINES else "tab:blue" for a in names]
            ax.bar(range(len(rs)), [r["valid_auc"] for r in rs],
                   yerr=[r["valid_auc_std"] for r in rs], color=colors, capsize=3)  # fmt: skip
            floor = LR_FLOOR[ds]["valid"]
            ax.axhline(floor, color="tab:red", ls="--", lw=1, label=f"logistic floor {floor}")
            lo = min(min(r["valid_auc"] for r in rs), floor) - 0.005
            hi = max(r["valid_auc"] + r["valid_auc_std"] for r in rs) + 0.003
            ax.set_ylim(lo, hi)
            ax.set_xticks(range(len(rs)), names, rotation=35, ha="right", fontsize=8)
            ax.set_ylabel("valid AUC (mean ± std over seeds)")
            ax.set_title(f"{ds}: valid AUC by architecture")
            ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        p = out_dir / f"{prefix}auc.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    if scaling:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, xkey, xlabel in (
            (axes[0], "flops", "forward FLOPs per sample (dense part)"),
            (axes[1], "dense_params", "dense parameters"),
        ):
            for i, (arch, pts) in enumerate(scaling.items()):
                xs, ys = [p[xkey] for p in pts], [p["valid_auc"] for p in pts]
                color = f"C{i}"
                ax.scatter(xs, ys, color=color, label=arch)
                for p in pts:
                    ax.annotate(f"D{p['size'] or _dim_of(p)}", (p[xkey], p["valid_auc"]),
                                fontsize=7, xytext=(3, 3), textcoords="offset points")  # fmt: skip
                a, b, _ = fit_log(xs, ys)
                gx = [min(xs) * (max(xs) / min(xs)) ** (k / 40) for k in range(41)]
                ax.plot(gx, [a + b * math.log10(x) for x in gx], color=color, lw=1)
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("Frappe valid AUC (seed 0)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[0].set_title("AUC vs FLOPs, fit AUC = a + b log10(FLOPs)")
        axes[1].set_title("AUC vs parameters, fit AUC = a + b log10(params)")
        fig.tight_layout()
        p = out_dir / f"{prefix}scaling.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written


def _dim_of(rec: dict) -> int:
    import yaml

    return yaml.safe_load(_config(rec["dataset"], rec["arch"]).read_text())["model"]["dim"]


# --------------------------------------------------------------------------- markdown


def _f(x, nd=4) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _si(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def markdown(rows, scaling, plots, meta) -> str:
    lines = [BEGIN, "", f"_Generated by `{meta['command']}` on {meta['date']}: "
             f"{meta['runs']} runs ({meta['trained']} trained now, {meta['wall_min']:.1f} min wall "
             f"now; the runs' own wall times sum to {meta['runs_wall_min']:.1f} min, of which "
             f"{meta.get('paused_min', 0.0):.1f} min stopped by other jobs' SIGSTOP, measured for "
             f"{meta.get('paused_measured', 0)} of the runs), "
             f"nproc {meta['nproc']}, global batch "
             f"{meta['global_batch'] or 'per config'}._", ""]  # fmt: skip
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        rs = [r for r in rows if r["dataset"] == ds]
        has_test = any("test_auc" in r for r in rs)
        lines += [f"### {ds} (train -> valid{', test' if has_test else ''})", ""]
        head = (
            "| arch | recipe | global batch | seeds | max epochs | best epoch per seed "
            "| valid AUC | valid logloss |"
        )
        sep = "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
        if has_test:
            head += " test AUC | test logloss |"
            sep += " ---: | ---: |"
        head += " dense params | emb params | FLOPs/sample | train samples/s | wall s/run |"
        sep += " ---: | ---: | ---: | ---: | ---: |"
        lines += [head, sep]
        best = max(rs, key=lambda r: r["valid_auc"])
        for r in rs:
            name = f"**{r['arch']}**" if r is best else r["arch"]
            cells = [name, r.get("recipe", "A"), str(r.get("global_batch", "-")), str(r["seeds"]),
                     str(r["epochs"]), r.get("best_epochs", "-"),
                     f"{_f(r['valid_auc'])} ± {_f(r['valid_auc_std'])}",
                     f"{_f(r['valid_logloss'])} ± {_f(r['valid_logloss_std'])}"]  # fmt: skip
            if has_test:
                cells += [f"{_f(r.get('test_auc'))} ± {_f(r.get('test_auc_std'))}",
                          f"{_f(r.get('test_logloss'))} ± {_f(r.get('test_logloss_std'))}"]  # fmt: skip
            cells += [_si(r["dense_params"]), _si(r["emb_params"]), _si(r["flops"]),
                      f"{r['samples_per_s']:,.0f}", f"{r['wall_s']:.0f}"]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        floor = LR_FLOOR[ds]
        lines += ["", "Logistic-regression floor: "
                  + ", ".join(f"{k} {v}" for k, v in floor.items()) + ".", ""]  # fmt: skip
    if scaling:
        lines += ["### Scaling sweep (Frappe valid, seed 0, width D varied)", "",
                  "| arch | D | dense params | FLOPs/sample | valid AUC |",
                  "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for arch, pts in scaling.items():
            for p in pts:
                d = p["size"] or _dim_of(p)
                lines.append(f"| {arch} | {d} | {_si(p['dense_params'])} | {_si(p['flops'])} | "
                             f"{_f(p['valid_auc'])} |")  # fmt: skip
        lines += ["", "Least-squares fits, AUC = a + b log10(x):", "",
                  "| arch | x | a | b (AUC per 10x) | R^2 |", "| --- | --- | ---: | ---: | ---: |"]  # fmt: skip
        for arch, pts in scaling.items():
            for xkey in ("flops", "dense_params"):
                a, b, r2 = fit_log([p[xkey] for p in pts], [p["valid_auc"] for p in pts])
                lines.append(f"| {arch} | {xkey} | {a:.4f} | {b:+.4f} | {_f(r2, 2)} |")
        lines.append("")
    for p in plots:
        lines += [f"![{p.stem}]({p.name})", ""]
    lines.append(END)
    return "\n".join(lines)


def write_page(path: Path, block: str) -> None:
    if path.is_file():
        text = path.read_text()
        if BEGIN in text and END in text:
            pre, rest = text.split(BEGIN, 1)
            post = rest.split(END, 1)[1]
            path.write_text(pre + block + post)
            return
    path.write_text("# Model quality on real data\n\n" + block + "\n")


# --------------------------------------------------------------------------- main


def _eta(s: float) -> str:
    s = int(max(0, s))
    return (
        f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
    )


def _estimate(spec: dict, took: dict[tuple, float], mean: float) -> float:
    """Expected seconds of a run: the last run of the same (data set, arch, size), else the mean
    of the same (data set, arch), else of the same data set, else of all trained runs."""
    key = (spec["dataset"], spec["arch"], spec["size"])
    if key in took:
        return took[key]
    for n in (2, 1):  # the same (data set, arch), else the same data set
        same = [v for k, v in took.items() if k[:n] == key[:n]]
        if same:
            return statistics.fmean(same)
    return mean


def compare_nproc(args) -> list[dict]:
    """Wall time of one identical Frappe RankMixer epoch with 1 and 2 processes."""
    out = []
    for n in (1, 2):
        spec = dict(dataset="frappe", arch="rankmixer", seed=0, group="nproc", size=None,
                    overrides=["train.epochs=1"], nproc=n, key=f"nproc_frappe_rankmixer_n{n}")  # fmt: skip
        saved = args.epochs, args.max_steps
        args.epochs, args.max_steps = None, None
        try:
            rec = train_run(spec, args)
        finally:
            args.epochs, args.max_steps = saved
        out.append(rec)
        print(f"[quality] nproc {n}: {rec['wall_s']:.0f} s wall, "
              f"{rec['samples_per_s']:,.0f} samples/s", file=sys.stderr, flush=True)  # fmt: skip
    return out


def run(args) -> int:
    from benchmarks.common import emit, table

    if args.quick:
        args.max_steps = args.max_steps or 150
    if not (Path(args.data) / "frappe" / "train.parquet").is_file():
        print(f"[quality] no data at {args.data}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    t_start = time.perf_counter()
    nproc_recs = compare_nproc(args) if args.compare_nproc else []
    specs = plan(args)
    records: list[dict] = []
    trained_s, n_trained = 0.0, 0
    took: dict[tuple, float] = {}  # (dataset, arch, size) -> seconds of its last trained run
    missing: list[str] = []
    for i, (spec, rec) in enumerate(train_runs(specs, args)):
        if rec is None:  # --cached-only and not run yet
            missing.append(spec["key"])
            continue
        if not rec["cached"]:
            trained_s += rec["wall_s"]
            n_trained += 1
        records.append(rec)
        emit(rec)
        took[(spec["dataset"], spec["arch"], spec["size"])] = rec["wall_s"]  # cached: recorded
        eta = sum(_estimate(s, took, trained_s / max(n_trained, 1)) for s in specs[i + 1 :])
        line = (f"[quality] {i + 1}/{len(specs)} {spec['key']}: valid AUC {rec['valid_auc']:.4f} "
                f"logloss {rec['valid_logloss']:.4f}")  # fmt: skip
        if "test_auc" in rec:
            line += f" test AUC {rec['test_auc']:.4f}"
        line += (f", {rec['wall_s']:.0f} s{' (cached)' if rec['cached'] else ''}, "
                 f"elapsed {_eta(time.perf_counter() - t_start)}, ETA {_eta(eta)}")  # fmt: skip
        print(line, file=sys.stderr, flush=True)
    rows = aggregate(records)
    scaling = scaling_points(records)
    prefix = "quality_quick_" if args.quick else "quality_"
    plots = plot(rows, scaling, out.parent, prefix)
    cmd = "mixrank bench quality" + (" --quick" if args.quick else "")
    cmd += " --cached-only" if getattr(args, "cached_only", False) else ""
    meta = {
        "command": cmd, "date": time.strftime("%Y-%m-%d %H:%M"), "runs": len(records),
        "trained": n_trained, "wall_min": (time.perf_counter() - t_start) / 60,
        "nproc": args.nproc, "global_batch": args.global_batch,
        "runs_wall_min": sum(r["wall_s"] for r in records + nproc_recs) / 60,
        "paused_min": sum(r.get("paused_s") or 0.0 for r in records + nproc_recs) / 60,
        "paused_measured": sum(r.get("paused_s") is not None for r in records + nproc_recs),
    }  # fmt: skip
    block = markdown(rows, scaling, plots, meta)
    if missing:
        block = block.replace(END, "Not run (planned, not finished when the page was written): "
                              + ", ".join(f"`{k}`" for k in missing) + ".\n\n" + END)  # fmt: skip
    meta["missing"] = missing
    if nproc_recs:
        a, b = nproc_recs
        block = block.replace(BEGIN, BEGIN + "\n\nnproc comparison (one Frappe RankMixer epoch, "
                              f"same global batch): 1 process {a['wall_s']:.0f} s wall "
                              f"({a['samples_per_s']:,.0f} samples/s), 2 processes "
                              f"{b['wall_s']:.0f} s ({b['samples_per_s']:,.0f} samples/s).", 1)  # fmt: skip
    write_page(out, block)
    (out.parent / f"{prefix}results.json").write_text(
        json.dumps({"meta": meta, "runs": records, "rows": rows, "nproc": nproc_recs}, indent=1)
    )
    if not args.json_only:
        table(rows, ["dataset", "arch", "seeds", "valid_auc", "valid_auc_std", "valid_logloss",
                     "test_auc", "flops", "dense_params", "samples_per_s", "wall_s"])  # fmt: skip
    print(f"[quality] wrote {out} and {', '.join(str(p) for p in plots)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    add_arguments(p)
    p.add_argument("--json-only", action="store_true")
    sys.exit(run(p.parse_args()))
