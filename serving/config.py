"""Run ``deploy/serve.yaml`` on a local Ray: the path ``mixrank serve``, the tests and the demo
share, so that the file operators edit is the file that is exercised.

``load_config`` reads the YAML and applies command-line overrides (artifact, ports, per-
deployment options); ``start`` starts Ray (with its metrics endpoint) and deploys the config the
way ``serve run CONFIG`` does; ``stop`` shuts both down.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import yaml

from ranking.errors import UserError
from serving.settings import IngressSettings, RankerSettings, known_keys

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "serve.yaml"
APP = "mixrank"
RANKER = "Ranker"
INGRESS = "RankIngress"
# user_config keys each deployment reads (serving/settings.py); anything else is a typo
USER_CONFIG_KEYS = {RANKER: known_keys(RankerSettings), INGRESS: known_keys(IngressSettings)}


def load_config(
    path: str | Path = DEFAULT_CONFIG,
    *,
    artifact: str | Path | None = None,
    http_port: int | None = None,
    grpc_port: int | None = None,
    host: str | None = None,
    deployments: dict[str, dict[str, Any]] | None = None,
) -> dict:
    """The Serve config as a dict, with overrides applied and the result validated by Serve's
    own schema (``UserError`` naming the file otherwise).

    ``deployments``: ``{name: {option: value}}`` merged into the named deployments of the
    ``mixrank`` application; a ``user_config`` dict is merged key by key.
    """
    path = Path(path)
    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot read the Serve config: {e}") from e
    cfg = copy.deepcopy(cfg)
    if http_port is not None:
        cfg.setdefault("http_options", {})["port"] = http_port
    if host is not None:
        cfg.setdefault("http_options", {})["host"] = host
    if grpc_port is not None:
        cfg.setdefault("grpc_options", {})["port"] = grpc_port
    app = next((a for a in cfg.get("applications", []) if a.get("name") == APP), None)
    if app is None:
        raise UserError(f"{path}: applications: no application named {APP!r}")
    by_name = {d["name"]: d for d in app.get("deployments", [])}
    overrides = copy.deepcopy(deployments or {})
    if artifact is not None:
        overrides.setdefault(RANKER, {}).setdefault("user_config", {})["artifact"] = str(
            Path(artifact).resolve()
        )
    for name, opts in overrides.items():
        if name not in by_name:
            raise UserError(f"{path}: applications[{APP}].deployments: no deployment {name!r}")
        dep = by_name[name]
        for k, v in opts.items():
            if k == "user_config":
                dep.setdefault("user_config", {}).update(v)
            else:
                if k == "num_replicas":
                    dep.pop("autoscaling_config", None)
                dep[k] = v
    _validate(cfg, path)
    return cfg


def _validate(cfg: dict, path: Path) -> None:
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    for app in cfg.get("applications") or []:
        if app.get("name") != APP:
            continue
        for i, dep in enumerate(app.get("deployments") or []):
            known = USER_CONFIG_KEYS.get(dep.get("name"))
            user = dep.get("user_config") or {}
            if known is None or not isinstance(user, dict):
                continue
            where = f"{path}: applications[{APP}].deployments[{i}] ({dep['name']})"
            for key in user:
                if key not in known:
                    raise UserError(
                        f"{where}: user_config.{key}: unknown key (expected one of {sorted(known)})"
                    )
            settings = RankerSettings if dep.get("name") == RANKER else IngressSettings
            try:  # the values too, as the replica will read them
                settings.from_user_config(user)
            except ValueError as e:
                raise UserError(f"{where}: {e}") from None

    try:
        ServeDeploySchema.model_validate(cfg)
    except ValidationError as e:
        raise UserError(f"{path}: not a valid Serve config: {e}") from e


# Ray Serve's throughput-optimized mode (docs.ray.io "Enable High Throughput on Ray Serve"):
# among others, direct ingress: every ingress replica runs its own HTTP and gRPC server, so a
# request goes client -> replica with no proxy actor and no Ray RPC for its body. The proxy on
# the head node keeps answering on http_options.port as before. Process-level: it must be in
# the environment when Ray starts (KubeRay: the pods' env, see helm/).
THROUGHPUT_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # a direct-ingress replica drains for this long before it stops (Ray's default is 30 s;
    # ours answer in milliseconds)
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}


def start(
    cfg: dict,
    *,
    metrics_port: int | None = None,
    num_cpus: int | None = None,
    timeout_s: float = 120.0,
    quiet: bool = True,
    direct_ingress: bool = False,
    dashboard_port: int | None = None,
) -> None:
    """Start a local Ray (metrics on ``metrics_port``) and deploy ``cfg``; wait until every
    application is RUNNING (``UserError`` with Serve's message if one fails).

    ``direct_ingress``: start Ray with Serve's throughput-optimized mode (``THROUGHPUT_ENV``):
    each ingress replica also listens on its own ports (``ingress_targets``). Applies to a Ray
    this call starts; an explicit value in the environment wins."""
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    repo = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
    # Ray starts workers at nice 15 (below the raylet and GCS). A serving replica then yields
    # the CPU to the HTTP proxy, the load generator and every nice-0 process on the node, and
    # serves less (docs/BENCHMARKS.md, "Measurements behind code choices"). Set before the
    # raylet starts; an explicit value in the environment wins.
    os.environ.setdefault("RAY_worker_niceness", "0")
    saved = {k: os.environ.get(k) for k in THROUGHPUT_ENV}
    if direct_ingress:
        for k, v in THROUGHPUT_ENV.items():
            os.environ.setdefault(k, v)
    if not ray.is_initialized():
        try:
            ray.init(
                num_cpus=num_cpus or max(os.cpu_count() or 1, 8),
                include_dashboard=dashboard_port is not None,
                dashboard_host="127.0.0.1",
                dashboard_port=dashboard_port or 8265,
                namespace="serve",
                log_to_driver=not quiet,
                _metrics_export_port=metrics_port,
                _system_config={"metrics_report_interval_ms": 1000},
                runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}},
            )
        except Exception as e:  # a busy machine: the raylet or GCS did not come up
            raise UserError(f"could not start a local Ray: {e}") from e
        finally:  # the raylet has its copy; later starts in this process choose afresh
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    schema = ServeDeploySchema.model_validate(cfg)
    serve.start(
        http_options=schema.http_options.model_dump(),
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
        proxy_location=schema.proxy_location,
    )
    _deploy(schema)
    wait_running(timeout_s)
    if dashboard_port is not None:
        wait_rest_api(f"http://127.0.0.1:{dashboard_port}", timeout_s)


def wait_rest_api(address: str, timeout_s: float = 120.0) -> None:
    """Block until Serve's REST API on the dashboard answers (it starts after Ray)."""
    from serving.rollout import ServeAdmin

    admin = ServeAdmin(address, timeout=5.0)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin.config()
            return
        except UserError as e:
            if time.monotonic() > deadline:
                raise UserError(f"Serve's REST API not up after {timeout_s:.0f} s: {e}") from e
            time.sleep(0.5)


def _deploy(schema) -> None:
    """Apply a whole Serve config (every application, with the YAML's deployment overrides:
    user_config, replicas, actor options) to the running Serve.

    Serve has no public Python API for this: ``serve deploy`` goes through the dashboard's REST
    endpoint (we run Ray without the dashboard), and ``serve.run`` takes built applications, so
    the YAML's per-deployment overrides would have to be re-applied by hand. This calls the
    client ``serve deploy``'s endpoint itself calls (``ray.serve.context._get_global_client``,
    ``ServeControllerClient.deploy_apps``)."""
    from ray.serve.context import _get_global_client

    _get_global_client().deploy_apps(schema, _blocking=False)


def ingress_targets(app: str = APP, timeout_s: float = 30.0) -> dict[str, list[tuple[str, int]]]:
    """``{"http": [(ip, port), ...], "grpc": [...]}``: where ``app``'s ingress replicas listen
    in direct-ingress mode (the head node's proxy otherwise), from the Serve controller's
    target groups (the list Ray's HAProxy integration balances over). Waits until every
    running ingress replica has its ports."""
    import ray
    from ray.serve.context import _get_global_client

    # no public API lists a replica's own ports: read the controller's target groups (what
    # Ray's HAProxy integration reads)
    controller = _get_global_client()._controller
    deadline = time.monotonic() + timeout_s
    while True:
        out: dict[str, list[tuple[str, int]]] = {"http": [], "grpc": []}
        for group in ray.get(controller.get_target_groups.remote(app)):
            proto = str(getattr(group.protocol, "value", group.protocol)).lower()
            if group.app_name == app and proto in out:
                out[proto] += [(t.ip, t.port) for t in group.targets]
        if out["http"] or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def wait_running(timeout_s: float = 120.0) -> None:
    """Block until every application is RUNNING; ``UserError`` on DEPLOY_FAILED or timeout."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        apps = serve.status().applications
        states = {name: a.status for name, a in apps.items()}
        if apps and all(s == "RUNNING" for s in states.values()):
            return
        for name, a in apps.items():
            if a.status == "DEPLOY_FAILED":
                raise UserError(f"application {name!r} failed to deploy: {a.message}")
        if time.monotonic() > deadline:
            raise UserError(f"applications not running after {timeout_s:.0f} s: {states}")
        time.sleep(0.5)


def redeploy(cfg: dict) -> None:
    """Apply a changed config to the running Serve (e.g. a new artifact in ``user_config``:
    replicas are reconfigured in place, no restart)."""
    from ray.serve.schema import ServeDeploySchema

    _deploy(ServeDeploySchema.model_validate(cfg))


def stop() -> None:
    """Shut down Serve and the local Ray (safe to call twice)."""
    import ray
    from ray import serve

    try:
        if ray.is_initialized():
            serve.shutdown()
    finally:
        ray.shutdown()
