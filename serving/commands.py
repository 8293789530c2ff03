"""``mixrank serve`` and ``mixrank loadtest``."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

from ranking.errors import UserError


def register(sub) -> None:
    from serving.config import DEFAULT_CONFIG

    p = sub.add_parser("serve", help="serve an artifact on a local Ray Serve (foreground)")
    p.add_argument("--artifact", required=True, help="exported artifact directory")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=9000)
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default loopback)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="Ray Serve config YAML")
    p.add_argument(
        "--metrics-port", type=int, default=8080, help="Ray's Prometheus endpoint (/metrics)"
    )
    p.add_argument("--replicas", type=int, default=None, help="fixed Ranker replica count")
    p.add_argument(
        "--log-dir",
        default=None,
        help="log answered requests (features as received, scores) as Parquet under DIR "
        "(or a URI), for `mixrank data join-labels` and `mixrank check-consistency`",
    )
    p.add_argument(
        "--log-sample-rate",
        type=float,
        default=None,
        help="share of requests logged, chosen by request id (default 1.0)",
    )
    p.add_argument(
        "--direct-ingress",
        action="store_true",
        help="Ray Serve's throughput-optimized mode: each Ranker replica also answers HTTP and "
        "gRPC on its own ports (printed), skipping the proxy hop; the proxy stays on "
        "--http-port/--grpc-port (docs/SERVING.md)",
    )
    p.add_argument(
        "--dashboard-port",
        type=int,
        default=8265,
        help="Ray dashboard with Serve's REST API, for `mixrank rollout` (0: none)",
    )
    p.set_defaults(func=serve)

    p = sub.add_parser(
        "rollout",
        help="check, gate, shadow, canary and promote a new artifact in a running service",
        description="Roll a new artifact into a running service through Serve's REST API: "
        "check it, gate it on offline data, optionally shadow and canary it, then promote it "
        "(docs/LOOP.md). Exit 3 when the gate or the check refuses it (the service unchanged).",
    )
    p.add_argument("--artifact", required=True, help="the new artifact (path seen by the replicas)")
    _service_args(p)
    p.add_argument("--gate-data", default=None, help="Parquet rows to evaluate both models on")
    p.add_argument("--max-auc-drop", type=float, default=0.002, help="gate: allowed AUC drop")
    p.add_argument("--max-ne-increase", type=float, default=None, help="gate: allowed NE rise")
    p.add_argument("--shadow-seconds", type=float, default=0.0, help="shadow live traffic")
    p.add_argument("--canary", type=float, default=0.0, help="share of requests for the canary")
    p.add_argument("--canary-seconds", type=float, default=30.0)
    p.add_argument("--canary-key", default=None, help="request_id (default) or a context feature")
    p.add_argument(
        "--metrics-url",
        action="append",
        default=None,
        help="Prometheus endpoint(s) of the replicas' nodes, for the shadow and canary "
        "reports (default http://127.0.0.1:8080/metrics, as `mixrank serve`)",
    )
    p.add_argument("--no-promote", action="store_true", help="stop after shadow / canary")
    p.set_defaults(func=cmd_rollout)

    p = sub.add_parser("rollback", help="serve the model before the last promotion again")
    _service_args(p)
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("loadtest", help="closed-loop load against a local ranking service")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="service URL (loopback)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--duration", type=float, default=10.0, help="seconds")
    p.add_argument("--candidates", type=int, default=256, help="candidates per request")
    p.add_argument("--grpc", action="store_true", help="send over gRPC instead of HTTP")
    p.add_argument("--grpc-port", type=int, default=9000)
    p.add_argument("--schema", default="frappe", help="schema the requests are made for")
    p.add_argument("--max-requests", type=int, default=1_000_000)
    p.set_defaults(func=loadtest)


def _service_args(p) -> None:
    p.add_argument(
        "--address",
        default="http://127.0.0.1:8265",
        help="the Ray dashboard (Serve's REST API) of the service",
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the service's HTTP address")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each step")


def cmd_rollout(args) -> int:
    from serving.rollout import RolloutRefused, ServeAdmin, rollout

    try:
        report = rollout(
            ServeAdmin(args.address),
            args.artifact,
            url=args.url,
            gate_data=args.gate_data,
            max_auc_drop=args.max_auc_drop,
            max_ne_increase=args.max_ne_increase,
            shadow_seconds=args.shadow_seconds,
            canary=args.canary,
            canary_seconds=args.canary_seconds,
            canary_key=args.canary_key,
            metrics_urls=args.metrics_url or ["http://127.0.0.1:8080/metrics"],
            promote=not args.no_promote,
            timeout=args.timeout,
        )
    except RolloutRefused as e:
        print(f"mixrank: refused: {e}", file=sys.stderr)
        return 3
    print(json.dumps(report))
    return 0


def cmd_rollback(args) -> int:
    from serving.rollout import ServeAdmin, rollback

    print(json.dumps(rollback(ServeAdmin(args.address), url=args.url, timeout=args.timeout)))
    return 0


def serve(args) -> int:
    from ranking.export import ArtifactError, read_manifest
    from serving import config

    try:
        manifest = read_manifest(args.artifact)
    except ArtifactError as e:
        raise UserError(str(e)) from e
    overrides: dict = {"Ranker": {"num_replicas": args.replicas}} if args.replicas else {}
    logging = {}
    if args.log_dir is not None:
        logging["log_dir"] = (
            str(Path(args.log_dir).resolve()) if "://" not in args.log_dir else args.log_dir
        )
    if args.log_sample_rate is not None:
        logging["log_sample_rate"] = args.log_sample_rate
    if logging:
        overrides.setdefault("Ranker", {})["user_config"] = logging
    cfg = config.load_config(
        args.config,
        artifact=args.artifact,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        host=args.host,
        deployments=overrides or None,
    )
    try:
        print(f"starting Ray Serve with {args.config} ...", flush=True)
        config.start(
            cfg,
            metrics_port=args.metrics_port,
            direct_ingress=args.direct_ingress,
            dashboard_port=args.dashboard_port or None,
        )
        # Ctrl-C and SIGTERM end the loop below and shut down cleanly. Installed after
        # ray.init, which sets its own handlers; SIGINT explicitly, since a shell starts
        # background jobs with it ignored.
        signal.signal(signal.SIGINT, _interrupt)
        signal.signal(signal.SIGTERM, _interrupt)
        print(
            f"serving model {manifest['model_version']} ({manifest.get('arch')}) from "
            f"{Path(args.artifact).resolve()}\n"
            f"  HTTP  http://{args.host}:{args.http_port}/v1/rank  (GET /healthz)\n"
            f"  gRPC  {args.host}:{args.grpc_port}  mixrank.v1.RankingService/Rank\n"
            f"  metrics http://127.0.0.1:{args.metrics_port}/metrics",
            flush=True,
        )
        if args.dashboard_port:
            print(f"  Serve REST API  http://127.0.0.1:{args.dashboard_port}", flush=True)
        log_dir = cfg_log_dir(cfg)
        if log_dir:
            print(f"  request log  {log_dir}", flush=True)
        if args.direct_ingress:
            targets = config.ingress_targets()
            for proto, path in (("http", "/v1/rank"), ("grpc", "")):
                for _, port in targets[proto]:
                    print(f"  direct {proto.upper():4}  {args.host}:{port}{path}", flush=True)
        print("Ctrl-C to stop.", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("\nshutting down ...", flush=True)
    finally:
        config.stop()
    return 0


def cfg_log_dir(cfg: dict) -> str:
    """The Ranker's ``user_config.log_dir`` in a Serve config ("" when off)."""
    from serving.config import APP, RANKER

    for app in cfg.get("applications", []):
        if app.get("name") == APP:
            for dep in app.get("deployments", []):
                if dep.get("name") == RANKER:
                    return (dep.get("user_config") or {}).get("log_dir", "")
    return ""


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def loadtest(args) -> int:
    from ranking.features import load_schema
    from serving.loadtest import run_load, synthetic_request

    if not 1 <= args.candidates <= 100_000:
        raise UserError(f"--candidates: expected 1..100000, got {args.candidates}")
    request = synthetic_request(load_schema(args.schema), args.candidates)
    # no request_id: the service gives each request its own, as for real traffic (the request
    # log, the canary split and the shadow see distinct requests)
    del request["request_id"]
    result = run_load(
        args.url,
        request,
        concurrency=args.concurrency,
        duration=args.duration,
        grpc_port=args.grpc_port if args.grpc else None,
        max_requests=args.max_requests,
    )
    print(json.dumps(result))
    print(
        f"{result['transport']}: {result['ok']} ok, {sum(result['errors'].values())} errors "
        f"in {result['seconds']} s at concurrency {args.concurrency}: "
        f"p50 {result['p50_ms']} ms, p95 {result['p95_ms']} ms, p99 {result['p99_ms']} ms, "
        f"{result['rps']} req/s, {result['candidates_per_s']:,.0f} candidates/s"
    )
    return 1 if result["errors"] else 0
