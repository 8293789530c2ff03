"""Quantized embedding tables: bytes, p50 forward at 256 candidates and AUC, fp32 vs int8 / int4.

For each experiment (Frappe DLRM and RankMixer, MovieLens RankMixer) the real training job runs
briefly on ../shared/data (``mixrank train --config C --run-dir R train.epochs=N``; a run
directory that already holds its artifact is reused), and its fp32 artifact is re-exported with
int8 and int4 tables (``mixrank export --artifact R/artifact --out ... --table-dtype int8``,
in this process). Then, per table dtype, in one process:

- table bytes: the embedding tables' tensors in ``weights.pt`` (fp32 rows vs FBGEMM's fused rows),
  and the ratio to fp32;
- p50 forward latency of ``Artifact.predict`` (what the Ranker runs) on 256-row batches of the
  evaluation split, paired: every repetition runs each dtype once on the same batch, in a
  shuffled order, so drift on the machine hits all of them alike; and the same for the
  embedding lookups alone (the tables' module);
- AUC / logloss on the evaluation split (MovieLens: ``test``; Frappe has no test split here, its
  ``valid`` is used) and the change against fp32, and the largest |probability| difference;
- the int8 artifact served by the real Ray Serve application: one request of 256 real rows over
  HTTP and over gRPC, its scores against the in-process ones and the fp32 artifact's.

Run it under the shared lock (it trains and it times)::

    mixrank bench quant
    python -m benchmarks.bench_quant_tables --epochs 1 --reps 50   # a quick check

Prints JSON lines (one per experiment and table dtype), then a table.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import emit, machine_info, table

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
# (config, epochs of the brief training run, evaluation split)
EXPERIMENTS = (
    ("frappe_dlrm", 3, "frappe/valid.parquet"),
    ("frappe_rankmixer", 4, "frappe/valid.parquet"),
    ("movielens_rankmixer", 3, "movielens100k/test.parquet"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--work-dir", default="/tmp/mixrank-bench-quant", help="run dirs and artifacts"
    )
    parser.add_argument(
        "--configs", nargs="*", default=None, help="a subset of " + ", ".join(e[0] for e in EXPERIMENTS)
    )  # fmt: skip
    parser.add_argument("--epochs", type=int, default=None, help="override every run's epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table-dtypes", nargs="+", default=["fp32", "int8", "int4"])
    parser.add_argument("--candidates", type=int, default=256, help="rows per timed forward")
    parser.add_argument("--reps", type=int, default=300, help="timed forwards per table dtype")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument(
        "--dims", type=int, nargs="*", default=[16, 32, 64, 128],
        help="embedding widths of the table-bytes sweep (untrained Frappe tables)",
    )  # fmt: skip
    parser.add_argument(
        "--mmap-rows", type=int, default=0,
        help="also time loading a Frappe DLRM with an item table of this many rows, memory-mapped "
        "against copied (RSS, load time; fresh processes)",
    )  # fmt: skip
    parser.add_argument(
        "--no-serve-check",
        action="store_true",
        help="skip serving the int8 artifact through Ray Serve (HTTP and gRPC)",
    )


def bytes_by_dim(work: Path, dims: list[int], table_dtypes: list[str]) -> list[dict]:
    """Table bytes of the Frappe schema's tables at embedding width ``dims`` (an untrained DLRM
    exported fp32, then re-exported per table dtype): the fp16 scale and bias cost 4 bytes a
    row, so the ratio to fp32 grows with the width towards 32 / bits."""
    import torch

    from ranking.export import export_artifact, load_artifact, write_artifact
    from ranking.features import FeatureSchema, load_schema
    from ranking.model.config import ModelConfig
    from ranking.model.ranker import build_model

    out = []
    for d in dims:
        sd = load_schema("frappe").to_dict()
        for f in sd["features"]:
            if "dim" in f:
                f["dim"] = d
        schema = FeatureSchema.from_dict(sd)
        cfg = {"name": f"frappe_dlrm_d{d}", "schema": "frappe", "model": {"arch": "dlrm"}}
        torch.manual_seed(0)
        model = build_model(ModelConfig.from_dict(cfg["model"]), schema)
        weights = {k: v.detach() for k, v in model.state_dict().items()}
        src = write_artifact(
            work / f"dim{d}-fp32", weights, config=cfg, schema=schema, dtype="fp32",
            metrics={}, step=0,
        )  # fmt: skip
        base = table_bytes(load_artifact(src))
        for td in table_dtypes:
            path = (
                src if td == "fp32" else export_artifact(src, work / f"dim{d}-{td}", table_dtype=td)
            )
            nbytes = table_bytes(load_artifact(path))
            rec = {"bench": "quant_tables_bytes", "schema": "frappe", "dim": d, "table_dtype": td,
                   "table_bytes": nbytes, "fp32_over_bytes": round(base / nbytes, 3)}  # fmt: skip
            emit(rec)
            out.append(rec)
    return out


_LOAD = """
import json, sys, time, torch
from pathlib import Path
def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
from ranking.export import Artifact, _build, load_artifact, read_manifest
from ranking.model.synthetic import random_batch
path, how = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
before, t0 = rss("VmRSS"), time.perf_counter()
if how == "mmap":
    art = load_artifact(path)
else:  # the loader before #23: build (tables allocated and initialised), read, copy in
    m = read_manifest(path)
    model, schema = _build(m["config"], m["schema"], path)
    model.load_state_dict(torch.load(path + "/weights.pt", weights_only=True))
    art = Artifact(model=model.eval(), schema=schema, manifest=m, path=Path(path))
load_s = time.perf_counter() - t0
art.predict(random_batch(art.schema, 256, seed=0))
print(json.dumps({"load_s": load_s, "rss_before_mb": before, "rss_after_mb": rss("VmRSS"),
                  "peak_rss_mb": rss("VmHWM"), "first_answer_s": time.perf_counter() - t0}))
"""


def mmap_check(work: Path, rows: int) -> list[dict]:
    """A Frappe DLRM whose ``item`` table has ``rows`` rows (fp32, 16 wide), loaded in a fresh
    process by the memory-mapped loader and by the copying loader it replaced, then one forward
    of 256 random rows: load time, RSS after the forward and peak RSS."""
    import json

    import torch

    from ranking.export import write_artifact
    from ranking.features import FeatureSchema, load_schema
    from ranking.model.config import ModelConfig
    from ranking.model.ranker import build_model

    sd = load_schema("frappe").to_dict()
    for f in sd["features"]:
        if f["name"] == "item":
            f["num_buckets"] = rows
    schema = FeatureSchema.from_dict(sd)
    cfg = {"name": f"frappe_dlrm_item{rows}", "schema": "frappe", "model": {"arch": "dlrm"}}
    path = work / f"mmap-item{rows}"
    if not (path / "manifest.json").is_file():
        torch.manual_seed(0)
        model = build_model(ModelConfig.from_dict(cfg["model"]), schema)
        weights = {k: v.detach() for k, v in model.state_dict().items()}
        write_artifact(path, weights, config=cfg, schema=schema, dtype="fp32", metrics={}, step=0)
        del model, weights
    out = []
    for how in ("copy", "mmap", "copy", "mmap"):
        proc = subprocess.run(
            [sys.executable, "-c", _LOAD, str(path), how],
            cwd=REPO, check=True, capture_output=True, text=True,
        )  # fmt: skip
        rec = {"bench": "quant_tables_mmap", "loader": how, "table_rows": rows,
               "weights_mb": round((path / "weights.pt").stat().st_size / 2**20, 1),
               **json.loads(proc.stdout.strip().splitlines()[-1])}  # fmt: skip
        emit(rec)
        out.append(rec)
    return out


def serve_check(art, fp32, data: Path, candidates: int) -> dict:
    """Serve ``art`` with the real application (deploy/serve.yaml, one replica) and send one
    request of ``candidates`` real rows of ``data`` (their feature columns, as candidates) over
    HTTP and over gRPC: the largest |score| difference from the same rows' in-process
    ``art.predict``, and from the fp32 artifact's."""
    import numpy as np
    import pyarrow.parquet as pq

    from ranking.data.convert import batch_from_rows
    from serving import config
    from serving.client import GRPCClient, HTTPClient, free_port

    cols = list(dict.fromkeys(f.column for f in art.schema.features))
    rows = pq.read_table(data, columns=cols).slice(0, candidates).to_pylist()
    req = {"request_id": "quant-tables", "context": {}, "candidates": rows}
    batch = batch_from_rows(art.schema, rows)
    want, base = art.predict(batch)[:, 0].numpy(), fp32.predict(batch)[:, 0].numpy()
    http, grpc = free_port(), free_port()
    cfg = config.load_config(artifact=art.path, http_port=http, grpc_port=grpc, host="127.0.0.1")
    t0 = time.perf_counter()
    try:
        config.start(cfg, metrics_port=free_port(), num_cpus=4)
        print(f"[quant] serving {art.path} ({time.perf_counter() - t0:.0f} s to ready)",
              file=sys.stderr, flush=True)  # fmt: skip
        answers = {
            "http": HTTPClient("127.0.0.1", http).rank(req),
            "grpc": GRPCClient("127.0.0.1", grpc).rank(req),
        }
    finally:
        config.stop()
    out = {}
    for k, got in answers.items():
        assert got["model_version"] == art.model_version, got.get("model_version")
        scores = np.asarray(got["scores"])
        out[f"serve_{k}_vs_inprocess"] = float(np.abs(scores - want).max())
        out[f"serve_{k}_vs_fp32"] = float(np.abs(scores - base).max())
    return out


def _train(config: str, epochs: int, seed: int, run_dir: Path) -> Path:
    art = run_dir / "artifact"
    if (art / "manifest.json").is_file():
        print(f"[quant] {config}: reusing {art}", file=sys.stderr, flush=True)
        return art
    cmd = [
        sys.executable, "-m", "ranking.cli", "train", "--config", f"configs/{config}.yaml",
        "--run-dir", str(run_dir), f"train.epochs={epochs}", f"train.seed={seed}",
    ]  # fmt: skip
    print(f"[quant] {config}: training ({' '.join(cmd[3:])})", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    print(f"[quant] {config}: trained in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return art


def table_bytes(art) -> int:
    """Bytes of the embedding tables in ``weights.pt`` (every tensor of a TorchRec EBC / EC)."""
    import torch

    from ranking.quant_tables import table_keys

    weights = torch.load(art.path / "weights.pt", weights_only=True, mmap=True)
    keys = table_keys(art.model)
    return sum(v.numel() * v.element_size() for k, v in weights.items() if k in keys)


def evaluate(art, data: Path):
    """``(metrics, probabilities)`` of the artifact on every row of ``data``."""
    import torch

    from ranking.data.reader import ParquetBatches
    from ranking.metrics import EvalAccumulator

    acc, probs = EvalAccumulator(art.schema.task_names), []
    for batch in ParquetBatches(art.schema, data, 8192, rank=0, world_size=1, shuffle=False):
        p = art.predict(batch)
        acc.update(p, batch.labels)
        probs.append(p)
    m = acc.compute()
    m = next(iter(m.values())) if m and isinstance(next(iter(m.values())), dict) else m
    return m, torch.cat(probs)


def lookup(art):
    """The model's embedding lookups alone, as a function of a batch (the tables' module:
    the mixers' ``tokenizer.embeddings``, the baselines' DLRM ``sparse_arch``)."""
    m = art.model
    if hasattr(m, "tokenizer"):
        emb = m.tokenizer.embeddings
        return lambda b: emb(b.sparse, b.sequences, b.seq_of)
    return lambda b: m.model.sparse_arch(b.sparse)


def paired_p50(fns: dict, batches: list, reps: int, seed: int) -> dict[str, float]:
    """p50 milliseconds of ``fn(batch)`` per dtype: each repetition runs every dtype once on
    the same batch, in a shuffled order (after 10 untimed warm-up rounds)."""
    import torch

    rng = random.Random(seed)
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    with torch.no_grad():
        for i in range(reps + 10):
            batch = batches[i % len(batches)]
            rng.shuffle(names)
            for k in names:
                t0 = time.perf_counter()
                fns[k](batch)
                if i >= 10:
                    times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def run(args) -> int:
    import torch

    from ranking.data.reader import ParquetBatches
    from ranking.export import export_artifact, load_artifact

    if not (DATA / "README.md").is_file():
        print(f"bench_quant_tables: no benchmark data at {DATA}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    chosen = [e for e in EXPERIMENTS if not args.configs or e[0] in args.configs]
    info = machine_info()
    records = []
    for n, (config, epochs, split) in enumerate(chosen, 1):
        run_dir = work / f"{config}-e{args.epochs or epochs}-s{args.seed}"
        src = _train(config, args.epochs or epochs, args.seed, run_dir)
        arts = {}
        for td in args.table_dtypes:
            path = (
                src
                if td == "fp32"
                else export_artifact(src, work / f"{run_dir.name}-{td}", table_dtype=td)
            )
            arts[td] = load_artifact(path)
        data = DATA / split
        reader = ParquetBatches(
            arts["fp32"].schema, data, args.candidates, rank=0, world_size=1, shuffle=False
        )
        batches = [b for _, b in zip(range(8), reader) if b.labels.shape[0] == args.candidates]
        p50 = paired_p50({k: a.predict for k, a in arts.items()}, batches, args.reps, args.seed)
        lk = paired_p50({k: lookup(a) for k, a in arts.items()}, batches, args.reps, args.seed)
        base_bytes = table_bytes(arts["fp32"])
        base, base_probs = evaluate(arts["fp32"], data)
        for td, art in arts.items():
            m, probs = (base, base_probs) if td == "fp32" else evaluate(art, data)
            nbytes = table_bytes(art)
            rec = {
                "bench": "quant_tables",
                "config": config,
                "epochs": args.epochs or epochs,
                "table_dtype": td,
                "eval_split": split,
                "eval_rows": int(m["rows"]),
                "table_bytes": nbytes,
                "fp32_over_bytes": round(base_bytes / nbytes, 3),
                "p50_ms": round(p50[td], 3),
                "p50_over_fp32": round(p50[td] / p50["fp32"], 3),
                "lookup_p50_ms": round(lk[td], 3),
                "lookup_over_fp32": round(lk[td] / lk["fp32"], 3),
                "auc": round(m["auc"], 6),
                "auc_change": round(m["auc"] - base["auc"], 6),
                "logloss": round(m["logloss"], 6),
                "max_prob_diff": float((probs - base_probs).abs().max()),
                "candidates": args.candidates,
                "reps": args.reps,
                "model_version": art.model_version,
                **info,
            }
            emit(rec)
            records.append(rec)
        if "int8" in arts and not args.no_serve_check:
            rec = {"bench": "quant_tables_serve", "config": config, "table_dtype": "int8"}
            rec.update(serve_check(arts["int8"], arts["fp32"], data, args.candidates))
            emit(rec)
        print(f"[quant] {n}/{len(chosen)} experiments done", file=sys.stderr, flush=True)
    sweep = bytes_by_dim(work, args.dims, args.table_dtypes) if args.dims else []
    loads = mmap_check(work, args.mmap_rows) if args.mmap_rows else []
    if not args.json_only:
        table(sweep, ["schema", "dim", "table_dtype", "table_bytes", "fp32_over_bytes"])
        print()
        table(loads, ["loader", "table_rows", "weights_mb", "load_s", "first_answer_s",
                      "rss_after_mb", "peak_rss_mb"])  # fmt: skip
        print()
        cols = ["config", "table_dtype", "table_bytes", "fp32_over_bytes", "p50_ms",
                "p50_over_fp32", "lookup_p50_ms", "lookup_over_fp32", "auc", "auc_change", "max_prob_diff"]  # fmt: skip
        table(records, cols)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--json-only", action="store_true")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
