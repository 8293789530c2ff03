"""Three simulated days with drift: warm-started models against from-scratch models at the
same step budget (#22, "Must show").

The planted signal of the Frappe-shaped synthetic data turns by ``--drift`` radians a day
(``ranking.data.synth``: day d's hidden vectors are ``cos(drift d) x + sin(drift d) x'``).
Each day has its own training partition (``dt=``) and validation rows. Day 1's model is trained
from scratch; on days 2 and 3 two models are trained on that day's partition alone with the same
steps (``train.epochs``): one warm-started from the previous day's warm model (``mixrank train
--warm-start``), one from scratch. Both are evaluated on the day's validation rows and on the
next day's (what the model serves until it is replaced). Repeated for ``--seeds`` seeds (the
seed of the rows and of the model init; the signal is the same).

    python -m benchmarks.loop_drift --out /tmp/drift [--seeds 3] [--rows 100000]

Writes ``results.json`` and a plot (``--plot``, default docs/loop_drift.png) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo.yaml"
DATES = {1: "2026-01-01", 2: "2026-01-02", 3: "2026-01-03", 4: "2026-01-04"}


def _synth(out: Path, rows: int, seed: int, day: int, drift: float) -> None:
    from ranking.cli import main as cli

    rc = cli(["data", "synth", "--preset", "frappe", "--rows", str(rows), "--out", str(out),
              "--seed", str(seed), "--day", str(day), "--drift", str(drift), "--quiet"])  # fmt: skip
    if rc:
        raise SystemExit(rc)


def _train(run: Path, data: Path, day: int, valid: Path, seed: int, epochs: int, warm, nproc):
    from ranking.cli import main as cli

    argv = [
        "train", "--config", str(CONFIG), "--nproc", str(nproc), "--run-dir", str(run),
        f"data.train={data}", f"data.since={DATES[day]}", f"data.until={DATES[day]}",
        f"data.valid={valid}", f"train.epochs={epochs}", f"train.seed={seed}",
        "train.log_every=100000",
    ]  # fmt: skip
    if warm is not None:
        argv += ["--warm-start", str(warm)]
    t0 = time.perf_counter()
    rc = cli(argv)
    if rc:
        raise SystemExit(f"training failed ({rc}): {' '.join(argv)}")
    return run / "artifact", time.perf_counter() - t0


def run(args) -> dict:
    from serving.rollout import _primary, evaluate_artifact

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in range(args.seeds):
        base = out / f"seed{seed}"
        data = base / "train"
        valid = {}
        for day in (1, 2, 3, 4):
            if day <= 3 and not (data / f"dt={DATES[day]}").exists():
                _synth(data / f"dt={DATES[day]}", args.rows, 100 * seed + day, day, args.drift)
            valid[day] = base / f"valid-{day}"
            if not valid[day].exists():
                _synth(valid[day], args.valid_rows, 100 * seed + 50 + day, day, args.drift)

        def auc(art, day, valid=valid):
            return _primary(evaluate_artifact(str(art), str(valid[day])))["auc"]

        warm, _ = _train(base / "d1", data, 1, valid[1], seed, args.epochs, None, args.nproc)
        rec = {"seed": seed, "day1": {"auc_same_day": auc(warm, 1), "auc_next_day": auc(warm, 2)}}
        for day in (2, 3):
            w, tw = _train(base / f"d{day}-warm", data, day, valid[day], seed, args.epochs,
                           warm, args.nproc)  # fmt: skip
            s, ts = _train(base / f"d{day}-scratch", data, day, valid[day], seed, args.epochs,
                           None, args.nproc)  # fmt: skip
            rec[f"day{day}"] = {
                "warm": {"auc_same_day": auc(w, day), "auc_next_day": auc(w, day + 1)},
                "scratch": {"auc_same_day": auc(s, day), "auc_next_day": auc(s, day + 1)},
                "seconds": {"warm": round(tw, 1), "scratch": round(ts, 1)},
            }
            warm = w
        results.append(rec)
        print(json.dumps(rec), flush=True)
    summary = {"drift": args.drift, "rows_per_day": args.rows, "epochs": args.epochs,
               "seeds": args.seeds, "runs": results}  # fmt: skip
    for day in (2, 3):
        for kind in ("warm", "scratch"):
            for when in ("auc_same_day", "auc_next_day"):
                v = [r[f"day{day}"][kind][when] for r in results]
                summary[f"day{day}_{kind}_{when}"] = {
                    "mean": statistics.mean(v),
                    "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                }
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    return summary


def table(summary: dict) -> str:
    lines = [
        f"drift {summary['drift']} rad/day, {summary['rows_per_day']:,} rows/day, "
        f"{summary['epochs']} epoch(s)/day, {summary['seeds']} seeds (mean +- std)",
        "| day | model | AUC on the day's valid | AUC on the next day's valid |",
        "| --- | --- | --- | --- |",
    ]
    for day in (2, 3):
        for kind in ("warm", "scratch"):
            same = summary[f"day{day}_{kind}_auc_same_day"]
            nxt = summary[f"day{day}_{kind}_auc_next_day"]
            lines.append(
                f"| {day} | {kind} | {same['mean']:.4f} +- {same['std']:.4f} | "
                f"{nxt['mean']:.4f} +- {nxt['std']:.4f} |"
            )
    return "\n".join(lines)


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for kind, color in (("warm", "tab:blue"), ("scratch", "tab:orange")):
        for r in summary["runs"]:
            ys = [r["day1"]["auc_same_day"]] + [r[f"day{d}"][kind]["auc_same_day"] for d in (2, 3)]
            ax.plot([1, 2, 3], ys, color=color, alpha=0.35, marker="o")
        means = [statistics.mean(r["day1"]["auc_same_day"] for r in summary["runs"])] + [
            summary[f"day{d}_{kind}_auc_same_day"]["mean"] for d in (2, 3)
        ]
        ax.plot([1, 2, 3], means, color=color, lw=2.5, marker="o",
                label=f"{kind} (day 1 shared)")  # fmt: skip
    ax.set_xticks([1, 2, 3])
    ax.set_xlabel(f"day (the planted signal turns {summary['drift']:.2f} rad a day)")
    ax.set_ylabel("AUC on the day's validation rows")
    ax.set_title("Warm start vs from scratch at the same steps per day")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rows", type=int, default=100_000, help="training rows per day")
    p.add_argument("--valid-rows", type=int, default=25_000)
    p.add_argument("--epochs", type=int, default=1, help="epochs per day (the step budget)")
    p.add_argument("--drift", type=float, default=0.15)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--plot", default=str(REPO / "docs" / "loop_drift.png"))
    args = p.parse_args(argv)
    summary = run(args)
    print(table(summary))
    if args.plot:
        plot(summary, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
