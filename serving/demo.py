"""``mixrank demo``: the main job end to end on embedded default data.

Synthesise a data set with a planted interaction signal (train and valid splits), inspect it,
stream it through the feature pipeline, train the default model with 2 processes under torchrun
(TorchRec DistributedModelParallel, gloo), evaluate the exported artifact offline, then serve it
on an in-process Ray Serve (deploy/serve.yaml) and rank a few requests over HTTP and gRPC.
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
    _step(6, "serve the artifact on Ray Serve and rank candidates over HTTP and gRPC")
    _serve(run_dir / "artifact", data / "valid")
    print(f"\ndemo finished in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


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


def _serve(artifact: Path, valid: Path) -> None:
    """Start deploy/serve.yaml on a local Ray (free loopback ports), send a few requests built
    from validation rows (the user's features as context, 20 candidate items), print the
    ranking and an excerpt of the Prometheus metrics, and shut down."""
    import urllib.request

    import pyarrow.dataset as ds

    from serving import config
    from serving.client import GRPCClient, HTTPClient, free_port

    http, grpc, metrics = free_port(), free_port(), free_port()
    rows = ds.dataset(valid, format="parquet").head(60).to_pylist()
    user_keys = (
        "user",
        "daytime",
        "weekday",
        "isweekend",
        "homework",
        "weather",
        "country",
        "city",
    )
    t0 = time.perf_counter()
    cfg = config.load_config(
        artifact=artifact,
        http_port=http,
        grpc_port=grpc,
        host="127.0.0.1",
        deployments={"Ranker": {"num_replicas": 1}},
    )
    try:
        config.start(cfg, metrics_port=metrics)
        print(f"Ray Serve up in {time.perf_counter() - t0:.1f} s: http :{http}, grpc :{grpc}")
        client = HTTPClient("127.0.0.1", http)
        for i in range(3):
            ctx = {k: rows[i][k] for k in user_keys if k in rows[i]}
            cands = [{"item": r["item"], "cost": r["cost"]} for r in rows[i * 20 : i * 20 + 20]]
            req = {"request_id": f"demo-{i}", "context": ctx, "candidates": cands, "top_k": 5}
            t1 = time.perf_counter()
            ans = client.rank(req)
            ms = (time.perf_counter() - t1) * 1e3
            print(
                f"HTTP {ans['request_id']} (user {ctx.get('user')}, {len(cands)} candidates, {ms:.1f} ms):"
            )
            for pos, j in enumerate(ans["ranking"], 1):
                print(
                    f"  {pos}. candidate {j:2d}  item {cands[j]['item']!s:>8}  score {ans['scores'][j]:.4f}"
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
    finally:
        config.stop()
        print("Ray Serve shut down.")
