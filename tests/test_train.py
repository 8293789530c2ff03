"""The distributed training job, end to end: real torchrun, gloo, 2 processes.

One uninterrupted run is shared by several tests (module fixture); the kill/resume test runs the
same config again, SIGKILLs a worker right after its first checkpoint (step 10 of 46), restarts
it with ``mixrank train``, and checks that it ends where the uninterrupted run ended (every
shipped config: tests/test_resume_matrix.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ranking.cli import main as cli

pytestmark = pytest.mark.slow

ROWS = 12_000
BATCH = 256  # per rank: 2 ranks x 256 -> 23 steps per epoch


def _config(tmp: Path, data: Path, **train) -> Path:
    cfg = {
        "name": "test-train",
        "schema": "frappe",
        "model": {"arch": "rankmixer", "dim": 32, "num_tokens": 8, "num_layers": 1, "ffn_mult": 2},
        "data": {
            "train": str(data / "train"),
            "valid": str(data / "valid"),
            "batch_size": BATCH,
            "eval_batch_size": 2048,
        },
        "train": {
            "epochs": 2,
            "lr": 0.003,
            "embedding_lr": 0.05,
            "log_every": 5,
            "threads": 1,
            "seed": 7,
            **train,
        },
    }
    path = tmp / f"cfg-{len(train)}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train_cmd(cfg: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ranking.cli",
        "train",
        "--config",
        str(cfg),
        "--nproc",
        "2",
        "--run-dir",
        str(run_dir),
        *extra,
    ]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    # One synthetic data set (one hidden signal), split by rows into train and valid.
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("traindata")
    assert (
        cli(
            [
                "data",
                "synth",
                "--preset",
                "frappe",
                "--rows",
                str(ROWS + ROWS // 3),
                "--out",
                str(root / "all"),
                "--quiet",
            ]
        )
        == 0
    )
    table = pq.read_table(root / "all")
    for split, part in (("train", table.slice(0, ROWS)), ("valid", table.slice(ROWS))):
        (root / split).mkdir()
        pq.write_table(part, root / split / "part-0.parquet")
    return root


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("run")
    cfg = _config(tmp, data, checkpoint_every=10)
    run_dir = tmp / "full"
    proc = subprocess.run(_train_cmd(cfg, run_dir), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return cfg, run_dir


def test_training_reduces_loss_and_writes_run_dir(full_run):
    _, run_dir = full_run
    recs = [r for r in _records(run_dir) if "loss" in r]
    assert len(recs) >= 4
    first, last = recs[0]["loss"], recs[-1]["loss"]
    assert last < first - 0.02, (first, last)
    evals = [r["eval"] for r in _records(run_dir) if "eval" in r]
    assert evals and evals[-1]["rows"] == ROWS // 3  # the whole validation set, all ranks
    assert evals[-1]["auc"] > 0.6
    assert (run_dir / "artifact" / "manifest.json").is_file()
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert all(not c.endswith(".partial") for c in ckpts)
    assert len(ckpts) <= 2  # keep_checkpoints default


def test_export_then_eval_reproduces_validation_auc(full_run, data, tmp_path, capsys):
    _, run_dir = full_run
    final_eval = json.loads((run_dir / "summary.json").read_text())["eval"]
    # re-export from the last checkpoint through the CLI, then evaluate the artifact
    last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    assert cli(["export", "--checkpoint", str(last), "--out", str(tmp_path / "art")]) == 0
    capsys.readouterr()
    assert cli(["eval", "--artifact", str(tmp_path / "art"), "--data", str(data / "valid")]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["rows"] == final_eval["rows"]
    assert abs(got["auc"] - final_eval["auc"]) < 1e-4
    assert abs(got["logloss"] - final_eval["logloss"]) < 1e-4
    # and independently of EvalAccumulator: the artifact's predictions on every valid row,
    # scored with the Mann-Whitney rank formula
    import pyarrow.parquet as pq
    import torch

    from ranking.data.convert import batch_from_arrow
    from ranking.export import load_artifact

    art = load_artifact(tmp_path / "art")
    batch = batch_from_arrow(art.schema, pq.read_table(data / "valid"))
    p, y = art.predict(batch)[:, 0].double(), batch.labels[:, 0].double()
    ranks = torch.empty_like(p)
    ranks[p.argsort()] = torch.arange(1, len(p) + 1, dtype=torch.double)
    pos = float(y.sum())
    mw_auc = float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * (len(y) - pos)))
    assert abs(mw_auc - final_eval["auc"]) < 1e-4
    # the artifact written by training is the same model
    m1 = json.loads((run_dir / "artifact" / "manifest.json").read_text())
    m2 = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert m1["model_version"] == m2["model_version"]


def test_sigkill_then_resume_matches_uninterrupted_run(full_run, tmp_path):
    from resume_worker import launch

    from ranking.train.commands import prepare_run

    cfg, full_dir = full_run
    run_dir = tmp_path / "killed"
    ckdir = run_dir / "checkpoints"
    # the worker, with its last rank sending itself SIGKILL right after checkpoint 10 of 46
    prepare_run(str(cfg), [], str(run_dir))
    proc = launch([run_dir], {"MIXRANK_TEST_SIGKILL_AFTER": "10"}, timeout=600)
    assert proc.returncode != 0, "training ended before it could be killed"
    assert [p.name for p in ckdir.glob("step-*")] == ["step-00000010"]
    # a half-written checkpoint from "another crash" must be skipped on resume
    bogus = ckdir / "step-00009999"
    bogus.mkdir()
    (bogus / ".metadata").write_text("garbage")
    proc = subprocess.run(_train_cmd(cfg, run_dir), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from step-00000010" in proc.stderr
    a = json.loads((full_dir / "summary.json").read_text())["eval"]
    b = json.loads((run_dir / "summary.json").read_text())["eval"]
    # same seed, same data order, restored optimiser/RNG state: equal up to float noise
    assert abs(a["auc"] - b["auc"]) < 1e-6
    assert abs(a["logloss"] - b["logloss"]) < 1e-6
    versions = [json.loads((d / "artifact/manifest.json").read_text()) for d in (full_dir, run_dir)]
    assert versions[0]["model_version"] == versions[1]["model_version"]


def test_trainer_built_in_process_matches_mixrank_train(data, tmp_path, one_rank_trainer):
    """A ``Trainer`` built in this process from the config (one gloo rank, no run directory
    prepared, no script) trains to the same result as ``mixrank train --nproc 1``."""
    cfg = _config(tmp_path, data, max_steps=12, epochs=1)
    cli_dir = tmp_path / "cli"
    cmd = _train_cmd(cfg, cli_dir)
    cmd[cmd.index("--nproc") + 1] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    t = one_rank_trainer(cfg, tmp_path / "in-process")
    assert t.run() == 0
    a, b = (json.loads((d / "summary.json").read_text()) for d in (cli_dir, t.run_dir))
    assert a["step"] == b["step"] == 12
    assert a["eval"] == b["eval"]
    versions = [
        json.loads((d / "artifact/manifest.json").read_text()) for d in (cli_dir, t.run_dir)
    ]
    assert versions[0]["model_version"] == versions[1]["model_version"]


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.bogus=1", "train.bogus"),
        ("model.num_heads=5", "num_heads"),
        ("train.sharding.nosuch=row_wise", "train.sharding.nosuch"),
        ("data.train=/nonexistent/x.parquet", "data.train"),
        ("train.dense_optimizer=sgdx", "train.dense_optimizer"),
    ],
)
def test_bad_config_fails_before_spawning(data, tmp_path, override, key):
    cfg = _config(tmp_path, data)
    t0 = time.time()
    proc = subprocess.run(
        _train_cmd(cfg, tmp_path / "r", override), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert key in proc.stderr, proc.stderr
    assert "torch.distributed" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()  # nothing written, nothing spawned
    assert time.time() - t0 < 60


def test_forced_sharding_types_train_and_export(data, tmp_path, capsys):
    """Every sharding type the config can force trains, and the artifact reproduces the eval."""
    cfg = _config(tmp_path, data, epochs=1)
    run_dir = tmp_path / "sharded"
    forced = {"user": "row_wise", "item": "table_row_wise", "city": "column_wise",
              "cost": "data_parallel", "country": "table_wise"}  # fmt: skip
    extra = [f"train.sharding.{t}={k}" for t, k in forced.items()]
    proc = subprocess.run(_train_cmd(cfg, run_dir, *extra), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    plan: dict[str, str] = {}  # the first table of the printed plan: param | sharding type | ...
    for line in proc.stderr.splitlines():
        if line.count("|") >= 3:
            plan.setdefault(line.split("|")[0].strip(), line.split("|")[1].strip())
    for table, kind in forced.items():
        assert plan.get(table) == kind, (table, plan)
    final_eval = json.loads((run_dir / "summary.json").read_text())["eval"]
    capsys.readouterr()
    assert (
        cli(["eval", "--artifact", str(run_dir / "artifact"), "--data", str(data / "valid")]) == 0
    )
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(got["auc"] - final_eval["auc"]) < 1e-4


def test_several_runs_in_one_worker_match_separate_launches(full_run, data, tmp_path):
    """``ranking.train.worker --run-dir A --run-dir B`` (the quality harness's launches): a run
    trained second in the process, after a different model, ends exactly where the same run
    ends alone (``full_run``, its own ``mixrank train``): nothing leaks between runs."""
    from argparse import Namespace

    from ranking.train.commands import launch_env, prepare_run, torchrun_command

    cfg, full_dir = full_run
    other = prepare_run(str(cfg), ["model.arch=dlrm", "train.seed=3"], str(tmp_path / "other"))
    same = prepare_run(str(cfg), [], str(tmp_path / "same"))
    launch = Namespace(nproc=2, rdzv_endpoint=None, nnodes="1", node_rank=None, rdzv_id=None)
    cmd = [*torchrun_command(other, launch), "--run-dir", str(same)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=launch_env(2))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("artifact written to") == 2
    a = json.loads((full_dir / "summary.json").read_text())
    b = json.loads((same / "summary.json").read_text())
    assert b["step"] == a["step"]
    assert abs(a["eval"]["auc"] - b["eval"]["auc"]) < 1e-6
    assert abs(a["eval"]["logloss"] - b["eval"]["logloss"]) < 1e-6
    # and the first run is the other model, trained to its end
    first = json.loads((other / "summary.json").read_text())
    assert first["step"] == a["step"] and first["eval"]["auc"] != a["eval"]["auc"]
    assert yaml.safe_load((other / "config.yaml").read_text())["model"]["arch"] == "dlrm"


def _bad_copy(src_dir: Path, out: Path, change) -> Path:
    """A data directory: one good training file, plus ``change(table)`` written as bad.parquet."""
    import pyarrow.parquet as pq

    out.mkdir(parents=True)
    src = sorted(src_dir.glob("*.parquet"))[0]
    table = pq.read_table(src)
    pq.write_table(table, out / "a.parquet")
    pq.write_table(change(table), out / "bad.parquet")
    return out


def _label_as_string(t):
    import pyarrow as pa

    i = t.schema.get_field_index("label")
    return t.set_column(i, "label", t.column("label").cast(pa.string()))


def _label_null_at_row_10(t):
    import pyarrow as pa

    i = t.schema.get_field_index("label")
    vals = t.column("label").to_pylist()
    vals[10] = None
    return t.set_column(i, "label", pa.array(vals, t.schema.field("label").type))


@pytest.mark.parametrize(
    "change, message",
    [
        (_label_as_string, "column 'label': label has type string, expected 0/1 numbers"),
        (
            _label_null_at_row_10,
            "column 'label': label has 1 null(s) by the file's column statistics",
        ),
    ],
)
def test_bad_label_files_are_refused_before_spawning(data, tmp_path, change, message):
    """#26's two cases, read from the Parquet footer (schema, column statistics): one line
    naming the file and the column, exit code 2, nothing spawned, no run directory."""
    bad_dir = _bad_copy(data / "train", tmp_path / "bad", change)
    cfg = _config(tmp_path, data)
    proc = subprocess.run(
        _train_cmd(cfg, tmp_path / "r", f"data.train={bad_dir}"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("mixrank: error:")]
    assert len(lines) == 1 and str(bad_dir / "bad.parquet") in lines[0] and message in lines[0]
    assert "Traceback" not in proc.stderr and "torch.distributed" not in proc.stderr
    assert not (tmp_path / "r").exists()
