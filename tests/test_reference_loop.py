"""``benchmarks/reference_loop.py``, the plain-PyTorch reference of docs/RESULTS.md: its AUC
against torchmetrics' and the pairwise definition, and one short run of each model on a small
Frappe-shaped table (10 string fields, a planted user x item signal) written to tmp_path."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from benchmarks import reference_loop as ref
from ranking.metrics import binary_metrics


def test_auc_matches_torchmetrics_and_the_pairwise_definition():
    rng = np.random.default_rng(0)
    y = (rng.random(500) < 0.3).astype(np.int64)
    p = rng.random(500) + 0.3 * y
    pairs = np.mean([pi > pj for pi in p[y == 1] for pj in p[y == 0]])
    assert ref.auc(y, p) == pytest.approx(pairs, abs=1e-12)
    tm = binary_metrics(torch.tensor(p), torch.tensor(y, dtype=torch.float32))["auc"]
    assert ref.auc(y, p) == pytest.approx(tm, abs=1e-6)


def _table(n: int, rng) -> pa.Table:
    user, item = rng.integers(0, 30, n), rng.integers(0, 40, n)
    label = ((user * 7 + item * 3) % 5 < 2).astype(np.int8)  # a user x item interaction
    cols = {"label": label, "user": user, "item": item}
    for f in ("daytime", "weekday", "isweekend", "homework", "cost", "weather", "country", "city"):
        cols[f] = rng.integers(0, 4, n)
    return pa.table({k: v if k == "label" else v.astype(str) for k, v in cols.items()})


@pytest.mark.parametrize("model", ["mlp", "rankmixer"])
def test_reference_loop_learns_a_planted_interaction(tmp_path, model, capsys):
    rng = np.random.default_rng(1)
    pq.write_table(_table(6000, rng), tmp_path / "train.parquet")
    pq.write_table(_table(2000, rng), tmp_path / "valid.parquet")
    args = ["--model", model, "--data", str(tmp_path), "--emb", "16", "--batch", "256",
            "--epochs", "8", "--lr", "3e-3", "--reg", "1e-4", "--threads", "1"]  # fmt: skip
    assert ref.main(args) == 0
    out = capsys.readouterr().out
    assert "epoch 1: valid AUC" in out and "samples/s" in out
    best = float(out.strip().splitlines()[-1].split()[-1])
    assert best > 0.75, out  # chance is 0.5; the label depends on user and item jointly
