"""``mixrank bench train``: training throughput with 1 and 2 processes, step/forward ratio.

Measured side by side in one run, on synthetic data in the config's schema:

- ``mixrank train`` under torchrun (DistributedModelParallel, gloo on CPU) with 1 and with 2
  processes, one epoch each: global samples/s (median of the logged rates, the first log window
  excluded as warm-up);
- in one process, on the same model and batch: the forward time, the full training-step time
  (forward, backward, optimiser step) and their ratio;
- the data loader's rows/s on the same files, over the training samples/s (the loader must
  never be the bottleneck: target >= 5x).

``--vs-plain`` instead runs, per config (default: Frappe DLRM and RankMixer), ``mixrank train
--nproc 1`` and the loop a user would write instead (``benchmarks.plain_loop``: the same model
and rows, encoded once up front, plain Adam, no DMP, no reader in the loop) back to back,
``--pairs`` times in alternating order, and prints the ratio of their training samples/s
(target >= 0.9). ``--loader-rows 1000000,10000000,50000000`` measures, at each data size
(Criteo-shaped synthetic rows), the loader's rows/s as the trainer reads and converts every unit
(no cache; past 16 warm-up batches, for 30 s, epochs again where the data is shorter) against
the training samples/s of a Criteo DLRM on the same files (target >= 10x).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def add_arguments(parser) -> None:
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="experiment YAML")
    parser.add_argument("--rows", type=int, default=200_000, help="synthetic training rows")
    parser.add_argument("--nprocs", default="1,2", help="process counts to compare")
    parser.add_argument("--repeats", type=int, default=20, help="in-process timed steps")
    parser.add_argument(
        "--vs-plain", action="store_true", help="mixrank train against a plain loop, same rows"
    )
    parser.add_argument(
        "--plain-configs",
        default="configs/frappe_dlrm.yaml,configs/frappe_rankmixer.yaml",
        help="configs of --vs-plain (their data when present, else synthetic rows)",
    )
    parser.add_argument("--plain-epochs", type=int, default=3, help="epochs of each --vs-plain run")
    parser.add_argument("--pairs", type=int, default=2, help="--vs-plain runs of each, alternated")
    parser.add_argument(
        "--loader-rows", default="", help="data sizes for the loader/step ratio, e.g. 1000000"
    )
    parser.add_argument(
        "--data-dir", default="", help="keep (and reuse) the --loader-rows data sets here"
    )


def _synth(preset: str, rows: int, out: Path) -> None:
    from ranking.data.synth import write_synthetic

    write_synthetic(preset, rows, out / "train", seed=1, progress=False)
    write_synthetic(preset, max(rows // 10, 2000), out / "valid", seed=2, progress=False)


def _torchrun(config: str, data: Path, nproc: int, work: Path) -> dict:
    run_dir = work / f"run-{nproc}"
    cmd = [
        sys.executable, "-m", "ranking.cli", "train", "--config", config, "--nproc", str(nproc),
        "--run-dir", str(run_dir), f"data.train={data / 'train'}", f"data.valid={data / 'valid'}",
        "train.epochs=1", "train.max_steps=0", "train.eval_every=0", "train.checkpoint_every=0",
        "train.log_every=10",
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"training with {nproc} process(es) failed:\n{proc.stderr[-3000:]}")
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in recs if "samples_per_s" in r][1:]
    return {"samples_per_s": statistics.median(rates), "wall_s": wall,
            "steps": max(r.get("step", 0) for r in recs)}  # fmt: skip


def _in_process(config: str, data: Path, repeats: int) -> dict:
    import torch

    from ranking.data.reader import ParquetBatches
    from ranking.model.ranker import build_model
    from ranking.train.config import load_experiment

    exp = load_experiment(config, [f"data.train={data / 'train'}"])
    torch.manual_seed(0)
    model = build_model(exp.model, exp.schema)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    reader = ParquetBatches(exp.schema, data / "train", exp.data.batch_size, rank=0, world_size=1)
    batch = next(iter(reader))

    def fwd():
        return model(batch)

    def step():
        out = model(batch)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, batch.labels)
        opt.zero_grad()
        (loss + out.aux_loss).backward()
        opt.step()

    def timeit(fn) -> float:
        for _ in range(3):
            fn()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    model.train()
    t_fwd, t_step = timeit(fwd), timeit(step)
    # loader rows/s on the same files, one process
    t0 = time.perf_counter()
    rows = sum(b.size for b in reader)
    loader = rows / (time.perf_counter() - t0)
    return {"forward_ms": t_fwd * 1e3, "step_ms": t_step * 1e3, "step_over_forward": t_step / t_fwd,
            "loader_rows_per_s": loader, "batch_size": exp.data.batch_size}  # fmt: skip


PLAIN_OVERRIDES = [
    "data.batch_size=1024", "train.select_best=false", "train.early_stopping_patience=0",
    "train.eval_every=0", "train.checkpoint_every=0", "train.log_every=50", "data.valid=",
    "train.embedding_l2=0",  # the plain loop's objective: BCE (+ the model's auxiliary loss)
]  # fmt: skip


def _mixrank_rate(config: str, run_dir: Path, epochs: int, extra: list[str]) -> dict:
    """``mixrank train --nproc 1``: the median of its logged training samples/s (evaluation and
    checkpoints excluded from its rates by the trainer), the first window left out."""
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "ranking.cli", "train", "--config", config, "--nproc", "1",
        "--run-dir", str(run_dir), f"train.epochs={epochs}", *PLAIN_OVERRIDES, *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"mixrank train {config} failed:\n{proc.stderr[-3000:]}")
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in recs if "samples_per_s" in r]
    return {"samples_per_s": statistics.median(rates[1:] or rates), "steps": len(rates)}


def _plain_rate(run_dir: Path, epochs: int) -> dict:
    """The plain loop in a fresh process (its own threads and allocator, as a user runs it)."""
    code = (
        "import json, sys; from benchmarks.plain_loop import plain_loop; "
        f"print(json.dumps(plain_loop({str(run_dir)!r}, {epochs}, 1024)))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"plain loop failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def vs_plain(args, work: Path) -> list[dict]:
    """``mixrank train`` against the plain loop, per config, ``--pairs`` alternations."""
    import yaml

    from benchmarks.common import emit

    out = []
    for config in [c for c in args.plain_configs.split(",") if c]:
        raw = yaml.safe_load(Path(config).read_text())
        train = raw.get("data", {}).get("train") or ""
        train_path = Path(train).resolve()  # relative to where mixrank runs, as in training
        extra = []
        if (
            not train or not train_path.exists()
        ):  # no ../shared: synthetic rows in the config's schema
            preset = "movielens" if str(raw["schema"]).startswith("movielens") else "frappe"
            data = work / f"data-{preset}"
            if not data.exists():
                _synth(preset, args.rows, data)
            extra = [f"data.train={data / 'train'}", "data.vocab_from_train=false"]
        # the plain loop reads a run's resolved config (its vocabularies): a one-step run
        setup = work / f"setup-{Path(config).stem}"
        _mixrank_rate(config, setup, 1, [*extra, "train.max_steps=1"])
        mixrank, plain = [], []
        for i in range(args.pairs):
            for who in ("mixrank", "plain") if i % 2 == 0 else ("plain", "mixrank"):
                if who == "plain":
                    plain.append(_plain_rate(setup, args.plain_epochs))
                else:
                    run_dir = work / f"run-{Path(config).stem}"
                    mixrank.append(_mixrank_rate(config, run_dir, args.plain_epochs, extra))
        m = statistics.median(r["samples_per_s"] for r in mixrank)
        p = statistics.median(r["samples_per_s"] for r in plain)
        # each pair ran back to back: the median of their ratios is what a shared machine's
        # slow minutes disturb least (the ratio of the medians mixes minutes)
        pairs = [a["samples_per_s"] / b["samples_per_s"] for a, b in zip(mixrank, plain)]
        rec = {
            "bench": "train", "mode": "vs-plain", "config": Path(config).stem,
            "data": "synthetic" if extra else str(train_path), "procs": 1,
            "samples_per_s": m, "plain_samples_per_s": p,
            "ratio_vs_plain": statistics.median(pairs), "ratio_of_medians": m / p,
            "pair_ratios": [round(x, 3) for x in pairs],
            "runs": [round(r["samples_per_s"]) for r in mixrank],
            "plain_runs": [round(r["samples_per_s"]) for r in plain],
        }  # fmt: skip
        emit(rec)
        out.append(rec)
    return out


LOADER_CONFIG = {
    "name": "bench_criteo_dlrm",
    "schema": "criteo",
    "model": {"arch": "dlrm", "dlrm": {"dense_arch": [64, 16], "over_arch": [256, 128]}},
    "data": {"train": "", "batch_size": 1024},
    "train": {"epochs": 1, "lr": 0.001, "embedding_lr": 0.05, "log_every": 50},
}


def _loader_rate(config: Path, data: Path, seconds: float = 30.0, warmup: int = 16) -> dict:
    """The trainer's reader converting every unit (no cache: each epoch reads and converts the
    Parquet again), alone in this process: rows/s over up to ``seconds`` after ``warmup``
    batches (the first file open, imports and the first unit's read are not the loader's
    steady rate). A data set read in less than ``seconds`` is read again as the next epoch,
    as the trainer would without ``data.cache_mb``; ``loader_epochs`` says how many."""
    from ranking.data.reader import ParquetBatches, list_units, resolve_files
    from ranking.train.config import load_experiment

    exp = load_experiment(config, [f"data.train={data}"])
    files = resolve_files(data)
    rows = sum(u.rows for u in list_units(files, 1 << 30))
    unit_rows = int(min(65536, max(1024, rows // 32)))  # as the trainer cuts them, one rank
    reader = ParquetBatches(
        exp.schema, files, exp.data.batch_size, rank=0, world_size=1, unit_rows=unit_rows,
        drop_last=True,
    )  # fmt: skip
    seen, n, t0, epoch = 0, 0, None, 0
    while t0 is None or time.perf_counter() - t0 < seconds:
        reader.set_epoch(epoch)
        before = seen
        for b in reader:
            seen += 1
            if t0 is None:
                if seen >= warmup:
                    t0 = time.perf_counter()
                continue
            n += b.size
            if time.perf_counter() - t0 > seconds:
                break
        epoch += 1
        if seen == before:
            raise ValueError(f"{data}: no full batch of {exp.data.batch_size} rows to read")
    return {
        "loader_rows_per_s": n / (time.perf_counter() - t0),
        "loader_rows_read": n,
        "loader_epochs": epoch,
    }


def loader_vs_step(args, work: Path) -> list[dict]:
    import yaml

    from benchmarks.common import emit

    keep = Path(args.data_dir) if args.data_dir else work
    keep.mkdir(parents=True, exist_ok=True)
    config = work / "bench_criteo_dlrm.yaml"
    config.write_text(yaml.safe_dump(LOADER_CONFIG))
    out = []
    for rows in [int(x) for x in args.loader_rows.split(",") if x]:
        data = keep / f"criteo-{rows}"
        if not (data / ".complete").exists():
            from ranking.data.synth import write_synthetic

            write_synthetic("criteo", rows, data, seed=1)
            (data / ".complete").write_text(str(rows))
        loader = _loader_rate(config, data)
        step = _mixrank_rate(
            str(config), work / f"loader-run-{rows}", 1,
            [f"data.train={data}", "train.max_steps=300"],
        )  # fmt: skip
        rec = {
            "bench": "train", "mode": "loader/step", "rows": rows, **loader,
            "samples_per_s": step["samples_per_s"],
            "loader_over_train": loader["loader_rows_per_s"] / step["samples_per_s"],
        }  # fmt: skip
        emit(rec)
        out.append(rec)
    return out


def run(args) -> int:
    import torch
    import yaml

    from benchmarks.common import emit, machine_info, table

    if args.vs_plain or args.loader_rows:
        with tempfile.TemporaryDirectory(prefix="mixrank-bench-train-") as tmp:
            records = []
            if args.vs_plain:
                records += vs_plain(args, Path(tmp))
            if args.loader_rows:
                records += loader_vs_step(args, Path(tmp))
        if not args.json_only:
            table(records, ["mode", "config", "rows", "samples_per_s", "plain_samples_per_s",
                            "ratio_vs_plain", "ratio_of_medians", "loader_rows_per_s",
                            "loader_over_train"])  # fmt: skip
        return 0

    cfg = yaml.safe_load(Path(args.config).read_text())
    records = []
    with tempfile.TemporaryDirectory(prefix="mixrank-bench-train-") as tmp:
        work = Path(tmp)
        _synth(cfg["schema"], args.rows, work / "data")
        torch.set_num_threads(torch.get_num_threads())
        ip = _in_process(args.config, work / "data", args.repeats)
        rec = {"bench": "train", "mode": "in-process", "procs": 1, **ip, **machine_info()}
        records.append(rec)
        emit(rec)
        for n in [int(x) for x in args.nprocs.split(",")]:
            tr = _torchrun(args.config, work / "data", n, work)
            rec = {
                "bench": "train", "mode": "torchrun+DMP", "procs": n, **tr,
                "loader_over_train": ip["loader_rows_per_s"] / tr["samples_per_s"],
            }  # fmt: skip
            records.append(rec)
            emit(rec)
    base = next((r for r in records if r["mode"] != "in-process" and r["procs"] == 1), None)
    for r in records:
        if base and r["mode"] != "in-process":
            r["speedup_vs_1"] = r["samples_per_s"] / base["samples_per_s"]
    if not args.json_only:
        table(records, ["mode", "procs", "samples_per_s", "speedup_vs_1", "loader_over_train",
                        "forward_ms", "step_ms", "step_over_forward", "loader_rows_per_s"])  # fmt: skip
    return 0


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    add_arguments(p)
    p.add_argument("--json-only", action="store_true")
    sys.exit(run(p.parse_args()))
