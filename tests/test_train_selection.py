"""Model selection on valid (best evaluation kept, early stopping), the embedding L2 penalty and
per-run vocabularies, through the real training job (torchrun, 2 gloo ranks, synthetic data)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ranking.cli import main as cli

pytestmark = pytest.mark.slow

ROWS = 8_000


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("seldata")
    n = ROWS + ROWS // 4
    assert cli(["data", "synth", "--preset", "frappe", "--rows", str(n), "--out",
                str(root / "all"), "--quiet"]) == 0  # fmt: skip
    table = pq.read_table(root / "all")
    for split, part in (("train", table.slice(0, ROWS)), ("valid", table.slice(ROWS))):
        (root / split).mkdir()
        pq.write_table(part, root / split / "part-0.parquet")
    return root


def _run(tmp: Path, data: Path, name: str, train: dict, data_extra: dict | None = None):
    cfg = {
        "name": name,
        "schema": "frappe",
        "model": {"arch": "rankmixer", "dim": 16, "num_tokens": 4, "num_layers": 1, "ffn_mult": 2},
        "data": {
            "train": str(data / "train"),
            "valid": str(data / "valid"),
            "batch_size": 256,
            "eval_batch_size": 2048,
            **(data_extra or {}),
        },
        "train": {
            "lr": 0.01,
            "embedding_lr": 0.3,
            "log_every": 5,
            "threads": 1,
            "seed": 3,
            **train,
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_dir = tmp / name
    cmd = [sys.executable, "-m", "ranking.cli", "train", "--config", str(path), "--nproc", "2",
           "--run-dir", str(run_dir)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, json.loads((run_dir / "summary.json").read_text()), recs, proc.stderr


def test_select_best_exports_the_best_evaluation_and_stops_early(data, tmp_path, capsys):
    # a high learning rate and many evaluations: the valid AUC peaks and then falls
    run_dir, summary, recs, stderr = _run(
        tmp_path, data, "sel",
        {"epochs": 6, "eval_every": 4, "select_best": True, "early_stopping_patience": 2,
         "lr": 0.05, "embedding_lr": 1.0},
    )  # fmt: skip
    evals = [r["eval"] for r in recs if "eval" in r]
    best = max(evals, key=lambda m: m["auc"])
    assert summary["eval"]["auc"] == best["auc"]
    assert summary["exported_step"] == best["step"] == summary["selection"]["step"]
    # evaluations after the best one: fewer than the patience, unless the run stopped there
    after = [m for m in evals if m["step"] > best["step"]]
    if summary["stopped_early"]:
        assert "early stop at step" in stderr
        assert len(after) == 2 and summary["step"] == after[-1]["step"]
        assert summary["step"] < 6 * summary["steps_per_epoch"]
    else:
        assert len(after) < 2
    # the artifact is the best model: `mixrank eval` reproduces the best valid AUC
    capsys.readouterr()
    assert cli(["eval", "--artifact", str(run_dir / "artifact"), "--data",
                str(data / "valid")]) == 0  # fmt: skip
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(got["auc"] - best["auc"]) < 1e-4
    assert abs(got["logloss"] - best["logloss"]) < 1e-4


def test_embedding_l2_and_vocab_from_train(data, tmp_path):
    """``data.vocab_from_train`` builds the run's vocabularies (the resolved config uses them,
    the artifact carries them); ``embedding_l2`` trains on fused tables and shrinks the
    looked-up embeddings against the same run without it."""
    from ranking.export import load_artifact

    norms = {}
    for l2 in (0.0, 1.0):
        run_dir, summary, _, _ = _run(
            tmp_path, data, f"l2-{l2}", {"epochs": 1, "embedding_l2": l2},
            {"vocab_from_train": True},
        )  # fmt: skip
        resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert resolved["schema"] == str((run_dir / "vocab" / "schema.yaml").resolve())
        vocab_schema = yaml.safe_load((run_dir / "vocab" / "schema.yaml").read_text())
        item = next(f for f in vocab_schema["features"] if f["name"] == "item")
        n_items = len((run_dir / "vocab" / "item.txt").read_text().splitlines())
        assert item["num_buckets"] == n_items + 2  # missing + OOV rows
        art = load_artifact(run_dir / "artifact")
        table = next(v for k, v in art.model.state_dict().items() if k.endswith("item.weight"))
        assert table.shape[0] == n_items + 2
        norms[l2] = float(table[2:].float().pow(2).sum(1).mean())  # rows of real values
        assert summary["eval"]["auc"] > 0.55
    assert norms[1.0] < 0.5 * norms[0.0], norms
