"""``mixrank demo``: the main job end to end on embedded default data, then one turn of the
continuous-training loop.

Synthesise a data set with a planted interaction signal (train and valid splits), inspect it,
stream it through the feature pipeline, train the default model with 2 processes under torchrun
(TorchRec DistributedModelParallel, gloo), evaluate the exported artifact offline, then serve it
on an in-process Ray Serve (deploy/serve.yaml) with request logging and rank a few requests over
HTTP and gRPC. Then day 2 (the planted signal has drifted a little): live traffic is logged,
its clicks simulated from the day-2 signal, joined with the log into training rows, a day-2
model warm-started from day 1 on them, the day-1 logs re-scored offline (train/serve
consistency), the day-2 model gated, shadowed and rolled out through Serve's REST API, and a
model trained on shuffled labels refused by the gate.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the main job end to end on embedded default data")
    p.add_argument("--rows", type=int, default=100_000, help="synthetic training rows")
    p.add_argument("--nproc", type=int, default=2, help="training processes (default 2)")
    p.add_argument("--config", default=str(DEMO_CONFIG), help="experiment YAML")
    p.add_argument("--workdir", default=None, help="keep outputs here (default: a temp dir)")
    p.add_argument(
        "--no-loop", action="store_true", help="stop after serving day 1 (no day-2 loop)"
    )
    p.set_defaults(func=run)


def _step(n: int, title: str) -> None:
    print(f"\n== [{n}] {title}", flush=True)


def run(args) -> int:
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
        return _run(args, work)
    with tempfile.TemporaryDirectory(prefix="mixrank-demo-") as tmp:
        return _run(args, Path(tmp))


def _run(args, work: Path) -> int:
    import yaml

    from ranking.cli import main as cli

    cfg = yaml.safe_load(Path(args.config).read_text())
    preset = cfg["schema"]
    data = work / "data"
    t0 = time.perf_counter()

    _step(1, f"synthesise {args.rows:,} + {args.rows // 4:,} {preset}-shaped rows (planted signal)")
    for split, rows, seed in (("train", args.rows, 1), ("valid", args.rows // 4, 2)):
        rc = cli(
            [
                "data",
                "synth",
                "--preset",
                preset,
                "--rows",
                str(rows),
                "--out",
                str(data / split),
                "--seed",
                str(seed),
            ]
        )
        if rc:
            return rc

    _step(2, "inspect the training data")
    rc = cli(["data", "inspect", str(data / "train"), "--schema", preset])
    if rc:
        return rc

    _step(3, "stream it through the feature pipeline into model batches")
    _read(preset, data / "train", cfg["data"].get("batch_size", 1024))

    _step(4, f"train {cfg['model']['arch']} with {args.nproc} processes (torchrun + DMP)")
    run_dir = work / "run"
    rc = cli(
        [
            "train",
            "--config",
            args.config,
            "--nproc",
            str(args.nproc),
            "--run-dir",
            str(run_dir),
            f"data.train={data / 'train'}",
            f"data.valid={data / 'valid'}",
        ]
    )
    if rc:
        return rc

    _step(5, "evaluate the exported artifact offline")
    rc = cli(["eval", "--artifact", str(run_dir / "artifact"), "--data", str(data / "valid")])
    if rc:
        return rc
    manifest = json.loads((run_dir / "artifact" / "manifest.json").read_text())
    print(
        f"artifact {run_dir / 'artifact'}: model_version {manifest['model_version']}, "
        f"arch {manifest['arch']}, step {manifest['step']}"
    )
    _step(6, "serve the artifact on Ray Serve (request log on) and rank over HTTP and gRPC")
    rc = _serve(args, work, run_dir / "artifact", data / "valid", preset)
    print(f"\ndemo finished in {time.perf_counter() - t0:.1f} s", flush=True)
    return rc


def _read(preset: str, path: Path, batch_size: int) -> None:
    from ranking.data.reader import ParquetBatches
    from ranking.features import load_schema

    schema = load_schema(preset)
    reader = ParquetBatches(schema, path, batch_size, rank=0, world_size=1, shuffle=True)
    t0 = time.perf_counter()
    rows = 0
    first = None
    for batch in reader:
        rows += batch.size
        first = first or batch
    dt = time.perf_counter() - t0
    print(f"read {rows:,} rows in {dt:.2f} s ({rows / dt:,.0f} rows/s)")
    print(
        f"first batch: dense {tuple(first.dense.shape)}, labels {tuple(first.labels.shape)}, "
        f"sparse keys {first.sparse.keys()[:4]}..., ids {first.sparse.values().numel()}"
    )


USER_KEYS = ("user", "daytime", "weekday", "isweekend", "homework", "weather", "country", "city")
DRIFT = 0.15  # radians per day the planted signal turns (ranking/data/synth.py)


def _requests(rows: list[dict], n: int, cands: int, tag: str) -> list[dict]:
    """``n`` requests from data rows: a row's user features as the context, the items (and
    their cost) of the next ``cands`` rows as candidates."""
    out = []
    for i in range(n):
        base = (i * cands) % max(len(rows) - cands, 1)
        ctx = {k: rows[base][k] for k in USER_KEYS if k in rows[base]}
        cs = [{"item": r["item"], "cost": r["cost"]} for r in rows[base : base + cands]]
        out.append({"request_id": f"{tag}-{i}", "context": ctx, "candidates": cs})
    return out


def _serve(args, work: Path, artifact: Path, valid: Path, preset: str) -> int:
    """Start deploy/serve.yaml on a local Ray (free loopback ports, request logging, Serve's
    REST API), send a few requests built from validation rows, print the ranking and an
    excerpt of the Prometheus metrics; then the day-2 loop (``_loop``); shut down."""
    import urllib.request

    import pyarrow.dataset as ds

    from serving import config
    from serving.client import GRPCClient, HTTPClient, free_port

    http, grpc, metrics, dash = free_port(), free_port(), free_port(), free_port()
    rows = ds.dataset(valid, format="parquet").head(60).to_pylist()
    t0 = time.perf_counter()
    logs = work / "logs"
    cfg = config.load_config(
        artifact=artifact,
        http_port=http,
        grpc_port=grpc,
        host="127.0.0.1",
        deployments={
            "Ranker": {
                "num_replicas": 1,
                "user_config": {"log_dir": str(logs), "log_flush_seconds": 1.0},
            }
        },
    )
    try:
        config.start(cfg, metrics_port=metrics, dashboard_port=None if args.no_loop else dash)
        print(f"Ray Serve up in {time.perf_counter() - t0:.1f} s: http :{http}, grpc :{grpc}")
        client = HTTPClient("127.0.0.1", http)
        for req in _requests(rows, 2, 20, "demo"):
            req["top_k"] = 5
            t1 = time.perf_counter()
            ans = client.rank(req)
            ms = (time.perf_counter() - t1) * 1e3
            cands = req["candidates"]
            print(
                f"HTTP {ans['request_id']} (user {req['context'].get('user')}, {len(cands)} "
                f"candidates, {ms:.1f} ms): top 5 items "
                + ", ".join(f"{cands[j]['item']} ({ans['scores'][j]:.3f})" for j in ans["ranking"])
            )
        g = GRPCClient("127.0.0.1", grpc)
        ans_g = g.rank(req)
        g.close()
        same = ans_g["ranking"] == ans["ranking"]
        print(
            f"gRPC {ans_g['request_id']}: top-5 {ans_g['ranking']} (same as HTTP: {same}), model {ans_g['model_version']}"
        )
        status, err = client.rank_raw(b'{"candidates": [{"item": NaN}]}')
        print(f"a bad request gets {status}: {err}")
        time.sleep(2.5)  # one metrics export interval
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10).read()
        print("metrics excerpt (Ray's Prometheus endpoint):")
        for line in text.decode().splitlines():
            if line.startswith(
                ("ray_mixrank_requests_total", "ray_mixrank_model_info", "ray_mixrank_scored")
            ):
                name, value = line.split("{")[0], line.rsplit(" ", 1)[1]
                if float(value) == 0:  # the series every replica creates at 0 when it starts
                    continue
                keep = [
                    kv
                    for kv in line.split("{")[1].split("}")[0].split(",")
                    if kv.split("=")[0] in ("route", "code", "model_version", "dtype")
                ]
                print(f"  {name}{{{','.join(keep)}}} {value}")
        if args.no_loop:
            return 0
        return _loop(args, work, artifact, preset, logs, http, dash, metrics)
    finally:
        config.stop()
        print("Ray Serve shut down.")


def _traffic(http: int, requests: list[dict], threads: int = 4) -> list[dict]:
    from concurrent.futures import ThreadPoolExecutor

    from serving.client import HTTPClient

    def send(chunk):
        c = HTTPClient("127.0.0.1", http)
        try:
            return [c.rank(r) for r in chunk]
        finally:
            c.close()

    chunks = [requests[k::threads] for k in range(threads)]
    with ThreadPoolExecutor(threads) as ex:
        return [a for part in ex.map(send, chunks) for a in part]


def _loop(args, work, artifact, preset, logs, http, dash, metrics) -> int:
    """Day 2: traffic logged, clicks simulated from the drifted signal, join, warm start,
    consistency check, gate + shadow + rollout. One line per step."""
    import threading

    import numpy as np
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq
    from ray import serve

    from ranking.cli import main as cli
    from ranking.consistency import check_consistency
    from ranking.data.join import join_labels
    from ranking.data.servedlog import read_logs
    from ranking.data.synth import Generator
    from serving.rollout import RolloutRefused, ServeAdmin, rollout

    day2 = work / "day2"
    t0 = time.perf_counter()
    _step(7, f"day 2: the planted signal drifts ({DRIFT} rad); live traffic, logged")
    for split, rows, seed in (("rows", 30_000, 11), ("valid", 20_000, 12)):
        rc = cli(["data", "synth", "--preset", preset, "--rows", str(rows), "--out",
                  str(day2 / split), "--seed", str(seed), "--day", "2", "--drift", str(DRIFT),
                  "--quiet"])  # fmt: skip
        if rc:
            return rc
    src = ds.dataset(day2 / "rows", format="parquet").to_table().to_pylist()
    answers = _traffic(http, _requests(src, 600, 50, "day2"))
    admin = ServeAdmin(f"http://127.0.0.1:{dash}")
    serve.get_deployment_handle("Ranker", "mixrank").flush_log.remote().result()  # 1 replica
    log_rows = read_logs(str(logs)).to_table()
    print(
        f"{len(answers)} requests answered, {log_rows.num_rows:,} candidate rows in the request "
        f"log {logs} ({time.perf_counter() - t0:.1f} s)"
    )

    _step(8, "simulated clicks on the logged candidates, from the day-2 planted signal")
    gen = Generator(preset, signal_seed=0, day=2, drift=DRIFT)
    p = gen.click_probability(log_rows)
    clicked = np.random.default_rng(0).random(len(p)) < p
    events = log_rows.filter(pa.array(clicked)).select(["request_id", "candidate"])
    events = events.append_column("label", pa.array(np.ones(events.num_rows)))
    pq.write_table(events, work / "clicks.parquet")
    print(f"{events.num_rows:,} clicks on {len(p):,} impressions ({clicked.mean():.1%})")

    _step(9, "join the request log with the clicks into training rows")
    res = join_labels(str(logs), str(work / "clicks.parquet"), str(work / "joined"), quiet=True)
    print(f"{res['rows']:,} rows, {res['labelled']:,} positive, partitions dt={res['days']}")

    _step(10, "day-2 model: warm start from day 1 on the new partition")
    run2 = work / "run2"
    rc = cli(
        [
            "train", "--config", args.config, "--nproc", str(args.nproc), "--run-dir", str(run2),
            "--warm-start", str(artifact), f"data.train={work / 'joined'}",
            f"data.since={res['days'][-1]}", f"data.valid={day2 / 'valid'}",
            "train.epochs=1", "train.warmup_steps=0", "train.log_every=1000",
        ]
    )  # fmt: skip
    if rc:
        return rc
    new = run2 / "artifact"

    _step(11, "train/serve consistency: the day-1 logs re-scored through the training path")
    rep = check_consistency(str(artifact), str(logs), quiet=True)
    worst = max(t["max_abs"] for t in rep["tasks"].values())
    print(f"{rep['rows']:,} rows: max |offline - online| = {worst:.2e} (ok: {rep['ok']})")

    _step(12, "roll the day-2 model out: check, gate on day-2 data, shadow, promote")
    stop = threading.Event()
    more = _requests(src, 400, 50, "live")

    def live():
        k = 0
        while not stop.is_set():
            _traffic(http, more[k % 400 : k % 400 + 8], threads=2)
            k += 8

    bg = threading.Thread(target=live, daemon=True)
    bg.start()
    try:
        report = rollout(
            admin,
            str(new),
            url=f"http://127.0.0.1:{http}",
            gate_data=str(day2 / "valid"),
            max_auc_drop=0.005,
            shadow_seconds=3,
            metrics_urls=[f"http://127.0.0.1:{metrics}/metrics"],
        )
        g = report["gate"]
        print(
            f"promoted {report['model_version']}: day-2 AUC {g['new']['auc']:.4f} vs the day-1 "
            f"model's {g['serving']['auc']:.4f}"
        )
    except RolloutRefused as e:
        print(f"not rolled out: {e}")
    finally:
        stop.set()
        bg.join(30)

    _step(13, "a model trained on shuffled labels is refused by the gate")
    shuffled = work / "shuffled" / f"dt={res['days'][-1]}"
    shuffled.mkdir(parents=True)
    t = ds.dataset(work / "joined" / f"dt={res['days'][-1]}", format="parquet").to_table()
    perm = np.random.default_rng(1).permutation(t.num_rows)
    t = t.set_column(t.schema.get_field_index("label"), "label", t["label"].take(pa.array(perm)))
    pq.write_table(t, shuffled / "part-0.parquet")
    run3 = work / "run3"
    rc = cli(
        [
            "train", "--config", args.config, "--nproc", str(args.nproc), "--run-dir", str(run3),
            f"data.train={work / 'shuffled'}", f"data.valid={day2 / 'valid'}",
            "train.epochs=1", "train.log_every=1000",
        ]
    )  # fmt: skip
    if rc:
        return rc
    try:
        rollout(
            admin,
            str(run3 / "artifact"),
            url=f"http://127.0.0.1:{http}",
            gate_data=str(day2 / "valid"),
            max_auc_drop=0.005,
        )
        print("the shuffled-label model passed the gate: the gate is broken")
        return 1
    except RolloutRefused as e:
        print(f"refused: {e}")
    return 0
