"""``mixrank bench scale [--quick]``: cost curves at scale on criteo_large synthetic data (#23).

Every training point is a real ``mixrank train --nproc 2`` run (DLRM, configs/scale_1e7.yaml
with C3's table resized) on ``criteo_large`` rows, ``--steps`` steps, the final checkpoint and
the exported artifact included. For each it records:

- samples/s (the trainer's logged rates after the first log line, median);
- the peak RSS of each rank (``VmHWM`` of the rank's process, polled) beside the plan's
  estimate (``ranking.train.memory.plan_memory``: each rank's table shards + fused optimiser
  state) and the bytes every rank allocates while building the model (the tables whole);
- the final DCP checkpoint's save time (its ``.partial`` directory appearing to its rename)
  and size on disk, and the time to load its tables back (``dcp.load``, one process);
- with ``--serve``: the exported artifact loaded (``load_artifact``, memory-mapped weights) in
  a fresh process, time to its first answer and its RSS, and the forward's p50/p99 against
  candidates per request;
- with ``--export-tables fp32,int8``: the largest run's final checkpoint exported again by
  ``mixrank export --table-dtype`` in a fresh process each (time, peak RSS and peak anonymous
  RSS: the export writes the tables through a mapping of the artifact's file), each artifact
  served as above;
- ``--ray-serve A,B`` (nothing trained): each artifact through the real Ray Serve application
  (deploy/serve.yaml, one Ranker replica): seconds to RUNNING, the first answer, the
  replica's RSS (anonymous and file-backed) and ``mixrank loadtest`` p50/p99 and
  candidates/s per ``--candidates``.

Curves: samples/s against data rows (same table, more rows: ``--data-rows``) and against
table rows (``--table-rows``); peak RSS against table rows with the estimate; checkpoint
save/load time against table bytes; serve p50/p99 against candidates (``--candidates``).
``--plot`` writes them as one PNG. ``--kill-resume`` also kills the largest run after its
first checkpoint and resumes it (the resume's time to its next step).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "scale_1e7.yaml"


def add_arguments(p) -> None:
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few minutes (CI)")
    p.add_argument("--work", default="/tmp/mixrank-bench-scale", help="data and runs go here")
    p.add_argument(
        "--data-rows", default=None, help="comma list (default 2e6,1e7,5e7; 0: no data curve)"
    )
    p.add_argument(
        "--skip-data-curve", action="store_true", help="make the data, train only the tables"
    )
    p.add_argument("--data-dir", default=None, help="criteo_large train rows to use (else made)")
    p.add_argument("--table-rows", default=None, help="comma list (default 1e5,1e6,1e7)")
    p.add_argument("--candidates", default=None, help="comma list (default 64,...,4096)")
    p.add_argument("--steps", type=int, default=0, help="train steps per run (default 300)")
    p.add_argument("--batch-size", type=int, default=0, help="per rank (default 2048)")
    p.add_argument("--sharding", default="table_wise", help="C3's: table_wise or row_wise")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--serve", action="store_true", help="also load and serve each artifact")
    p.add_argument("--kill-resume", action="store_true", help="kill + resume the largest run")
    p.add_argument(
        "--export-separately",
        action="store_true",
        help="stop each run once its final checkpoint is written and export it with `mixrank "
        "export` in a fresh process (the trainer's own export runs beside the training state)",
    )
    p.add_argument(
        "--export-tables",
        default=None,
        help="comma list of table dtypes (fp32,int8,int4): also export the largest run's final "
        "checkpoint with `mixrank export --table-dtype` in a fresh process each (time, peak RSS "
        "and peak anonymous RSS) and, with --serve, serve each artifact (--quick: int8)",
    )
    p.add_argument(
        "--ray-serve",
        default=None,
        help="comma list of artifact directories: serve each through a real Ray Serve "
        "application (one Ranker replica), then time start-up, the first answer, the "
        "replica's RSS and `mixrank loadtest` per --candidates; nothing is trained",
    )
    p.add_argument("--ray-seconds", type=float, default=8.0, help="loadtest seconds per size")
    p.add_argument("--plot", default=None, help="PNG path (default docs/scale.png, not --quick)")
    p.add_argument("--results", default=None, help="append the JSON lines to this file")
    p.add_argument("--keep", action="store_true", help="keep the runs (default: delete)")
    p.add_argument("--replot", default=None, help="only table and plot the JSON lines of this file")


def _ints(s: str | None, default: list[int]) -> list[int]:
    return [int(float(x)) for x in s.split(",")] if s else default


# ------------------------------------------------------------------------------ data
def ensure_data(work: Path, rows: int, seed: int, id_range: int) -> Path:
    """``rows`` criteo_large rows under ``work`` (reused when already written)."""
    from ranking.data.synth import write_synthetic

    d = work / f"data-{rows}-s{seed}-r{id_range}"
    done = d / "_DONE"
    if not done.exists():
        shutil.rmtree(d, ignore_errors=True)
        write_synthetic("criteo_large", rows, d, seed=seed, id_range=id_range)
        done.write_text(str(rows))
    return d


def rows_in(path: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in sorted(path.glob("*.parquet")))


# ------------------------------------------------------------------------------ one run
def _descendants(pid: int) -> list[int]:
    from ranking.train.memory import _descendants as d

    return d(pid)


class CheckpointWatch:
    """Times each checkpoint: from its ``step-N.partial`` directory appearing to its rename."""

    def __init__(self, ckpt_dir: Path):
        self.dir = ckpt_dir
        self.first_seen: dict[str, float] = {}
        self.done: dict[str, float] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    def _loop(self):
        while not self._stop.is_set():
            if self.dir.is_dir():
                now = time.perf_counter()
                for p in self.dir.iterdir():
                    name = p.name.removesuffix(".partial")
                    self.first_seen.setdefault(name, now)
                    if not p.name.endswith(".partial"):
                        self.done.setdefault(name, now)
            time.sleep(0.05)

    def seconds(self) -> dict[str, float]:
        return {k: self.done[k] - self.first_seen[k] for k in sorted(self.done)}


def train_run(
    run_dir: Path,
    train: Path,
    valid: Path,
    table_rows: int,
    steps: int,
    batch: int,
    nproc: int,
    sharding: str,
    config: Path = BASE_CONFIG,
    extra: tuple[str, ...] = (),
    kill_after_checkpoint: str | None = None,
) -> dict:
    """One ``mixrank train`` run; returns its measurements (see the module docstring)."""
    from ranking.train.config import load_experiment
    from ranking.train.memory import PeakRss, plan_memory

    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    schema_file = run_dir.parent / f"{run_dir.name}-schema.yaml"
    _write_schema(schema_file, table_rows)
    overrides = [
        f"schema={schema_file}",
        f"data.train={train}",
        f"data.valid={valid}",
        f"data.batch_size={batch}",
        f"train.max_steps={steps}",
        f"train.sharding.C3={sharding}",
        *extra,
    ]
    cfg = load_experiment(config, overrides)
    est = plan_memory(cfg, nproc)
    cmd = [
        sys.executable, "-m", "ranking.cli", "train", "--config", str(config),
        "--nproc", str(nproc), "--run-dir", str(run_dir), *overrides,
    ]  # fmt: skip
    out = {
        "table_rows": table_rows,
        "data_rows": rows_in(train),
        "sharding": sharding,
        "nproc": nproc,
        "steps": steps,
        "batch_per_rank": batch,
        "table_bytes": 4 * 16 * table_rows,
        "estimate_mib": {r: v["total"] / 2**20 for r, v in est["ranks"].items()},
        "build_mib": est["build_bytes"] / 2**20,
        "data_parallel_tables": sorted(
            t for t, v in est["tables"].items() if v["sharding"] == "data_parallel"
        ),
    }
    t0 = time.perf_counter()
    killed = False
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        with PeakRss(proc.pid) as rss, CheckpointWatch(run_dir / "checkpoints") as cw:
            while proc.poll() is None:
                if kill_after_checkpoint and kill_after_checkpoint in cw.done and not killed:
                    _kill_tree(proc.pid)
                    killed = True
                time.sleep(0.1)
    out["wall_s"] = time.perf_counter() - t0
    out["peak_rss_mib"] = rss.peak_mib
    out["peak_anon_mib"] = rss.peak_anon_mib
    out["checkpoint_save_s"] = cw.seconds()
    out["killed"] = killed
    out.update(_rates(run_dir))
    final = f"step-{steps:08d}"
    if not killed or kill_after_checkpoint == final:
        out.update(_after_training(run_dir, -9 if killed else proc.returncode, cfg, steps))
    return out


def _after_training(run_dir: Path, rc: int, cfg, steps: int) -> dict:
    """Checkpoint size and load time, the artifact (exported by the trainer, or by ``mixrank
    export`` in a fresh process where the trainer's own export failed), AUC, rows."""
    out: dict = {"train_rc": rc}
    final = run_dir / "checkpoints" / f"step-{steps:08d}"
    if rc != 0 and not final.is_dir():
        tail = (run_dir.parent / f"{run_dir.name}.log").read_text()[-3000:]
        raise RuntimeError(f"mixrank train failed ({rc}):\n{tail}")
    out["checkpoint_bytes"] = _du(final)
    out["checkpoint_load_s"] = dcp_load_seconds(cfg, final)
    evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    evals = [r["eval"] for r in evals if "eval" in r]
    out["auc"] = evals[-1]["auc"] if evals else None
    if rc != 0:  # the final checkpoint is complete: export it on its own
        out["export_in_trainer"] = "killed before it" if rc == -9 else "failed (see the log)"
        out.update(export_measure(final, run_dir / "artifact"))
    out["artifact_bytes"] = _du(run_dir / "artifact")
    out["rows_trained"], out["rows_seen_by_trainer"] = _rows_trained(run_dir)
    return out


def export_measure(checkpoint: Path, artifact: Path, table_dtype: str = "fp32") -> dict:
    """``mixrank export --checkpoint`` in a fresh process: wall time, peak RSS (``VmHWM``:
    with the artifact's mapped pages being written) and peak anonymous RSS (polled)."""
    from ranking.train.memory import PeakRss

    cmd = [sys.executable, "-m", "ranking.cli", "export", "--checkpoint", str(checkpoint),
           "--out", str(artifact), "--table-dtype", table_dtype]  # fmt: skip
    t0 = time.perf_counter()
    log_file = artifact.parent.parent / f"{artifact.parent.name}-export.log"
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        with PeakRss(proc.pid, any_process=True) as rss:
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"mixrank export failed ({proc.returncode}): see {log_file}")
    return {
        "export_s": time.perf_counter() - t0,
        "export_peak_rss_mib": rss.peak_mib,
        "export_peak_anon_mib": rss.peak_anon_mib,
    }


def _kill_tree(pid: int) -> None:
    for p in [*_descendants(pid), pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def resume_run(run_dir: Path, nproc: int, steps: int, kill_after_final: bool = False) -> dict:
    """Resume a killed run (``mixrank train --run-dir``): time to its first logged step, wall."""
    from ranking.train.memory import PeakRss

    before = _steps(run_dir)
    cmd = [sys.executable, "-m", "ranking.cli", "train", "--config",
           str(run_dir / "config.yaml"), "--nproc", str(nproc), "--run-dir", str(run_dir)]  # fmt: skip
    t0 = time.perf_counter()
    first = None
    with open(run_dir.parent / f"{run_dir.name}-resume.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        final = run_dir / "checkpoints" / f"step-{steps:08d}"
        with PeakRss(proc.pid) as rss:
            while proc.poll() is None:
                if first is None and len(_steps(run_dir)) > len(before):
                    first = time.perf_counter() - t0
                if kill_after_final and (final / "rank-0.pt").exists() and final.is_dir():
                    _kill_tree(proc.pid)
                time.sleep(0.1)
    if proc.returncode != 0 and not (run_dir / "checkpoints" / f"step-{steps:08d}").is_dir():
        tail = (run_dir.parent / f"{run_dir.name}-resume.log").read_text()[-3000:]
        raise RuntimeError(f"resume failed ({proc.returncode}):\n{tail}")
    return {
        "resume_rc": proc.returncode,
        "resume_to_first_step_s": first,
        "resume_wall_s": time.perf_counter() - t0,
        "resume_peak_rss_mib": rss.peak_mib,
        "resumed_from_step": before[-1] if before else None,
    }


def _steps(run_dir: Path) -> list[int]:
    f = run_dir / "metrics.jsonl"
    if not f.exists():
        return []
    out = []
    for line in f.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "samples_per_s" in r:
            out.append(r["step"])
    return out


def _rates(run_dir: Path) -> dict:
    f = run_dir / "metrics.jsonl"
    recs = [json.loads(x) for x in f.read_text().splitlines() if x] if f.exists() else []
    rates = [r["samples_per_s"] for r in recs if "samples_per_s" in r]
    # the first log line's rate includes the first steps' warm-up
    rate = statistics.median(rates[1:] if len(rates) > 1 else rates) if rates else None
    return {"samples_per_s": rate}


def _rows_trained(run_dir: Path) -> tuple[int | None, int | None]:
    """The artifact manifest's lineage: rows stepped on (all ranks) and rows in the files."""
    man = run_dir / "artifact" / "manifest.json"
    if not man.exists():
        return None, None
    data = json.loads(man.read_text()).get("data") or {}
    return data.get("rows_read"), data.get("rows")


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _write_schema(path: Path, table_rows: int) -> None:
    import yaml

    d = yaml.safe_load((REPO / "configs" / "schemas" / "criteo_large_1e7.yaml").read_text())
    d["name"] = f"criteo_large_{table_rows}"
    for f in d["features"]:
        if f["name"] == "C3":
            f["num_buckets"] = int(table_rows)
    path.write_text(yaml.safe_dump(d, sort_keys=False))


def dcp_load_seconds(cfg, checkpoint: Path) -> float:
    """Seconds to read a checkpoint's model tensors (``dcp.load``, one process, as export does)
    into tensors allocated (not initialised) up front."""
    import torch
    import torch.distributed.checkpoint as dcp

    from ranking.model.ranker import build_model

    with torch.device("meta"):
        model = build_model(cfg.model, cfg.schema, device="meta")
    model = model.to_empty(device="cpu")
    state = {"model": model.state_dict()}
    t0 = time.perf_counter()
    dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    s = time.perf_counter() - t0
    del model, state
    return s


# ------------------------------------------------------------------------------ serving
SERVE_SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np, torch
from ranking.export import load_artifact
from ranking.data.convert import batch_from_arrow
from ranking.data.synth import LargeGenerator
torch.set_num_threads(1)
art_dir, cands, iters, id_range = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def rss():
    # VmRSS, and its anonymous part (RssAnon: private memory) and file part (RssFile: pages of
    # the memory-mapped weights that lookups touched; page cache, reclaimable)
    got = {}
    for l in open('/proc/self/status'):
        k = l.split(':')[0]
        if k in ('VmRSS', 'RssAnon', 'RssFile'):
            got[k] = round(int(l.split()[1]) / 1024, 1)
    return got
t_import = time.perf_counter() - t0
gen = LargeGenerator(5, 0, id_range=id_range)
rows = gen.chunk(0, max(cands))
t1 = time.perf_counter()
art = load_artifact(art_dir)
first = art.predict(batch_from_arrow(art.schema, rows.slice(0, 1)))
out = {"first_answer_s": time.perf_counter() - t1, "rss_after_first_mib": rss()}
lat = {}
for n in cands:
    b = batch_from_arrow(art.schema, rows.slice(0, n))
    art.predict(b)
    ts = []
    for _ in range(iters):
        s = time.perf_counter(); art.predict(b); ts.append(time.perf_counter() - s)
    ts.sort()
    lat[n] = (ts[len(ts) // 2] * 1e3, ts[min(len(ts) - 1, int(0.99 * len(ts)))] * 1e3)
out["latency_ms"] = lat
out["rss_after_mib"] = rss()
out["peak_rss_mib"] = [int(l.split()[1]) / 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0]
print(json.dumps(out))
"""


def serve_measure(artifact: Path, candidates: list[int], iters: int, id_range: int) -> dict:
    """Load an artifact in a fresh process (one torch thread, as a replica): time to the first
    answer, RSS, forward p50/p99 (ms) per candidates per request."""
    r = subprocess.run(
        [sys.executable, "-c", SERVE_SCRIPT, str(artifact), json.dumps(candidates), str(iters),
         str(id_range)],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(f"serving the artifact failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _replica_pids() -> list[int]:
    """Processes whose title is a Ranker replica's (Ray names them
    ``ray::ServeReplica:<app>:Ranker``)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if b"ServeReplica" in cmd and b"Ranker" in cmd:
                out.append(int(d.name))
    return out


def _status_mib(pid: int) -> dict:
    from ranking.train.memory import _status_kib

    return {k: round((_status_kib(pid, k) or 0) / 1024, 1) for k in ("VmRSS", "RssAnon", "RssFile")}


def ray_serve_measure(artifact: Path, candidates: list[int], seconds: float) -> dict:
    """Serve ``artifact`` with the shipped Serve config (one Ranker replica) on free
    loopback ports (``max_candidates`` raised to the largest size): seconds to RUNNING (``serving.config.start``: Ray, the proxies and the
    replica loading the artifact), the first answer over HTTP, the replica's RSS (its anonymous
    and file-backed parts) then and after `mixrank loadtest`'s closed loop (concurrency 2,
    ``seconds`` per size) at each candidates-per-request size."""
    from ranking.export import load_artifact
    from serving import config
    from serving.client import HTTPClient, free_port
    from serving.loadtest import run_load, synthetic_request

    schema = load_artifact(artifact).schema  # mapped: cheap
    http, grpc, metrics = free_port(), free_port(), free_port()
    cfg = config.load_config(
        artifact=artifact, http_port=http, grpc_port=grpc, host="127.0.0.1",
        deployments={"Ranker": {"num_replicas": 1,
                                "user_config": {"max_candidates": max(candidates)}}},
    )  # fmt: skip
    out: dict = {"artifact": str(artifact)}
    t0 = time.perf_counter()
    try:
        config.start(cfg, metrics_port=metrics)
        out["start_s"] = time.perf_counter() - t0
        pids = _replica_pids()
        out["replica_pids"] = pids
        client = HTTPClient("127.0.0.1", http, timeout=120)
        req = synthetic_request(schema, 1)
        t1 = time.perf_counter()
        client.rank(req)
        out["first_answer_ms"] = (time.perf_counter() - t1) * 1e3
        out["replica_rss_after_start_mib"] = _status_mib(pids[0]) if pids else None
        out["loadtest"] = {}
        for n in candidates:
            r = run_load(f"http://127.0.0.1:{http}", synthetic_request(schema, n, seed=n),
                         concurrency=2, duration=seconds)  # fmt: skip
            out["loadtest"][n] = {k: r[k] for k in ("ok", "errors", "p50_ms", "p99_ms", "rps",
                                                    "candidates_per_s")}  # fmt: skip
            print(f"  ray serve {artifact.name}: {n} candidates: p50 {r['p50_ms']} ms, "
                  f"p99 {r['p99_ms']} ms, {r['candidates_per_s']:,.0f} candidates/s", flush=True)  # fmt: skip
        out["replica_rss_after_mib"] = _status_mib(pids[0]) if pids else None
        if pids:
            from ranking.train.memory import _status_kib

            out["replica_peak_rss_mib"] = (_status_kib(pids[0], "VmHWM") or 0) / 1024
    finally:
        config.stop()
    return out


# ------------------------------------------------------------------------------ the benchmark
def run(args) -> int:
    if args.replot:
        recs = [json.loads(x) for x in Path(args.replot).read_text().splitlines() if x.strip()]
        _table(recs)
        plot_results(recs, args.plot or str(REPO / "docs" / "scale.png"))
        return 0
    if args.ray_serve:
        cands = _ints(args.candidates, [64, 256, 1024, 4096])
        for a in args.ray_serve.split(","):
            rec = {"case": "ray_serve", **ray_serve_measure(Path(a), cands, args.ray_seconds)}
            print(json.dumps(rec, default=str), flush=True)
            if args.results:
                with open(args.results, "a") as f:
                    f.write(json.dumps(rec, default=str) + "\n")
        return 0
    quick = args.quick
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data_rows = _ints(args.data_rows, [20000, 60000] if quick else [2 * 10**6, 10**7, 5 * 10**7])
    table_rows = _ints(args.table_rows, [1000, 20000] if quick else [10**5, 10**6, 10**7])
    cands = _ints(args.candidates, [64, 256] if quick else [64, 256, 1024, 4096])
    steps = args.steps or (8 if quick else 200)
    batch = args.batch_size or (256 if quick else 2048)
    id_range = 10**5 if quick else 10**8
    results: list[dict] = []

    def emit(rec: dict) -> None:
        results.append(rec)
        line = json.dumps(rec, default=str)
        print(line, flush=True)
        if args.results:
            with open(args.results, "a") as f:
                f.write(line + "\n")

    t0 = time.perf_counter()
    valid = ensure_data(work, 4096 if quick else 200000, 1, id_range)
    mid_table = table_rows[len(table_rows) // 2]
    if args.data_dir:
        biggest = Path(args.data_dir)
    else:
        biggest = ensure_data(work, max(data_rows), 0, id_range)
        emit({"case": "data", "rows": max(data_rows), "rows_read_back": rows_in(biggest)})
    for n in [n for n in data_rows if n > 0 and not args.skip_data_curve]:
        sub = _subset(work, biggest, n)
        rec = train_run(work / f"run-data-{n}", sub, valid, mid_table, steps, batch,
                        args.nproc, args.sharding)  # fmt: skip
        emit({"case": "data_rows", **rec})
        _cleanup(work / f"run-data-{n}", args.keep)
    train = _subset(work, biggest, max(1, min(data_rows)))
    for i, n in enumerate(table_rows):
        last = i == len(table_rows) - 1
        run_dir = work / f"run-table-{n}"
        stop_at = f"step-{steps:08d}" if args.export_separately else None
        rec = train_run(run_dir, train, valid, n, steps, batch, args.nproc, args.sharding,
                        kill_after_checkpoint=stop_at)  # fmt: skip
        if args.serve or quick:
            rec["serve"] = serve_measure(
                run_dir / "artifact", cands, 20 if quick else 200, id_range
            )
        emit({"case": "table_rows", **rec})
        for td in _export_tables(args.export_tables, quick) if last else []:
            final = run_dir / "checkpoints" / f"step-{steps:08d}"
            out = run_dir / f"artifact-{td}"
            ex = {"case": "export", "table_rows": n, "table_dtype": td,
                  **export_measure(final, out, td), "artifact_bytes": _du(out)}  # fmt: skip
            if args.serve or quick:
                ex["serve"] = serve_measure(out, cands, 20 if quick else 200, id_range)
            emit(ex)
        if last and args.kill_resume:
            k = train_run(run_dir, train, valid, n, steps, batch, args.nproc, args.sharding,
                          extra=(f"train.checkpoint_every={max(1, steps // 2)}",),
                          kill_after_checkpoint=f"step-{max(1, steps // 2):08d}")  # fmt: skip
            emit(
                {
                    "case": "kill_resume",
                    **k,
                    **resume_run(run_dir, args.nproc, steps, args.export_separately),
                }
            )
        _cleanup(run_dir, args.keep)
    print(f"bench scale: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    _table(results)
    plot = args.plot or (None if quick else str(REPO / "docs" / "scale.png"))
    if plot:
        plot_results(results, plot)
    return 0


def _export_tables(arg: str | None, quick: bool) -> list[str]:
    if arg is None:
        return ["int8"] if quick else []
    return [x for x in arg.split(",") if x]


def _subset(work: Path, src: Path, rows: int) -> Path:
    """A directory of links to the first files of ``src`` holding at least ``rows`` rows (the
    whole files: the point is the reader's cost per data set size)."""
    import pyarrow.parquet as pq

    d = work / f"subset-{src.name}-{rows}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    have = 0
    for f in sorted(src.glob("*.parquet")):
        if have >= rows:
            break
        (d / f.name).symlink_to(f.resolve())
        have += pq.ParquetFile(f).metadata.num_rows
    return d


def _cleanup(run_dir: Path, keep: bool) -> None:
    if not keep:
        shutil.rmtree(run_dir, ignore_errors=True)


def _table(results: list[dict]) -> None:
    print(f"{'case':<11} {'data rows':>10} {'table rows':>11} {'samples/s':>10} "
          f"{'peak RSS MiB/rank':>20} {'plan MiB/rank':>16} {'ckpt s':>7} {'load s':>7}")  # fmt: skip
    for r in results:
        if r["case"] not in ("data_rows", "table_rows", "kill_resume"):
            continue
        rss = "/".join(f"{v:.0f}" for v in r["peak_rss_mib"].values())
        est = "/".join(f"{v:.0f}" for v in r["estimate_mib"].values())
        ck = sum(r["checkpoint_save_s"].values()) if r["checkpoint_save_s"] else float("nan")
        print(f"{r['case']:<11} {r['data_rows']:>10} {r['table_rows']:>11} "
              f"{r['samples_per_s'] or 0:>10.0f} {rss:>20} {est:>16} {ck:>7.2f} "
              f"{r.get('checkpoint_load_s', float('nan')):>7.2f}")  # fmt: skip
    for r in results:
        if r["case"] == "export":
            peak, anon = _get(r["export_peak_rss_mib"], "0"), _get(r["export_peak_anon_mib"], "0")
            srv = r.get("serve") or {}
            print(f"export {r['table_dtype']:<5} table rows {r['table_rows']}: "
                  f"{r['export_s']:.1f} s, peak RSS {peak:.0f} MiB (anonymous {anon:.0f}), "
                  f"{r['artifact_bytes'] / 2**20:.0f} MiB; first answer "
                  f"{srv.get('first_answer_s', float('nan')):.2f} s")  # fmt: skip


def plot_results(results: list[dict], path: str) -> None:
    """The four curves as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    dr = [r for r in results if r["case"] == "data_rows"]
    tr = sorted(
        [r for r in results if r["case"] in ("table_rows", "big")], key=lambda r: r["table_rows"]
    )
    shardings = sorted({r["sharding"] for r in tr})
    a = ax[0, 0]
    if dr:
        a.plot([r["data_rows"] for r in dr], [r["samples_per_s"] for r in dr], "o-",
               label="vs data rows (C3 table 10^6)")  # fmt: skip
    for sh in shardings:
        t = [r for r in tr if r["sharding"] == sh]
        a.plot([r["table_rows"] for r in t], [r["samples_per_s"] for r in t], "s-",
               label=f"vs C3 table rows, {sh}")  # fmt: skip
    a.set_xscale("log")
    a.set_ylim(bottom=0)
    a.set(title="train samples/s (2 ranks, DLRM)", xlabel="rows")
    a.legend(fontsize=7)
    a = ax[0, 1]
    for sh in shardings:
        t = [r for r in tr if r["sharding"] == sh]
        xs = [r["table_rows"] for r in t]
        for rank in ("0", "1"):
            a.plot(xs, [_get(r["peak_rss_mib"], rank) / 1024 for r in t], "o-",
                   label=f"{sh} rank {rank} peak RSS")  # fmt: skip
            a.plot(xs, [_get(r["estimate_mib"], rank) / 1024 for r in t], "x--",
                   label=f"{sh} rank {rank} plan estimate")  # fmt: skip
    a.set_xscale("log")
    a.set(title="memory per rank (GiB)", xlabel="C3 table rows")
    a.legend(fontsize=6)
    a = ax[1, 0]
    ck = [r for r in tr if r.get("checkpoint_save_s") and r.get("checkpoint_bytes")]
    xs = [r["checkpoint_bytes"] / 2**30 for r in ck]
    a.plot(xs, [max(r["checkpoint_save_s"].values()) for r in ck], "o", label="DCP save (2 ranks)")
    a.plot(xs, [r.get("checkpoint_load_s") for r in ck], "s", label="DCP load (1 process)")
    a.set_xscale("log")
    a.set(title="checkpoint time (s)", xlabel="checkpoint GiB on disk (tables + optimiser)")
    a.legend()
    a = ax[1, 1]
    for r in tr:
        lat = (r.get("serve") or {}).get("latency_ms")
        if not lat:
            continue
        ns = sorted(int(k) for k in lat)
        lbl = f"{r['table_rows']:.0e} rows, {r['sharding']}"
        a.plot(ns, [lat[_k(lat, n)][0] for n in ns], "o-", label=f"p50 {lbl}")
        a.plot(ns, [lat[_k(lat, n)][1] for n in ns], "x--", label=f"p99 {lbl}")
    a.set_xscale("log", base=2)
    a.set_yscale("log")
    a.set(title="forward of the loaded artifact (ms, 1 thread)", xlabel="candidates per request")
    a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"plot: {path}", file=sys.stderr)


def _get(d: dict, rank: str) -> float:
    return d.get(rank, d.get(int(rank), float("nan")))


def _k(d: dict, n: int):
    return n if n in d else str(n)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_scale")
    add_arguments(parser)
    parser.add_argument("--json-only", action="store_true")
    raise SystemExit(run(parser.parse_args()))
