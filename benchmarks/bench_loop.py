"""``mixrank bench loop``: what the continuous-training loop costs the service, in one run.

On a local Serve from deploy/serve.yaml (a small RankMixer with random weights,
``benchmarks.artifacts.make_artifact``; 256 candidates per request, ``--replicas`` Ranker replicas, the Ray dashboard for Serve's REST API):

- **request logging** at sample rate 1.0 against logging off, at concurrency 8 over HTTP:
  ``--slices`` alternating short load slices (off, on, off, on, ...; logging switched through
  ``user_config`` in between), the throughput ratio on/off per adjacent pair and its median
  (the host's speed drifts: pairs, not two long phases). Then the log is flushed and read
  back: every request answered while logging was on must be there exactly once, with its 256
  candidates (``exactly_once``).
- **rollout under load**: a steady phase, then the same load while ``mixrank rollout`` promotes
  a second model, then while ``mixrank rollback`` returns to the first: failed requests and p99
  of each phase, and the p99 ratios against the steady phase.

Targets (#22): logging costs at most 5% of c=8 throughput (``log_throughput_ratio`` >= 0.95);
no failed request during rollout and rollback, p99 within 1.5x of the steady state.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path

CANDIDATES = 256


def add_arguments(parser) -> None:
    parser.add_argument("--slices", type=int, default=8, help="logging A/B slices (even)")
    parser.add_argument("--slice-seconds", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--phase-seconds", type=float, default=8.0, help="rollout phases")


def run(args) -> int:
    from benchmarks.artifacts import make_artifact
    from benchmarks.common import emit, machine_info
    from ranking.data.servedlog import read_logs
    from ranking.features import load_schema
    from serving import config
    from serving.client import free_port
    from serving.loadtest import run_load, synthetic_request
    from serving.rollout import ServeAdmin, rollback, rollout

    emit({"bench": "loop", "machine": machine_info()})
    tmp = Path(tempfile.mkdtemp(prefix="mixrank-bench-loop-"))
    a0 = make_artifact(tmp / "a0", seed=0)
    a1 = make_artifact(tmp / "a1", seed=1)
    logs = tmp / "logs"
    http, grpc, met, dash = (free_port() for _ in range(4))
    cfg = config.load_config(
        artifact=a0,
        http_port=http,
        grpc_port=grpc,
        host="127.0.0.1",
        deployments={"Ranker": {"num_replicas": args.replicas}},
    )
    request = synthetic_request(load_schema("frappe"), CANDIDATES)
    del request["request_id"]  # the service gives each request its own id: counted in the log
    url = f"http://127.0.0.1:{http}"
    c = args.concurrency
    try:
        config.start(cfg, metrics_port=met, dashboard_port=dash)
        admin = ServeAdmin(f"http://127.0.0.1:{dash}")

        def load(seconds: float) -> dict:
            return run_load(url, request, concurrency=c, duration=seconds, progress=None)

        # ---------------------------------------------------------------- logging A/B
        slices, expected = [], 0
        load(2.0)  # warm
        for i in range(args.slices):
            on = i % 2 == 1
            admin.update_ranker({"log_dir": str(logs) if on else ""})
            r = load(args.slice_seconds)
            slices.append({"logging": on, "rps": r["rps"], "p99_ms": r["p99_ms"],
                           "errors": sum(r["errors"].values())})  # fmt: skip
            if on:
                expected += r["requests"] + 2 * c  # run_load's warm-up requests are answered too
        admin.update_ranker({"log_dir": ""})  # closes the log: everything flushed
        pairs = [slices[i + 1]["rps"] / slices[i]["rps"] for i in range(0, len(slices) - 1, 2)]
        t = read_logs(str(logs)).to_table(columns=["request_id", "candidate"])
        per_id = t.group_by("request_id").aggregate([("candidate", "count_distinct"),
                                                     ("candidate", "count")])  # fmt: skip
        counts = per_id["candidate_count"].to_pylist()
        distinct = per_id["candidate_count_distinct"].to_pylist()
        rec = {
            "bench": "loop",
            "case": "request_log",
            "concurrency": c,
            "replicas": args.replicas,
            "slices": slices,
            "log_throughput_ratio": round(statistics.median(pairs), 4),
            "log_throughput_ratios": [round(p, 4) for p in pairs],
            "logged_requests": per_id.num_rows,
            "answered_while_logging": expected,
            "exactly_once": per_id.num_rows == expected
            and all(n == CANDIDATES for n in counts)
            and all(n == CANDIDATES for n in distinct),
        }
        emit(rec)

        # ---------------------------------------------------------------- rollout under load
        phases = {}

        def during(name: str, action) -> None:
            box: dict = {}
            th = threading.Thread(target=lambda: box.update(load(args.phase_seconds)))
            th.start()
            time.sleep(1.0)
            t0 = time.perf_counter()
            if action is not None:
                action()
            took = time.perf_counter() - t0
            th.join()
            phases[name] = {
                "p50_ms": box["p50_ms"],
                "p99_ms": box["p99_ms"],
                "rps": box["rps"],
                "failed": sum(box["errors"].values()),
                "requests": box["requests"],
                "action_s": round(took, 2) if action is not None else None,
            }

        during("steady", None)
        during("rollout", lambda: rollout(admin, str(a1), url=url))
        during("rollback", lambda: rollback(admin, url=url))
        steady = phases["steady"]["p99_ms"]
        emit(
            {
                "bench": "loop",
                "case": "rollout_under_load",
                "replicas": args.replicas,
                "concurrency": c,
                "phases": phases,
                "rollout_p99_ratio": round(phases["rollout"]["p99_ms"] / steady, 3),
                "rollback_p99_ratio": round(phases["rollback"]["p99_ms"] / steady, 3),
                "failed": phases["rollout"]["failed"] + phases["rollback"]["failed"],
            }
        )
        print(
            f"\nrequest log at rate 1.0, c={c}: throughput on/off median "
            f"{rec['log_throughput_ratio']:.3f} (pairs {rec['log_throughput_ratios']}); "
            f"{rec['logged_requests']} requests logged of {expected} answered, exactly once: "
            f"{rec['exactly_once']}\n"
            f"rollout under load: p99 {phases['rollout']['p99_ms']:.1f} ms vs steady "
            f"{steady:.1f} ms ({phases['rollout']['p99_ms'] / steady:.2f}x), rollback "
            f"{phases['rollback']['p99_ms']:.1f} ms; failed requests: "
            f"{phases['rollout']['failed']} / {phases['rollback']['failed']}"
        )
    finally:
        config.stop()
    return 0
