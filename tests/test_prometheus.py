"""The dashboard and alert rules read through a real Prometheus (#27).

A local ``prometheus`` server (Debian's package; ``make setup`` installs it where apt is
available) scrapes a real ``mixrank`` service (Ray Serve, 2 Ranker replicas) every second, and a
short real training run's rank-0 exporter. The test sends known traffic (so many HTTP and gRPC
requests of so many candidates, so many bad ones), then evaluates every query of
``deploy/grafana/mixrank.json`` and every alert expression of
``deploy/prometheus/mixrank-rules.yaml`` through Prometheus's HTTP API and compares each with
what it sent: exact for counts and averages (a ratio of two counters scraped together is exact
over any window), within a bucket for quantiles. The alert rules also get ``promtool test
rules`` unit tests (``deploy/prometheus/mixrank-rules.test.yaml``).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from test_serving_e2e import wait_for  # poll until truthy, naming what timed out

from serving.client import free_port

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "mixrank.json"
RULES = REPO / "deploy" / "prometheus" / "mixrank-rules.yaml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "mixrank-rules.test.yaml"
NAMESPACE = "mixrank-test"

needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="Prometheus is not installed (make setup installs Debian's prometheus where apt is)",
)


# ------------------------------------------------------------------------------ rule unit tests
@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_alert_rules_pass_their_promtool_unit_tests():
    """Each alert fires on a series that should fire it, and stays silent otherwise."""
    check = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    tests = yaml.safe_load(RULE_TESTS.read_text())
    fired = {
        a["alertname"]
        for t in tests["tests"]
        for a in t.get("alert_rule_test", [])
        if a["exp_alerts"]
    }
    names = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert names <= fired, f"alerts without a firing test: {names - fired}"
    silent = [
        a for t in tests["tests"] for a in t.get("alert_rule_test", []) if not a["exp_alerts"]
    ]
    assert {a["alertname"] for a in silent} >= names, "every alert needs a silent case too"
    run = subprocess.run(
        ["promtool", "test", "rules", str(RULE_TESTS)], capture_output=True, cwd=RULE_TESTS.parent
    )
    assert run.returncode == 0, run.stdout.decode() + run.stderr.decode()


# ------------------------------------------------------------------------------ the live server
class Prometheus:
    """A local Prometheus scraping ``targets`` (``{job: port}``) every second."""

    def __init__(self, tmp: Path, targets: dict[str, int]):
        self.port = free_port()
        cfg = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {
                    "job_name": job,
                    "static_configs": [
                        {"targets": [f"127.0.0.1:{port}"], "labels": {"namespace": NAMESPACE}}
                    ],
                }
                for job, port in targets.items()
            ],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self.log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for(lambda: self._ready(), 60, "prometheus ready")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def api(self, path: str, **params) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[tuple[dict, float]]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", **params)
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def series_range(self, expr: str, start: float, end: float) -> list[tuple[dict, list]]:
        data = self.api("query_range", query=expr, start=start, end=end, step="1s")
        return [
            (r["metric"], [(float(t), float(v)) for t, v in r["values"]]) for r in data["result"]
        ]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def dashboard_queries() -> list[tuple[str, str, str]]:
    """``(panel title, legend, expr)`` of every query of the dashboard."""
    d = json.loads(DASHBOARD.read_text())
    return [
        (p["title"], t.get("legendFormat", ""), t["expr"])
        for p in d["panels"]
        for t in p.get("targets", [])
    ]


def grafana(expr: str, window_s: int) -> str:
    """A dashboard query as Grafana sends it: the namespace variable and the intervals set."""
    return (
        expr.replace("$namespace", NAMESPACE)
        .replace("$__rate_interval", f"{window_s}s")
        .replace("$__range", f"{window_s}s")
    )


def one(result: list[tuple[dict, float]]) -> float:
    assert len(result) == 1, result
    return result[0][1]


def by(result: list[tuple[dict, float]], *keys: str) -> dict:
    return {tuple(m.get(k, "") for k in keys): v for m, v in result}


# The traffic, in two phases. The warm-up makes every series exist and be scraped (as a service
# that has run a while); the measured phase is what the queries' window covers.
HTTP_REQUESTS, HTTP_CANDIDATES = 36, 128
GRPC_REQUESTS, GRPC_CANDIDATES = 18, 64
EMPTY, TOO_MANY = 5, 3  # 422 empty_candidates, 413 too_many_candidates
MAX_CANDIDATES = 200


def _request(n: int, seed: int) -> dict:
    from ranking.features import load_schema
    from serving.loadtest import synthetic_request

    return synthetic_request(load_schema("frappe"), n, seed=seed)


class Traffic:
    """Sends the requests of one phase from 4 threads; counts what was answered."""

    def __init__(self, http: int, grpc: int):
        self.http_port, self.grpc_port = http, grpc

    def send(self, http: int, grpc: int, empty: int, too_many: int) -> dict:
        from serving.client import GRPCClient, HTTPClient

        jobs = [("http", HTTP_CANDIDATES, i) for i in range(http)]
        jobs += [("grpc", GRPC_CANDIDATES, i) for i in range(grpc)]
        jobs += [("http", 0, i) for i in range(empty)]
        jobs += [("http", MAX_CANDIDATES + 1, i) for i in range(too_many)]

        def run(job) -> int:
            kind, n, seed = job
            req = _request(max(n, 1), seed)
            if n == 0:
                req["candidates"] = []
            if kind == "http":
                c = HTTPClient("127.0.0.1", self.http_port)
                try:
                    status, _ = c.rank_raw(json.dumps(req).encode())
                finally:
                    c.close()
                return status
            g = GRPCClient("127.0.0.1", self.grpc_port)
            try:
                g.rank(req)
                return 200
            finally:
                g.close()

        with ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(run, jobs))
        assert statuses.count(200) == http + grpc, statuses
        assert statuses.count(422) == empty and statuses.count(413) == too_many, statuses
        return {"statuses": statuses}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """The service (2 Ranker replicas), Prometheus scraping it, and the warm-up traffic."""
    from benchmarks.artifacts import make_artifact
    from serving import config

    if shutil.which("prometheus") is None:
        pytest.skip("Prometheus is not installed")
    tmp = tmp_path_factory.mktemp("prom")
    a0 = make_artifact(tmp / "a0", seed=0)
    a1 = make_artifact(tmp / "a1", seed=1)
    corrupt = tmp / "corrupt"
    shutil.copytree(a1, corrupt)
    data = (corrupt / "weights.pt").read_bytes()
    (corrupt / "weights.pt").write_bytes(data[: len(data) // 2])
    http, grpc, metrics = free_port(), free_port(), free_port()
    overrides = {
        "Ranker": {
            "num_replicas": 2,
            "user_config": {"max_candidates": MAX_CANDIDATES, "batch_wait_timeout_s": 0.01},
        }
    }

    def cfg(artifact):
        return config.load_config(
            artifact=artifact,
            http_port=http,
            grpc_port=grpc,
            host="127.0.0.1",
            deployments=copy.deepcopy(overrides),
        )

    config.start(cfg(a0), metrics_port=metrics, num_cpus=8)
    prom = Prometheus(tmp, {"ray": metrics})
    try:
        # the zero-initialised series of both replicas are scraped before any traffic
        wait_for(
            lambda: (
                prom.query(f'count(ray_mixrank_ranked_requests_total{{namespace="{NAMESPACE}"}})')
                and one(
                    prom.query(
                        f'count(ray_mixrank_ranked_requests_total{{namespace="{NAMESPACE}"}})'
                    )
                )
                == 2
            ),
            90,
            "both replicas' counters in Prometheus",
        )
        traffic = Traffic(http, grpc)
        # warm-up: every series moves, by as much as the measured phase will move it, so that
        # rate() extrapolates every series of a ratio alike (Prometheus stops a series'
        # extrapolation where it would reach 0: for a counter that starts near 0 that is sooner)
        traffic.send(HTTP_REQUESTS, GRPC_REQUESTS, EMPTY, TOO_MANY)
        yield {
            "prom": prom,
            "traffic": traffic,
            "reconfigure": lambda artifact: config.redeploy(cfg(artifact)),
            "a0": a0,
            "a1": a1,
            "corrupt": corrupt,
            "tmp": tmp,
        }
    finally:
        prom.stop()
        config.stop()


def _settled(prom: Prometheus, expr: str, want: float, timeout: float = 60) -> float:
    """The time at which Prometheus holds ``expr == want`` (the last traffic is scraped)."""
    got = []

    def reached():
        r = prom.query(expr)
        got[:] = [one(r)] if r else []
        return bool(r) and abs(one(r) - want) < 1e-9

    try:
        wait_for(reached, timeout, expr)
    except AssertionError:
        raise AssertionError(f"{expr}: {got} in Prometheus, expected {want}") from None
    return time.time()


@needs_prometheus
@pytest.mark.slow
def test_every_dashboard_query_reads_what_was_sent(live):
    prom: Prometheus = live["prom"]
    ns = f'namespace="{NAMESPACE}"'
    # one phase's count in each process's counters: the Ranker replicas' ranked requests, the
    # ingress's answered and refused ones (each process exports its metrics on its own clock,
    # so each is waited for: CI once ended the window before the ingress's last 413 was
    # scraped, and read 2.25 refusals of 3)
    phase = {
        f"sum(ray_mixrank_ranked_requests_total{{{ns}}})": HTTP_REQUESTS + GRPC_REQUESTS,
        f"sum(ray_mixrank_requests_total{{{ns}}})": HTTP_REQUESTS
        + GRPC_REQUESTS
        + EMPTY
        + TOO_MANY,
        f"sum(ray_mixrank_rejected_requests_total{{{ns}}})": EMPTY + TOO_MANY,
    }
    for expr, n in phase.items():  # the warm-up's
        _settled(prom, expr, n)
    time.sleep(3)  # scrapes of the warm-up's final values
    t0 = time.time()
    live["traffic"].send(HTTP_REQUESTS, GRPC_REQUESTS, EMPTY, TOO_MANY)
    t1 = max(_settled(prom, expr, 2 * n) for expr, n in phase.items()) + 2.5
    time.sleep(5)
    # the window (at - window, at] starts 2 s before the traffic (a scrape of the values before
    # it is inside) and ends after the scrapes of its final values
    window = math.ceil(t1 - t0) + 3
    at = t0 - 2 + window

    def delta(expr: str) -> dict:
        """An exact increase over the window, by the labels of ``expr``: the counter's value
        at its end minus its value at its start (no rate, no extrapolation)."""
        now, then = prom.query(expr, at), prom.query(expr, at - window)
        old = {tuple(sorted(m.items())): v for m, v in then}
        return {
            tuple(sorted(m.items())): v - old.get(tuple(sorted(m.items())), 0.0) for m, v in now
        }

    accepted = HTTP_REQUESTS + GRPC_REQUESTS
    answered = accepted + EMPTY + TOO_MANY
    candidates = HTTP_REQUESTS * HTTP_CANDIDATES + GRPC_REQUESTS * GRPC_CANDIDATES
    # the formed batches, from Ray's histogram count (exact; an independent series)
    (batches,) = delta(f"sum(ray_mixrank_batch_requests_count{{{ns}}})").values()
    results = {}
    for title, legend, expr in dashboard_queries():
        results[(title, legend)] = prom.query(grafana(expr, window), at)

    def q(title, legend):
        return results[(title, legend)]

    # QPS: the per-route, per-status rates times the window are the counts sent (rate()
    # extrapolates to the window's ends: within a scrape interval's share of it)
    qps = by(q("QPS by route and status", "{{route}} {{code}}"), "route", "code")
    want = {
        ("/v1/rank", "200"): HTTP_REQUESTS,
        ("/v1/rank", "422"): EMPTY,
        ("/v1/rank", "413"): TOO_MANY,
        ("grpc:/mixrank.v1.RankingService/Rank", "200"): GRPC_REQUESTS,
    }
    for key, n in want.items():
        assert qps[key] * window == pytest.approx(n, rel=1.5 / window + 1e-9), (key, qps)
    assert {k for k, v in qps.items() if v > 0} == set(want)
    # exact counts: the counters themselves over the window, by route and status
    exact = delta(f"sum by (route, code) (ray_mixrank_requests_total{{{ns}}})")
    exact = {(dict(k)["route"], dict(k)["code"]): v for k, v in exact.items() if v}
    assert exact == {k: float(n) for k, n in want.items()}

    # error shares: 5xx reads 0 (not "no data"); 4xx is the bad requests' share, a ratio of
    # rate()s: each series is extrapolated to the window's ends on its own (Prometheus stops a
    # counter's extrapolation where it would cross zero), so the ratio is exact only up to a
    # scrape interval's share of the window (CI saw 0.1269 for 0.1290); a wrong denominator
    # (the accepted requests instead of all answered) would be 15% off
    assert one(q("Errors", "5xx ratio")) == 0.0
    assert one(q("Errors", "4xx ratio")) == pytest.approx(
        (EMPTY + TOO_MANY) / answered, rel=1.0 / window
    )

    # averages from exact counters
    assert one(q("Batch size", "candidates per request (mean)")) == pytest.approx(
        candidates / accepted, rel=1e-9
    )
    assert one(q("Batch size", "candidates per batch (mean)")) == pytest.approx(
        candidates / batches, rel=1e-9
    )
    assert one(q("Batch size", "requests per batch (mean)")) == pytest.approx(
        accepted / batches, rel=1e-9
    )

    # rejected requests, by error code
    rejected = by(q("Rejected requests by error", "{{route}} {{error}}"), "route", "error")
    assert rejected[("/v1/rank", "empty_candidates")] * window == pytest.approx(EMPTY, rel=0.2)
    assert rejected[("/v1/rank", "too_many_candidates")] * window == pytest.approx(
        TOO_MANY, rel=0.2
    )

    # quantiles: inside the bucket that holds the quantile of the buckets' rates over the
    # window (what histogram_quantile interpolates within: rate() extrapolates each bucket
    # series by its own first and last samples, which can move a quantile that sits on a
    # bucket edge into the next bucket), and that bucket is the one holding the quantile of
    # the buckets' exact increases, or its neighbour
    def bucket_of(counts: dict, quantile: float, match: dict) -> tuple[int, float, float]:
        cum = sorted(
            (float(dict(k)["le"]), v)
            for k, v in counts.items()
            if all(dict(k).get(a, "") == b for a, b in match.items())
        )
        rank = quantile * cum[-1][1]
        lo = 0.0
        for i, (le, c) in enumerate(cum):
            if c >= rank:
                return i, lo, le
            lo = le
        raise AssertionError(cum)

    def rates(expr: str) -> dict:
        return {tuple(sorted(m.items())): v for m, v in prom.query(expr, at)}

    for title, metric, route_legend in (
        ("Latency (end to end, ingress)", "ray_mixrank_request_latency_seconds", True),
        ("Model forward time (per formed batch)", "ray_mixrank_forward_latency_seconds", False),
    ):
        for quantile in (0.5, 0.99):
            legend = f"p{round(quantile * 100)}" + (" {{route}}" if route_legend else "")
            for metric_labels, v in q(title, legend):
                if math.isnan(v):  # a route without answers in the window
                    continue
                match = {"route": metric_labels["route"]} if route_legend else {}
                by_le = f"sum by (le, route) ({metric}_bucket{{{ns}}})"
                i, lo, hi = bucket_of(
                    rates(f"sum by (le, route) (rate({metric}_bucket{{{ns}}}[{window}s]))"),
                    quantile,
                    match,
                )
                assert lo <= v <= hi, (title, legend, metric_labels, v, lo, hi)
                i_exact, _, _ = bucket_of(delta(by_le), quantile, match)
                assert abs(i - i_exact) <= 1, (title, legend, metric_labels, i, i_exact)

    # the model version: both replicas, with the dtype
    versions = by(
        q("Model version (replicas serving it)", "{{model_version}} ({{dtype}})"),
        "model_version",
        "dtype",
    )
    manifest = json.loads((live["a0"] / "manifest.json").read_text())
    assert list(versions.values()) == [2.0]
    ((version, dtype),) = versions
    assert version == manifest["model_version"] and dtype

    # healthy replicas: Ray's own gauge, per deployment
    healthy = by(q("Healthy replicas", "{{deployment}}"), "deployment")
    assert healthy.get(("Ranker",)) == 2.0, healthy

    # the alert expressions: none holds on this healthy service
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            assert prom.query(rule["expr"], at) == [], rule["alert"]


@needs_prometheus
@pytest.mark.slow
def test_model_version_panel_through_a_rollout_and_a_failed_reload(live):
    """The model-version gauge stays exported for the replica's life (Ray evicts a gauge not
    set for two export intervals); through a rollout the panel shows both replicas' version;
    reload counts and the reload alert follow a failed reload."""
    prom: Prometheus = live["prom"]
    ns = f'namespace="{NAMESPACE}"'
    panel = next(e for t, _, e in dashboard_queries() if t.startswith("Model version"))
    reloads = next(e for t, _, e in dashboard_queries() if t == "Model reloads")

    def versions():
        return by(prom.query(grafana(panel, 60)), "model_version")

    v0 = json.loads((live["a0"] / "manifest.json").read_text())["model_version"]
    v1 = json.loads((live["a1"] / "manifest.json").read_text())["model_version"]
    for _ in range(2):  # both replicas on v0
        assert versions() == {(v0,): 2.0}
        time.sleep(3)
    t0 = time.time()
    seen = set()
    live["reconfigure"](live["a1"])

    def rolled():
        v = versions()
        seen.add(tuple(sorted(v.items())))
        return v == {(v1,): 2.0}

    wait_for(rolled, 90, "both replicas on the new version")
    for _ in range(9):  # and it stays, 45 s after the swap set it (Ray evicted it in 20-30 s)
        time.sleep(5)
        assert versions() == {(v1,): 2.0}
    assert all(sum(dict(s).values()) <= 2.0 for s in seen), seen
    # a failed reload: the replicas keep v1 and count the failure; the alert's expression holds
    live["reconfigure"](live["corrupt"])
    failure = f'sum(ray_mixrank_model_reloads_total{{{ns},result="failure"}})'
    wait_for(lambda: (r := prom.query(failure)) and one(r) == 2.0, 90, "two failed reloads")
    time.sleep(2)
    assert versions() == {(v1,): 2.0}
    window = int(time.time() - t0) + 5
    counts = by(prom.query(grafana(reloads, window)), "result")
    assert round(counts[("success",)]) == 2 and round(counts[("failure",)]) == 2, counts
    rule = next(
        r
        for g in yaml.safe_load(RULES.read_text())["groups"]
        for r in g["rules"]
        if r["alert"] == "MixrankModelReloadFailed"
    )
    assert prom.query(rule["expr"]) and one(prom.query(rule["expr"])) > 0
    live["reconfigure"](live["a0"])  # leave the service as the fixture made it


@needs_prometheus
@pytest.mark.slow
def test_training_metrics_read_what_the_run_logged(tmp_path):
    """A short real run (2 ranks) with ``train.prometheus_port``: every (step, loss) and
    (step, eval AUC) pair Prometheus scraped from rank 0 is one that ``metrics.jsonl`` holds."""
    from test_train_bad_data import _config, _train, _write, good_table

    port = free_port()
    prom = Prometheus(tmp_path, {"train": port})
    try:
        root = tmp_path / "data"
        _write(good_table(seed=1), root / "a.parquet")
        _write(good_table(seed=2), root / "b.parquet")
        _write(good_table(seed=3), tmp_path / "valid" / "v.parquet")
        cfg = _config(
            tmp_path,
            str(root),
            str(tmp_path / "valid"),
            train__epochs=40,
            train__log_every=2,
            train__prometheus_port=port,
        )
        t0 = time.time()
        proc = _train(cfg, tmp_path / "run", timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        t1 = time.time()
        time.sleep(2)
        ns = f'namespace="{NAMESPACE}"'
        recs = [
            json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        ]
        loss = {r["step"]: r["loss"] for r in recs if "loss" in r}
        auc = {r["step"]: r["eval"]["auc"] for r in recs if "eval" in r}
        scraped, last = {}, 0.0
        for name in ("mixrank_train_step", "mixrank_train_loss", "mixrank_train_eval_auc"):
            (series,) = prom.series_range(f"{name}{{{ns}}}", t0, t1 + 2)
            # NaN: the gauge before its first value (the run's first log line, first eval)
            scraped[name] = {v for _, v in series[1] if not math.isnan(v)}
            last = max(last, max(t for t, _ in series[1]))
        # several distinct scrapes while it trained, each a value the run logged (a scrape
        # may fall between the gauges' updates, so values are matched per gauge)
        assert len(scraped["mixrank_train_step"]) >= 3, scraped
        assert scraped["mixrank_train_step"] <= {float(s) for s in loss}
        for v in scraped["mixrank_train_loss"]:
            assert any(v == pytest.approx(x, rel=1e-12) for x in loss.values()), v
        for v in scraped["mixrank_train_eval_auc"]:
            assert any(v == pytest.approx(a, rel=1e-12) for a in auc.values()), (v, auc)
        # the dashboard's training panels select these series (while the run was up: once its
        # endpoint is gone, Prometheus marks the series stale)
        for title, _, expr in dashboard_queries():
            if title.startswith("Training"):
                assert prom.query(grafana(expr, 60), last), expr
    finally:
        prom.stop()
