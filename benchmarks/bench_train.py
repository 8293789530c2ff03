"""``mixrank bench train``: training throughput with 1 and 2 processes, step/forward ratio.

Measured side by side in one run, on synthetic data in the config's schema:

- ``mixrank train`` under torchrun (DistributedModelParallel, gloo on CPU) with 1 and with 2
  processes, one epoch each: global samples/s (median of the logged rates, the first log window
  excluded as warm-up);
- in one process, on the same model and batch: the forward time, the full training-step time
  (forward, backward, optimiser step) and their ratio;
- the data loader's rows/s on the same files, over the training samples/s (the loader must
  never be the bottleneck: target >= 5x).
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


def run(args) -> int:
    import torch
    import yaml

    from benchmarks.common import emit, machine_info, table

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
