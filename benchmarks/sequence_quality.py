"""Behaviour-sequence models: AUC per task over seeds (docs/RESULTS.md, "Behaviour sequences").

    python -m benchmarks.sequence_quality --out /tmp/seqq [--seeds 0 1 2] [--suite encoders]

On the ``sequence`` preset, generated (200k train rows, seed 1; 50k valid rows, seed 2) under
``--out/data`` unless present, each case trains with ``mixrank train`` (one process, the
config's own settings, ``train.seed`` per seed); on MovieLens-100k (``--suite movielens``, from
``../shared/data/movielens100k``), the histories are built by ``mixrank data sequences`` over
train, valid and test together, each case trains with ``--nproc 2`` and its artifact is also
evaluated on test. Prints the mean and standard deviation of the final AUC per task and split
as a Markdown table.

Suites:
- ``encoders``: pool against target attention (configs/synth_sequence_{pool,target_attention}.yaml)
  and query tokens;
- ``families``: target attention in every mixer family, and DLRM / DCNv2 on pooled histories;
- ``heads``: separate, MMoE and PLE task heads with target attention;
- ``movielens``: configs/movielens_sequence.yaml (target attention) and with pooled histories,
  against configs/movielens_best.yaml (no histories) and DLRM / DCNv2 on pooled histories.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

TA = "configs/synth_sequence_target_attention.yaml"
POOL = "configs/synth_sequence_pool.yaml"
ML_SEQ = "configs/movielens_sequence.yaml"
SUITES = {
    "encoders": [
        ("pool", POOL, []),
        ("target_attention", TA, []),
        ("query_tokens (k=4)", TA, ["model.sequence.encoder=query_tokens"]),
    ],
    "families": [
        ("rankmixer", TA, []),
        ("tokenmixer_large", TA, ["model.arch=tokenmixer_large", "model.num_heads=3"]),
        (
            "unimixer",
            TA,
            ["model.arch=unimixer", "model.num_heads=3", "model.unimixer.block_size=16"],
        ),
        (
            "unimixer_lite",
            TA,
            ["model.arch=unimixer_lite", "model.num_heads=3", "model.unimixer.block_size=16"],
        ),
        (
            "dlrm (pooled)",
            POOL,
            ["model.arch=dlrm", "model.dim=16", "model.tokenizer=", "model.norm="],
        ),
        (
            "dcnv2 (pooled)",
            POOL,
            ["model.arch=dcnv2", "model.dim=16", "model.tokenizer=", "model.norm="],
        ),
    ],
    "heads": [
        ("separate", TA, []),
        ("mmoe", TA, ["model.heads.type=mmoe"]),
        ("ple", TA, ["model.heads.type=ple"]),
    ],
    "movielens": [
        ("tokenmixer_large, no histories", "configs/movielens_best.yaml", []),
        ("tokenmixer_large + pooled histories", ML_SEQ, ["model.sequence.encoder=pool"]),
        ("tokenmixer_large + target attention", ML_SEQ, []),
        ("dlrm + pooled histories", "configs/movielens_dlrm.yaml", ["schema=movielens_sequence"]),
        ("dcnv2 + pooled histories", "configs/movielens_dcnv2.yaml", ["schema=movielens_sequence"]),
    ],
}
MOVIELENS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "movielens100k"


def ensure_data(root: Path) -> tuple[Path, Path]:
    train, valid = root / "train", root / "valid"
    for path, rows, seed in ((train, 200_000, 1), (valid, 50_000, 2)):
        if not path.exists():
            subprocess.run(
                [sys.executable, "-m", "ranking.cli", "data", "synth", "--preset", "sequence",
                 "--rows", str(rows), "--seed", str(seed), "--out", str(path), "--quiet"],
                check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
    return train, valid


def movielens_data(root: Path) -> tuple[Path, Path, Path]:
    if not MOVIELENS.is_dir():
        raise SystemExit(f"{MOVIELENS}: MovieLens-100k not found (../shared/data)")
    if not (root / "test.parquet").exists():
        splits = [str(MOVIELENS / f"{s}.parquet") for s in ("train", "valid", "test")]
        subprocess.run(
            [sys.executable, "-m", "ranking.cli", "data", "sequences", *splits, "--out", str(root),
             "--user", "user_id", "--item", "item_id", "--time", "timestamp", "--label", "label",
             "--length", "50"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    return root / "train.parquet", root / "valid.parquet", root / "test.parquet"


def run_case(
    config: str, overrides: list[str], seed: int, run_dir: Path, train, valid, test=None
) -> dict:
    """``{"<task>": valid AUC}``, and ``{"<task> (test)": AUC}`` with ``test``."""
    nproc = ["--nproc", "2"] if test is not None else []
    if not (run_dir / "summary.json").exists():
        cmd = [sys.executable, "-m", "ranking.cli", "train", "--config", config, *nproc,
               "--run-dir", str(run_dir), f"data.train={train}", f"data.valid={valid}",
               f"train.seed={seed}", *overrides]  # fmt: skip
        with open(run_dir.with_suffix(".log"), "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    final = json.loads((run_dir / "summary.json").read_text())["final_eval"]
    if "auc" in final:  # one task: the metrics at the top level
        final = {"valid": final}
    out = {task: m["auc"] for task, m in final.items() if isinstance(m, dict)}
    if test is not None:
        res = subprocess.run(
            [sys.executable, "-m", "ranking.cli", "eval", "--artifact", str(run_dir / "artifact"),
             "--data", str(test)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        got = json.loads(res.stdout.strip().splitlines()[-1])
        out["test"] = got["auc"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="/tmp/seqq")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--suite", choices=sorted(SUITES), nargs="+", default=["encoders"])
    args = p.parse_args(argv)
    out = Path(args.out)
    test = None
    if args.suite == ["movielens"]:
        train, valid, test = movielens_data(out / "movielens_sequence")
    elif "movielens" in args.suite:
        raise SystemExit("--suite movielens runs alone (its own data)")
    else:
        train, valid = ensure_data(out / "data")
    cases = [c for s in args.suite for c in SUITES[s]]
    total, done, t0 = len(cases) * len(args.seeds), 0, time.perf_counter()
    rows = []
    for name, config, overrides in cases:
        aucs: dict[str, list[float]] = {}
        for seed in args.seeds:
            slug = name.split()[0] if test is None else name.replace(" ", "").replace(",", "_")
            run = out / "runs" / f"{slug}-{Path(config).stem}-s{seed}"
            run.parent.mkdir(parents=True, exist_ok=True)
            for task, auc in run_case(config, overrides, seed, run, train, valid, test).items():
                aucs.setdefault(task, []).append(auc)
            done += 1
            el = time.perf_counter() - t0
            print(f"[{done}/{total}] {name} seed {seed}: "
                  + ", ".join(f"{t} {v[-1]:.4f}" for t, v in aucs.items())
                  + f" ({el:.0f} s, ETA {el / done * (total - done):.0f} s)",
                  file=sys.stderr, flush=True)  # fmt: skip
        rows.append((name, aucs))
    tasks = list(rows[0][1])
    print("| model | " + " | ".join(f"{t} AUC" for t in tasks) + " |")
    print("|---|" + "---|" * len(tasks))
    for name, aucs in rows:
        cells = []
        for t in tasks:
            v = aucs[t]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"{statistics.mean(v):.4f} ± {sd:.4f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\n{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}); valid AUC of the "
          "final model; mean ± standard deviation.")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
