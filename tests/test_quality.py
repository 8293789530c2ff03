"""``mixrank bench quality --quick``: the quality harness end to end on the real shared data.

Trains a subset (DLRM and RankMixer, one seed, 150 steps) on Frappe and MovieLens-100k with the
real training job, plus one extra width of the scaling sweep, and checks the results page, the
JSON results and the plots. Research-licensed data: skipped when ../shared/data is absent.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# logistic-regression floors (shared/data/README.md) and the margin a 150-step run may fall short
FLOORS = {"frappe": 0.9376, "movielens": 0.6865}
MARGIN = 0.05


@pytest.mark.slow
def test_quality_quick(shared_data, repo_root, tmp_path):
    out = tmp_path / "RESULTS.md"
    cmd = [
        sys.executable, "-m", "benchmarks.quality", "--quick", "--data", str(shared_data),
        "--out", str(out), "--work-dir", str(tmp_path / "runs"), "--nproc", "2",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=repo_root, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ETA" in proc.stderr  # a progress line per run

    results = json.loads((tmp_path / "quality_quick_results.json").read_text())
    rows = {(r["dataset"], r["arch"]): r for r in results["rows"]}
    assert set(rows) == {(d, a) for d in FLOORS for a in ("dlrm", "rankmixer")}
    for (ds, _arch), r in rows.items():
        assert r["valid_auc"] > FLOORS[ds] - MARGIN, r
        assert 0 < r["valid_logloss"] < 0.7, r
        assert r["flops"] > 0 and r["dense_params"] > 0 and r["samples_per_s"] > 0
    # each arch runs its config's recipe and global batch (Frappe RankMixer: recipe B at 4096)
    assert (rows[("frappe", "rankmixer")]["recipe"], rows[("frappe", "rankmixer")]["global_batch"]) == ("B", 4096)  # fmt: skip
    assert (rows[("frappe", "dlrm")]["recipe"], rows[("frappe", "dlrm")]["global_batch"]) == ("A", 1024)  # fmt: skip
    for arch in ("dlrm", "rankmixer"):  # MovieLens final numbers come from the test split
        assert 0.5 < rows[("movielens", arch)]["test_auc"] < 1.0
    # the configs train on per-run vocabularies (data.vocab_from_train): the embedding-parameter
    # count is that of the vocabulary-sized tables (16-wide rows, + missing and OOV rows)
    vocab = tmp_path / "runs" / "frappe_dlrm_s0" / "vocab"
    sizes = [len(f.read_text().splitlines()) for f in sorted(vocab.glob("*.txt"))]
    assert len(sizes) == 10
    assert rows[("frappe", "dlrm")]["emb_params"] == 16 * sum(n + 2 for n in sizes)
    # the reported model is the best evaluation on valid (select_best), and says which epoch
    for r in results["runs"]:
        assert r["best_epoch"] is not None and 0 < r["best_epoch"] <= r["epochs_run"]
        assert r["paused_s"] is not None and 0 <= r["paused_s"] <= r["wall_s"]
    # the scaling sweep: the main RankMixer run plus one smaller width
    sweep = [r for r in results["runs"] if r["group"] == "scaling"]
    assert [r["size"] for r in sweep] == [16]

    text = out.read_text()
    for ds in FLOORS:
        assert f"### {ds}" in text
    for arch in ("dlrm", "rankmixer"):
        assert f"| {arch} |" in text or f"| **{arch}** |" in text
    assert "Scaling sweep" in text and "AUC = a + b log10" in text
    for png in ("quality_quick_auc.png", "quality_quick_scaling.png"):
        p = tmp_path / png
        assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
