"""Kill a training run with SIGKILL, resume it, and compare it with the uninterrupted run.

What a user does to check the resume guarantee on a real config (issue #25's reproduction)::

    python -m benchmarks.resume_check --config configs/frappe_dlrm.yaml --kill-after 300 \\
        --work-dir /tmp/resume -- train.epochs=4 train.checkpoint_every=100 \\
        train.select_best=false train.early_stopping_patience=0

1. ``mixrank train`` into ``WORK/uninterrupted``;
2. the same into ``WORK/killed``; once ``checkpoints/step-<kill-after>`` is complete, one
   worker process gets SIGKILL (torchrun then stops the other and fails);
3. the same command into ``WORK/killed`` again: it resumes from its newest complete checkpoint;
4. prints one JSON line with both runs' final evaluation, exported ``model_version`` and the
   step the second run resumed from, and exits 1 when they differ (|delta| > ``--tol``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


def train_cmd(config: str, run_dir: Path, nproc: int, overrides: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ranking.cli",
        "train",
        "--config",
        config,
        "--nproc",
        str(nproc),
        "--run-dir",
        str(run_dir),
        *overrides,
    ]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _workers(cli_pid: int) -> list[int]:
    """The worker processes: the children of torchrun, itself the child of ``mixrank train``."""
    return [w for agent in _children(cli_pid) for w in _children(agent)]


def run_killed(cmd: list[str], run_dir: Path, kill_after: int, timeout: float) -> int:
    """Start ``cmd``; SIGKILL one worker once checkpoint ``kill_after`` is complete. Returns the
    newest complete checkpoint step when the kill landed."""
    marker = run_dir / "checkpoints" / f"step-{kill_after:08d}" / "COMPLETE"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while not marker.is_file():
        if proc.poll() is not None:
            raise SystemExit(
                f"the run ended before step {kill_after}:\n{proc.stderr.read()[-3000:]}"
            )
        if time.time() > deadline:
            proc.kill()
            raise SystemExit(f"timed out waiting for {marker}")
        time.sleep(0.02)
    workers = _workers(proc.pid)
    if not workers:
        raise SystemExit("found no worker process to kill")
    os.kill(workers[-1], signal.SIGKILL)
    proc.wait(timeout=120)
    done = [
        int(m.group(1))
        for p in (run_dir / "checkpoints").iterdir()
        if (m := re.fullmatch(r"step-(\d{8})", p.name)) and (p / "COMPLETE").is_file()
    ]
    return max(done)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--kill-after", type=int, required=True, help="checkpoint step to kill after")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--work-dir", default="runs/resume-check")
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    full, killed = work / "uninterrupted", work / "killed"

    t0 = time.perf_counter()
    print(f"[resume_check] uninterrupted run -> {full}", file=sys.stderr, flush=True)
    subprocess.run(
        train_cmd(args.config, full, args.nproc, args.overrides),
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=args.timeout,
    )
    t_full = time.perf_counter() - t0
    print(f"[resume_check] {t_full:.0f} s; killed run -> {killed}", file=sys.stderr, flush=True)
    cmd = train_cmd(args.config, killed, args.nproc, args.overrides)
    at_kill = run_killed(cmd, killed, args.kill_after, args.timeout)
    print(f"[resume_check] killed with step-{at_kill:08d} complete; resuming", file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"the resumed run failed:\n{proc.stderr[-3000:]}")
    resumed = re.search(r"resumed from step-(\d+)", proc.stderr)

    def result(run: Path) -> dict:
        s = json.loads((run / "summary.json").read_text())
        m = json.loads((run / "artifact" / "manifest.json").read_text())
        return {"eval": s["final_eval"], "model_version": m["model_version"]}

    a, b = result(full), result(killed)
    diffs = {
        k: abs(a["eval"][k] - b["eval"][k])
        for k in ("auc", "logloss")
        if isinstance(a["eval"].get(k), float)
    }
    same = all(d <= args.tol for d in diffs.values()) and a["model_version"] == b["model_version"]
    print(
        json.dumps(
            {
                "config": args.config,
                "overrides": args.overrides,
                "resumed_from": int(resumed.group(1)) if resumed else None,
                "uninterrupted": a,
                "resumed": b,
                "abs_diff": diffs,
                "same": same,
            }
        )
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
