"""Exact resume, for every shipped experiment config (issue #25).

Each ``configs/frappe_*.yaml``, ``configs/movielens_*.yaml``, ``configs/synth_sequence_*.yaml``
(behaviour sequences: an EmbeddingCollection sharded beside the bags), ``configs/mc_stream.yaml``,
``configs/scale_*.yaml`` (their tables capped at 4,096 rows; scale_1e7 also with its big table
row-wise sharded, as documented) and ``configs/demo.yaml`` (and the
demo with the two dense optimisers no shipped config uses, RMSprop and Adagrad) trains as
shipped (architecture, optimisers, schedule, sharding, model selection, vocabularies), shortened:
synthetic data of its schema, 2 epochs of 8 steps on 2 ranks, a checkpoint every 4 steps, one
thread. Its run is resumed from two points, in a new process, and must end where the
uninterrupted run ended:

- after a mid-epoch checkpoint (step 4) and after the epoch-boundary one (step 8): the run
  directory copied right after that checkpoint is exactly what a SIGKILL at that moment leaves
  (``tests/resume_worker.py`` takes the copies during the uninterrupted run, so one launch of
  torchrun trains all the uninterrupted runs and one more resumes all the copies);
- the restored training state is compared key by key with the state in memory when the
  checkpoint was written (every parameter and buffer, both optimisers' state and learning rates,
  the schedule, RNG, data position, last evaluation, model selection);
- then the final evaluation (1e-6), the exported ``model_version`` and the selection must equal
  the uninterrupted run's.

A real SIGKILL of one worker in the middle of an epoch, resumed through ``mixrank train``, is
checked on the issue's config (frappe_dlrm) and in ``tests/test_train.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from resume_worker import launch

from ranking.cli import main as cli

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SHIPPED = [
    *REPO.glob("configs/frappe_*.yaml"),
    *REPO.glob("configs/movielens_*.yaml"),
    *REPO.glob("configs/synth_sequence_*.yaml"),
    REPO / "configs/mc_stream.yaml",  # managed-collision tables: their id mapping resumes too
    # the scale configs with their schemas' tables capped at SCALE_ROWS rows (10^7 / 10^8 rows
    # do not fit a test): their optimisers, schedule and Criteo-shaped features as shipped
    *REPO.glob("configs/scale_*.yaml"),
]
CONFIGS = [*sorted(SHIPPED), REPO / "configs/demo.yaml"]
SCALE_ROWS = 4096
# the dense optimisers no shipped config uses (their state is created at different times:
# Adagrad's at construction, RMSprop's momentum lazily)
VARIANTS = {
    "demo-rmsprop": ["train.dense_optimizer=rmsprop", "train.momentum=0.9"],
    "demo-adagrad": ["train.dense_optimizer=adagrad"],
}
# the scale configs' documented launch shards the big table row-wise over the ranks
SCALE_VARIANTS = {"scale_1e7-row_wise": ("scale_1e7", ["train.sharding.C3=row_wise"])}
IDS = [p.stem for p in CONFIGS] + list(VARIANTS) + list(SCALE_VARIANTS)
ROWS = 2048  # train rows: two units of 1024, one per rank
BATCH = 128  # per rank: 8 steps per epoch
POINTS = ("mid", "boundary")
EARLY_STOP = [
    "train.lr=0",
    "train.embedding_lr=0",
    "train.eval_every=2",
    "train.select_best=true",
    "train.early_stopping_patience=2",
]  # checkpoints every 4 steps: 4 is mid-epoch, 8 the boundary


def _overrides(data: Path, preset: str) -> list[str]:
    return [
        f"data.train={data / preset / 'train'}",
        f"data.valid={data / preset / 'valid'}",
        f"data.batch_size={BATCH}",
        "data.eval_batch_size=256",
        "train.epochs=2",
        "train.max_steps=0",
        "train.checkpoint_every=4",
        "train.keep_checkpoints=100",
        "train.log_every=4",
        "train.threads=1",
    ]


def _preset(config: Path) -> str:
    import yaml

    schema = str(yaml.safe_load(config.read_text())["schema"])
    if schema == "mc_stream":
        return "mc_stream"
    if "criteo_large" in schema:
        return "criteo_large"
    if schema.startswith("synth_sequence"):
        return "sequence"
    return "movielens" if schema.startswith("movielens") else "frappe"


def _scale(config: Path, work: Path) -> list[str]:
    """For a scale config: its schema with every table capped at ``SCALE_ROWS`` rows (the rest
    as shipped), as a ``schema=`` override; nothing for the others."""
    import yaml

    raw = yaml.safe_load(config.read_text())
    if "criteo_large" not in str(raw["schema"]):
        return []
    schema = yaml.safe_load((config.parent / raw["schema"]).read_text())
    for f in schema["features"]:
        if "num_buckets" in f:
            f["num_buckets"] = min(f["num_buckets"], SCALE_ROWS)
    out = work / f"{config.stem}-schema.yaml"
    out.write_text(yaml.safe_dump(schema))
    return [f"schema={out}"]


def _with_histories(table, root: Path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ranking.data.sequences import build_histories

    table = table.append_column("timestamp", pa.array(np.arange(table.num_rows) // 3))
    pq.write_table(table, root / "events.parquet")
    (out,) = build_histories(
        [str(root / "events.parquet")], root / "hist", user="user_id", item="item_id",
        time="timestamp", label="label", length=50, progress=False,
    )  # fmt: skip
    return pq.read_table(out)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("resumedata")
    for preset in ("frappe", "movielens", "sequence", "mc_stream", "criteo_large"):
        out = root / preset / "all"
        if preset == "mc_stream":  # more item ids than table rows: the mapping evicts
            from ranking.data.synth_stream import Stream

            table = Stream(rows_per_day=ROWS + 512, catalogue=4000, new_per_day=1000).day(1)
        else:
            args = ["data", "synth", "--preset", preset, "--rows", str(ROWS + 512), "--seed", "3"]
            assert cli([*args, "--out", str(out), "--quiet"]) == 0
            table = pq.read_table(out)
        if preset == "movielens":  # histories for movielens_sequence.yaml (ordered by row)
            table = _with_histories(table, root / preset)
        for split, part in (("train", table.slice(0, ROWS)), ("valid", table.slice(ROWS))):
            (root / preset / split).mkdir(parents=True)
            pq.write_table(part, root / preset / split / "part-0.parquet")
    return root


@pytest.fixture(scope="module")
def matrix(data, tmp_path_factory) -> dict:
    """Trains every config uninterrupted (taking the two copies), then resumes every copy."""
    from ranking.train.commands import prepare_run

    work = tmp_path_factory.mktemp("resume")
    runs = {}
    for cfg in CONFIGS:
        run = work / cfg.stem
        prepare_run(str(cfg), _overrides(data, _preset(cfg)) + _scale(cfg, work), str(run))
        runs[cfg.stem] = run
    for name, (stem, extra) in SCALE_VARIANTS.items():
        cfg = REPO / f"configs/{stem}.yaml"
        runs[name] = work / name
        prepare_run(
            str(cfg), _overrides(data, _preset(cfg)) + _scale(cfg, work) + extra, runs[name]
        )
    for name, extra in VARIANTS.items():
        runs[name] = work / name
        prepare_run(str(REPO / "configs/demo.yaml"), _overrides(data, "frappe") + extra, runs[name])
    # early stopping: nothing learns (lr 0), so evaluations 2, 4, 6 tie and the run stops at
    # step 6 with patience 2; the mid-epoch checkpoint (4) holds a patience count of 1
    stopping = work / "early_stop"
    prepare_run(str(REPO / "configs/demo.yaml"), _overrides(data, "frappe") + EARLY_STOP, stopping)
    proc = launch([*runs.values(), stopping], {"MIXRANK_TEST_SNAPSHOT": "1"}, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-6000:]
    snaps = [Path(f"{r}.snap-{p}") for r in runs.values() for p in POINTS]
    missing = [s.name for s in snaps if not s.is_dir()]
    assert not missing, f"no checkpoint was taken at these points: {missing}"
    # killed after the early-stopped run's final checkpoint, before its export
    after_final = work / "early_stop.after-final"
    shutil.copytree(stopping, after_final)
    shutil.rmtree(after_final / "artifact")
    (after_final / "summary.json").unlink()
    resumed = [*snaps, Path(f"{stopping}.snap-mid"), after_final]
    proc = launch(resumed, {}, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return {**runs, "early_stop": stopping}


def _result(run: Path) -> dict:
    s = json.loads((run / "summary.json").read_text())
    m = json.loads((run / "artifact" / "manifest.json").read_text())
    return {**s, "model_version": m["model_version"]}


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("name", IDS)
def test_resume_ends_where_the_uninterrupted_run_ends(matrix, name, point):
    full = matrix[name]
    snap = Path(f"{full}.snap-{point}")
    reports = [json.loads((snap / f"resume-diff-rank{r}.json").read_text()) for r in (0, 1)]
    pos = reports[0]["position"]
    assert reports[1]["position"] == pos
    if point == "mid":
        assert 0 < pos["batch_in_epoch"] < 8, pos
    else:
        assert pos["batch_in_epoch"] == 8 and pos["step"] == 8, pos
    # 1. the restored state is the state that was saved, key by key, on both ranks
    for rank, rep in enumerate(reports):
        diffs = rep["diffs"]
        assert diffs == [], f"rank {rank} after resuming from step {pos['step']}: {diffs[:10]}"
    # 2. and the run ends where the uninterrupted one ended
    a, b = _result(full), _result(snap)
    assert a["step"] == b["step"] == 16
    for key in ("eval", "final_eval"):
        # one task: the metrics at the top level; several (the sequence preset): per task
        tasks = [t for t, v in a[key].items() if isinstance(v, dict)] or [None]
        for task in tasks:
            ea = a[key] if task is None else a[key][task]
            eb = b[key] if task is None else b[key][task]
            assert ea["rows"] == eb["rows"]
            for metric in ("auc", "logloss"):
                assert abs(ea[metric] - eb[metric]) <= 1e-6, (key, task, metric, ea, eb)
    assert a["model_version"] == b["model_version"]
    assert a["exported_step"] == b["exported_step"]
    assert a.get("selection") == b.get("selection")
    assert a["stopped_early"] == b["stopped_early"]


def test_early_stopped_run_resumes_with_its_patience_and_stays_stopped(matrix):
    full = matrix["early_stop"]
    a = _result(full)
    assert a["stopped_early"] and a["step"] == 6, a
    assert a["selection"]["since"] == 2 and a["selection"]["step"] == 2, a["selection"]
    # from the mid-epoch checkpoint (step 4, one evaluation without improvement so far): the
    # patience count comes back, so the run stops at step 6 again, not at step 8
    snap = Path(f"{full}.snap-mid")
    report = json.loads((snap / "resume-diff-rank0.json").read_text())
    assert report["position"]["step"] == 4 and report["diffs"] == [], report
    b = _result(snap)
    assert (b["step"], b["stopped_early"], b["selection"]) == (6, True, a["selection"])
    assert b["model_version"] == a["model_version"]
    # from the final checkpoint of the stopped run (killed before its export): no more steps
    c = _result(Path(f"{full}.after-final"))
    assert (c["step"], c["stopped_early"], c["selection"]) == (6, True, a["selection"])
    assert c["model_version"] == a["model_version"]
    steps = [r["step"] for r in _records(Path(f"{full}.after-final")) if "loss" in r]
    assert max(steps) <= 6, steps


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_mid_epoch_then_mixrank_train_resumes_exactly(matrix, data, tmp_path):
    """The issue's case: a real SIGKILL of one worker of frappe_dlrm right after the mid-epoch
    checkpoint (step 4), then the same ``mixrank train`` command resumes the run."""
    from ranking.train.commands import prepare_run

    cfg = REPO / "configs/frappe_dlrm.yaml"
    overrides = _overrides(data, "frappe")
    run = tmp_path / "killed"
    prepare_run(str(cfg), overrides, str(run))
    proc = launch([run], {"MIXRANK_TEST_SIGKILL_AFTER": "4"}, timeout=600)
    assert proc.returncode != 0, "the run was not killed"
    assert "Signals.SIGKILL" in proc.stderr or "-9" in proc.stderr, proc.stderr[-3000:]
    assert not (run / "summary.json").exists()
    cmd = [sys.executable, "-m", "ranking.cli", "train", "--config", str(cfg), "--nproc", "2"]
    cmd += ["--run-dir", str(run), *overrides]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from step-00000004" in proc.stderr
    a, b = _result(matrix["frappe_dlrm"]), _result(run)
    assert abs(a["eval"]["auc"] - b["eval"]["auc"]) <= 1e-6
    assert abs(a["eval"]["logloss"] - b["eval"]["logloss"]) <= 1e-6
    assert a["model_version"] == b["model_version"]
