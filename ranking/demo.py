"""``mixrank demo``: the main job end to end on embedded default data.

Synthesise a data set with a planted interaction signal (train and valid splits), inspect it,
stream it through the feature pipeline, train the default model with 2 processes under torchrun
(TorchRec DistributedModelParallel, gloo), and evaluate the exported artifact offline.
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
