"""``mixrank train``, ``mixrank export`` and ``mixrank eval``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train under torchrun (DistributedModelParallel); resumes a run directory",
        description="Validates the config, writes the run directory, then starts torchrun. "
        "Re-running with the same --run-dir resumes from its newest complete checkpoint.",
    )
    p.add_argument("--config", required=True, help="experiment YAML (configs/*.yaml)")
    p.add_argument("--nproc", type=int, default=1, help="processes per node (default 1)")
    p.add_argument("--run-dir", default=None, help="default: runs/<config name>-<time>")
    p.add_argument("--nnodes", default="1", help="torchrun --nnodes (multi-node: e.g. 2 or 1:4)")
    p.add_argument("--node-rank", type=int, default=None, help="torchrun --node-rank")
    p.add_argument(
        "--rdzv-endpoint", default=None, help="host:port of the c10d rendezvous (multi-node)"
    )
    p.add_argument("--rdzv-id", default=None, help="rendezvous id (default: the run name)")
    p.add_argument(
        "--warm-start",
        default=None,
        metavar="PATH",
        help="start from this exported artifact or training checkpoint instead of a fresh init "
        "(sets train.warm_start; a resumed run continues from its own checkpoint instead)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.lr=0.01")
    p.set_defaults(func=train)

    p = sub.add_parser(
        "export", help="write a serving artifact from a training checkpoint or another artifact"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoints/step-N directory")
    src.add_argument("--artifact", help="re-export this artifact (e.g. with int8 tables)")
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["fp32", "bf16", "int8", "fp8"],
        help="dense weights (default: fp32 from a checkpoint, the source's from an artifact); "
        "int8: the mixer blocks' GEMMs (a baseline's linear layers) served in int8 on the CPU; "
        "fp8: the same GEMMs on e4m3 operands, for a GPU (emulated on the CPU)",
    )
    p.add_argument(
        "--table-dtype",
        default="fp32",
        choices=["fp32", "int8", "int4"],
        help="embedding tables: fp32, or row-wise int8 / int4 (FBGEMM's fused rows with an "
        "fp16 scale and bias per row, served by TorchRec's quantized embedding modules)",
    )
    p.set_defaults(func=export)

    p = sub.add_parser("eval", help="AUC/logloss/NE of an artifact on a Parquet data set")
    p.add_argument("--artifact", required=True)
    p.add_argument("--data", required=True, help="Parquet file, directory or glob")
    p.add_argument("--batch-size", type=int, default=8192)
    p.add_argument(
        "--dtype", default=None, choices=["fp32", "bf16", "int8", "fp8"], help="default: manifest's"
    )
    p.set_defaults(func=evaluate)


def _resolve_paths(raw: dict) -> dict:
    data = raw.get("data") or {}
    for k in ("train", "valid"):
        if data.get(k) and not os.path.isabs(data[k]):
            data[k] = os.path.abspath(data[k])
    train = raw.get("train") or {}
    if train.get("warm_start") and not os.path.isabs(train["warm_start"]):
        train["warm_start"] = os.path.abspath(train["warm_start"])
    return raw


def prepare_run(
    config: str, overrides: list[str], run_dir: str | None, warm_start: str | None = None
) -> Path:
    """Validate the config (before any process starts) and write ``<run>/config.yaml``.

    ``warm_start`` (``--warm-start``) overrides ``train.warm_start``; a new run checks that the
    parent fits (``ranking.train.warm_start.check_compatible``) before anything starts."""
    import yaml

    from ranking.errors import UserError
    from ranking.train.config import ConfigError, load_experiment

    try:
        exp = load_experiment(config, overrides)
        if warm_start:  # set here, not as an override: a path is not parsed as YAML
            exp.train.warm_start = os.path.abspath(warm_start)
            exp.raw.setdefault("train", {})["warm_start"] = exp.train.warm_start
        check_model_shapes(exp)
        check_data(exp)
    except ConfigError as e:
        raise UserError(str(e)) from e
    raw = _resolve_paths(exp.raw)
    raw["name"] = exp.name
    if not isinstance(raw.get("schema"), str) or not os.path.isabs(raw["schema"]):
        sch = raw.get("schema")
        if isinstance(sch, str) and os.path.exists(sch):
            raw["schema"] = os.path.abspath(sch)
    run = Path(run_dir or f"runs/{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if exp.data.vocab_from_train:
        raw["schema"] = str(build_run_vocab(exp, run).resolve())
    existing = run / "config.yaml"
    if existing.is_file():  # resuming: the run must be continued with the same config
        old = yaml.safe_load(existing.read_text())
        if old != raw:
            diff = sorted(_diff_keys(old, raw))
            raise UserError(
                f"{existing}: the run directory holds a different config (differs at "
                f"{', '.join(diff[:5])}); resume with the same config or use a new --run-dir"
            )
        print(f"[mixrank] resuming run {run}", file=sys.stderr, flush=True)
        return run
    if exp.train.warm_start:
        check_warm_start(exp, raw, "--warm-start" if warm_start else "train.warm_start")
    run.mkdir(parents=True, exist_ok=True)
    # Atomic: on a shared volume every node of a multi-node job writes the same file, and
    # another may be reading it to check that it is resuming the same config.
    tmp = run / f".config.yaml.{os.getpid()}"
    tmp.write_text(yaml.safe_dump(raw, sort_keys=False))
    os.replace(tmp, existing)
    return run


def build_run_vocab(exp, run: Path) -> Path:
    """``data.vocab_from_train``: per-field vocabularies of ``data.train`` in ``<run>/vocab/``
    (``ranking.data.vocab.build_vocabs``, what ``mixrank data vocab`` writes); returns the
    schema file that uses them. Built once per run directory (a resumed run reuses it); written
    to a temporary folder and renamed, so a half-built vocabulary is never used."""
    import shutil

    from ranking.data.errors import DataError
    from ranking.data.reader import resolve_files
    from ranking.data.vocab import build_vocabs
    from ranking.errors import UserError

    out = run / "vocab"
    if (out / "schema.yaml").is_file():
        return out / "schema.yaml"
    run.mkdir(parents=True, exist_ok=True)
    tmp = run / f".vocab.{os.getpid()}"
    d = exp.data
    try:
        build_vocabs(
            exp.schema, resolve_files(d.train, d.since, d.until), tmp, min_count=d.vocab_min_count
        )
    except DataError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"data.vocab_from_train: {e}") from e
    try:
        os.replace(tmp, out)
    except OSError:  # another node of the same run renamed its copy first
        shutil.rmtree(tmp, ignore_errors=True)
    return out / "schema.yaml"


def check_warm_start(exp, raw: dict, key: str) -> None:
    """The parent of ``train.warm_start`` fits this run (feature set, dims, hashed buckets,
    architecture, tasks): a ``UserError`` naming the feature otherwise, before spawning. ``raw``
    is the run's resolved config (its schema the run's vocabularies under
    ``data.vocab_from_train``)."""
    import dataclasses

    from ranking.features import load_schema
    from ranking.train.warm_start import check_compatible, open_parent

    if exp.data.vocab_from_train:
        exp = dataclasses.replace(exp, schema=load_schema(raw["schema"]))
    check_compatible(open_parent(exp.train.warm_start, key), exp, key)


def _diff_keys(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in set(a) | set(b):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".") or "<root>"]


def check_model_shapes(exp) -> None:
    """Build the model on the meta device: shape errors (H not dividing T*D, ...) surface here,
    naming the key, before any process is spawned; costs no memory even for the 1B configs."""
    import torch

    from ranking.model.ranker import build_model

    with torch.device("meta"):
        build_model(exp.model, exp.schema)


def check_data(exp) -> None:
    """The training and validation sets' footers before spawning: every file readable, the
    schema's columns present with types the conversion takes, no nulls in a label column by
    the column statistics, some rows. A ``UserError`` naming the key, file and column; a file
    with no rows is skipped with a warning (Spark writes one for an empty partition)."""
    from ranking.data.errors import DataError
    from ranking.data.reader import ParquetBatches, resolve_files
    from ranking.errors import UserError

    for key in ("train", "valid"):
        path = getattr(exp.data, key)
        if not path:
            continue
        try:
            if key == "train" and (exp.data.since or exp.data.until):
                path = resolve_files(path, exp.data.since, exp.data.until)
            reader = ParquetBatches(exp.schema, path, exp.data.batch_size, rank=0, world_size=1)
        except DataError as e:
            raise UserError(f"data.{key}: {e}") from None
        for f in reader.empty_files:
            print(f"mixrank: warning: data.{key}: {f}: no rows; skipped", file=sys.stderr)


def torchrun_command(run: Path, args) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}"]
    if args.rdzv_endpoint:
        cmd += [
            f"--nnodes={args.nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={args.rdzv_endpoint}",
            f"--rdzv-id={args.rdzv_id or run.name}",
        ]
        if args.node_rank is not None:
            cmd.append(f"--node-rank={args.node_rank}")
    else:
        cmd += ["--standalone", "--nnodes=1"]
    cmd += ["--max-restarts=0", "-m", "ranking.train.worker", "--run-dir", str(run)]
    return cmd


def launch_env(nproc: int) -> dict:
    """The workers' environment: one OpenMP pool of cores / nproc threads per process unless
    OMP_NUM_THREADS is set."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, nproc))))
    return env


def train(args) -> int:
    from ranking.errors import UserError
    from ranking.train.worker import ERRORS_DIR

    run = prepare_run(args.config, args.overrides, args.run_dir, args.warm_start)
    cmd = torchrun_command(run, args)
    print(f"[mixrank] run directory: {run}", file=sys.stderr, flush=True)
    errors = run / ERRORS_DIR
    shutil.rmtree(errors, ignore_errors=True)  # what an earlier launch of this run reported
    proc = subprocess.Popen(
        cmd, env=launch_env(args.nproc), start_new_session=True, stderr=subprocess.PIPE
    )
    relay = threading.Thread(target=relay_stderr, args=(proc.stderr, errors), daemon=True)
    relay.start()

    def forward(signum, _frame):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    relay.join(timeout=10)
    reported = reported_errors(errors)
    if reported:
        raise UserError(reported[0]["message"])
    if rc == 0:
        summary = run / "summary.json"
        if summary.is_file():
            print(summary.read_text())
    return rc


def relay_stderr(pipe, errors: Path) -> None:
    """Copy torchrun's stderr (the ranks' progress lines, torchrun's own messages) to ours as
    it comes, until a rank has reported an error: what follows is torchrun stopping the other
    ranks and its failure summary, which would bury the one line ``train`` prints instead."""
    out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
    quiet = False
    for line in iter(pipe.readline, b""):
        quiet = quiet or (errors.is_dir() and any(errors.glob("rank-*.json")))
        if quiet:
            continue
        if out is not None:
            out.write(line)
            out.flush()
        else:  # a replaced sys.stderr (a test's capture): text only
            sys.stderr.write(line.decode(errors="replace"))
    pipe.close()


def reported_errors(errors: Path) -> list[dict]:
    """The ranks' one-line errors (``ranking.train.worker.report_error``), earliest first."""
    out = []
    for f in sorted(errors.glob("rank-*.json")) if errors.is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            out.append(json.loads(f.read_text()))
    return sorted(out, key=lambda r: (r.get("time", 0), r.get("rank", 0)))


def export(args) -> int:
    from ranking.errors import UserError
    from ranking.export import ArtifactError, export_artifact, export_checkpoint, read_manifest

    try:
        if args.artifact:
            out = export_artifact(
                args.artifact, args.out, dtype=args.dtype, table_dtype=args.table_dtype
            )
        else:
            out = export_checkpoint(
                args.checkpoint, args.out, dtype=args.dtype or "fp32", table_dtype=args.table_dtype
            )
    except (ArtifactError, FileNotFoundError) as e:
        raise UserError(str(e)) from e
    m = read_manifest(out)
    keys = ("model_version", "dtype", "table_dtype")
    print(json.dumps({"artifact": str(out), **{k: m[k] for k in keys}}))
    return 0


def evaluate(args) -> int:
    """Stream ``--data`` through the artifact; print ``{"auc", "logloss", "ne", "rows"}``."""
    import torch

    from ranking.data.reader import ParquetBatches
    from ranking.errors import UserError
    from ranking.export import ArtifactError, load_artifact
    from ranking.metrics import EvalAccumulator

    try:
        art = load_artifact(args.artifact, dtype=args.dtype)
    except ArtifactError as e:
        raise UserError(str(e)) from e
    torch.set_num_threads(os.cpu_count() or 1)
    acc = EvalAccumulator(art.schema.task_names)
    reader = ParquetBatches(
        art.schema, args.data, args.batch_size, rank=0, world_size=1, shuffle=False
    )
    for batch in reader:
        acc.update(art.predict(batch), batch.labels)
    print(json.dumps(acc.compute()))
    return 0
