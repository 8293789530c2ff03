"""The ranking service on a real Ray Serve on localhost (one module-scoped cluster).

Deployed from deploy/serve.yaml with test overrides (free ports, 2 Ranker replicas, small limits).
Checks: HTTP and gRPC answers equal offline predictions of the same rows read from Parquet;
context broadcast equals merged dicts; concurrent requests form batches larger than one; the
Prometheus endpoint parses and its counters match what was sent; a hot reload changes
``model_version`` with no failed request; a corrupt artifact keeps the old model and counts a
failed reload; every bad input gets the right status and field and the replicas keep answering.
"""

from __future__ import annotations

import copy
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serving.client import free_port

pytestmark = pytest.mark.slow

MAX_CANDIDATES = 300
MAX_BODY = 1 << 20
# Scores travel as float32 (gRPC) or the float32 value printed as a double (JSON); batching
# several requests together can change the summation order inside the model.
ATOL = 1e-5


def _request(n: int, seed: int) -> dict:
    from ranking.features import load_schema
    from serving.loadtest import synthetic_request

    return synthetic_request(load_schema("frappe"), n, seed=seed)


class Service:
    def __init__(self, tmp):
        from benchmarks.artifacts import make_artifact
        from serving import config

        self.a0 = make_artifact(tmp / "a0", seed=0)
        self.a1 = make_artifact(tmp / "a1", seed=1)
        self.corrupt = tmp / "corrupt"
        shutil.copytree(self.a1, self.corrupt)
        data = (self.corrupt / "weights.pt").read_bytes()
        (self.corrupt / "weights.pt").write_bytes(data[: len(data) // 2])
        self.http, self.grpc, self.metrics = free_port(), free_port(), free_port()
        self.overrides = {
            "Ranker": {
                "num_replicas": 2,
                "user_config": {
                    "max_candidates": MAX_CANDIDATES,
                    "batch_wait_timeout_s": 0.01,
                    "max_body_bytes": MAX_BODY,
                },
            },
        }
        self.config = config
        self.cfg = self.configure(self.a0)
        config.start(self.cfg, metrics_port=self.metrics, num_cpus=8)

    def configure(self, artifact, **user_config):
        overrides = copy.deepcopy(self.overrides)
        overrides["Ranker"]["user_config"].update(user_config)
        return self.config.load_config(
            artifact=artifact,
            http_port=self.http,
            grpc_port=self.grpc,
            host="127.0.0.1",
            deployments=overrides,
        )

    def http_client(self):
        from serving.client import HTTPClient

        return HTTPClient("127.0.0.1", self.http)

    def grpc_client(self):
        from serving.client import GRPCClient

        return GRPCClient("127.0.0.1", self.grpc)

    def scrape(self) -> dict:
        """``{(sample name, frozenset(labels minus replica/worker ids)): summed value}``."""
        from serving.rollout import scrape

        return scrape([f"http://127.0.0.1:{self.metrics}/metrics"])

    def quiet_scrape(self, timeout: float = 30.0) -> dict:
        """A scrape once earlier traffic has been exported (two scrapes 2.5 s apart agree);
        used as the baseline before counting."""
        prev = self.scrape()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(2.5)
            now = self.scrape()
            keys = [k for k in now if k[0].endswith(("_total", "_count"))]
            if all(now.get(k) == prev.get(k) for k in keys):
                return now
            prev = now
        raise AssertionError("metrics never settled")


def metric(scrape: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in scrape.items() if n == name and want <= set(lab))


def wait_for(pred, timeout=30.0, what="condition"):
    """Poll ``pred`` until truthy (returned); ``what`` may be a callable."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    s = None
    try:
        s = Service(tmp_path_factory.mktemp("serving"))
        yield s
    finally:
        from serving import config

        config.stop()


# ----------------------------------------------------------------------------- correctness
def test_http_and_grpc_equal_offline_predictions_from_parquet(svc, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ranking.data.convert import batch_from_arrow
    from ranking.export import load_artifact

    req = _request(40, seed=1)
    rows = [{**req["context"], **c} for c in req["candidates"]]
    cols = list(dict.fromkeys(k for r in rows for k in r))
    pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in cols}), tmp_path / "rows.parquet")
    table = pq.read_table(tmp_path / "rows.parquet")
    art = load_artifact(svc.a0)
    want = art.predict(batch_from_arrow(art.schema, table, with_labels=False))[:, 0].numpy()

    http = svc.http_client().rank({"candidates": rows, "top_k": 5})
    grpc_ = svc.grpc_client().rank({"candidates": rows, "top_k": 5})
    for got in (http, grpc_):
        assert got["model_version"] == art.model_version
        np.testing.assert_allclose(got["scores"], want, rtol=0, atol=ATOL)
        assert got["ranking"] == sorted(range(40), key=lambda i: -got["scores"][i])[:5]
    # The same request with the user features in `context`: the same scores.
    broadcast = svc.http_client().rank(req)
    np.testing.assert_allclose(broadcast["scores"], want, rtol=0, atol=ATOL)
    assert broadcast["request_id"] == req["request_id"]


def test_health(svc):
    status, body = svc.http_client().health()
    assert status == 200 and body["status"] == "ok" and body["model_version"]
    # device auto (deploy/serve.yaml): a replica without num_gpus sees no GPU and scores on CPU
    assert body["device"] == "cpu"


# ----------------------------------------------------------------------------- bad input
def _bad_cases():
    big = json.dumps({"candidates": [{"item": "x" * 2000}]}).encode()
    return [
        (b"{oops", "application/json", 400, "invalid_json", None),
        (b'{"candidates": [{}]}', "text/plain", 400, "unsupported_content_type", "content-type"),
        (b'{"candidates": []}', "application/json", 422, "empty_candidates", "candidates"),
        (
            json.dumps({"candidates": [{}] * (MAX_CANDIDATES + 1)}).encode(),
            "application/json",
            413,
            "too_many_candidates",
            "candidates",
        ),
        (b"x" * (MAX_BODY + 1), "application/json", 413, "body_too_large", "body"),
        (
            b'{"candidates": [{"shoe": 1}]}',
            "application/json",
            422,
            "unknown_feature",
            "candidates[0].shoe",
        ),
        (
            b'{"candidates": [{"item": NaN}]}',
            "application/json",
            422,
            "invalid_value",
            "candidates[0].item",
        ),
        (
            b'{"candidates": [{"item": Infinity}]}',
            "application/json",
            422,
            "invalid_value",
            "candidates[0].item",
        ),
        (
            b'{"candidates": [{"item": [1, 2]}]}',
            "application/json",
            422,
            "invalid_type",
            "candidates[0].item",
        ),
        (b'{"context": 5, "candidates": [{}]}', "application/json", 422, "invalid_type", "context"),
        (big, "application/json", 422, "value_too_long", "candidates[0].item"),
        (b"[" * 50_000 + b"]" * 50_000, "application/json", 400, "invalid_json", None),
        (
            b'{"candidates": [{"item": {"a": {"b": [1]}}}]}',
            "application/json",
            422,
            "invalid_type",
            "candidates[0].item",
        ),
    ]


def test_bad_inputs_get_status_code_and_field_and_replicas_survive(svc):
    c = svc.http_client()
    good = _request(8, seed=3)
    for body, ctype, status, code, field in _bad_cases():
        got_status, data = c.request("POST", "/v1/rank", body, {"Content-Type": ctype})
        err = json.loads(data)["error"]
        assert (got_status, err["code"], err["field"]) == (status, code, field), err
        assert "Traceback" not in err["message"]
        assert c.rank(good)["scores"]  # still answering after each
    status, data = c.request("GET", "/v1/nope")
    assert status == 404 and json.loads(data)["error"]["code"] == "not_found"
    from serving.errors import RequestError

    g = svc.grpc_client()
    with pytest.raises(RequestError) as ei:
        g.rank({"candidates": [{"item": 1.5}]})
    assert (ei.value.status, ei.value.code, ei.value.field) == (
        422,
        "invalid_value",
        "candidates[0].item",
    )
    assert g.rank(good)["scores"]


# ----------------------------------------------------------------------------- batching, metrics
def test_concurrent_requests_form_batches_and_metrics_count_what_was_sent(svc):
    before = svc.quiet_scrape()
    req = _request(64, seed=4)
    n_ok, n_bad = 64, 5

    def send(i):
        c = svc.http_client()
        try:
            return c.rank(req)["model_version"]
        finally:
            c.close()

    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(send, range(n_ok)))
    c = svc.http_client()
    for _ in range(n_bad):
        assert c.rank_raw(b'{"candidates": []}')[0] == 422

    name = "ray_mixrank_requests_total"

    def settled():
        now = svc.scrape()
        ok = metric(now, name, route="/v1/rank", code="200") - metric(
            before, name, route="/v1/rank", code="200"
        )
        bad = metric(now, name, route="/v1/rank", code="422") - metric(
            before, name, route="/v1/rank", code="422"
        )
        last[:] = [ok, bad]
        return now if (ok, bad) == (n_ok, n_bad) else None

    last: list = []
    now = wait_for(
        settled,
        timeout=40,
        what=lambda: f"request counters (ok, 422) = {last}, sent {(n_ok, n_bad)}",
    )
    rejected = metric(
        now, "ray_mixrank_rejected_requests_total", error="empty_candidates"
    ) - metric(before, "ray_mixrank_rejected_requests_total", error="empty_candidates")
    assert rejected == n_bad

    def scored():
        m = svc.scrape()
        done = metric(m, "ray_mixrank_scored_candidates_total") - metric(
            before, "ray_mixrank_scored_candidates_total"
        )
        return m if done == n_ok * 64 else None

    m = wait_for(scored, timeout=40, what="every candidate counted as scored")
    count = metric(m, "ray_mixrank_batch_requests_count") - metric(
        before, "ray_mixrank_batch_requests_count"
    )
    singles = metric(m, "ray_mixrank_batch_requests_bucket", le="1.0") - metric(
        before, "ray_mixrank_batch_requests_bucket", le="1.0"
    )
    assert count < n_ok, f"{n_ok} concurrent requests ran as {count} batches: no batching"
    assert count - singles > 0, "no batch held more than one request"
    # Two replicas report separately; their sum is what was sent (checked above).
    per_request = metric(now, "ray_mixrank_candidates_per_request_count") - metric(
        before, "ray_mixrank_candidates_per_request_count"
    )
    assert per_request == n_ok
    assert metric(now, "ray_mixrank_model_info", model_version=_version(svc.a0)) == 2


def _version(path) -> str:
    return json.loads((path / "manifest.json").read_text())["model_version"]


# ----------------------------------------------------------------------------- model versions
def test_hot_reload_without_failed_requests_then_corrupt_artifact_keeps_serving(svc):
    v0, v1 = _version(svc.a0), _version(svc.a1)
    req = _request(32, seed=5)
    seen: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def traffic():
        c = svc.http_client()
        while not stop.is_set():
            try:
                seen.append(c.rank(req)["model_version"])
            except Exception as e:
                failures.append(repr(e))

    before = svc.quiet_scrape()
    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(seen) > 5, what="traffic before the reload")
        # the new config also moves the forward to a worker thread (the default scores on
        # the replica's loop): both paths answer, and the switch loses no request
        svc.config.redeploy(svc.configure(svc.a1, forward_in_thread=True))
        wait_for(
            lambda: seen[-20:].count(v1) == 20, timeout=90, what="the new model on every replica"
        )
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[:3]
    assert seen[0] == v0 and set(seen) == {v0, v1}
    wait_for(
        lambda: (
            metric(svc.scrape(), "ray_mixrank_model_reloads_total", result="success")
            - metric(before, "ray_mixrank_model_reloads_total", result="success")
            == 2
        ),
        what="two successful reloads (one per replica)",
    )

    # A corrupt artifact: reload fails on both replicas, v1 keeps serving.
    svc.config.redeploy(svc.configure(svc.corrupt))
    m = wait_for(
        lambda: (
            (
                s := svc.scrape(),
                metric(s, "ray_mixrank_model_reloads_total", result="failure") >= 2,
            )[1]
            and s
        ),
        timeout=90,
        what="failed reloads counted",
    )
    assert metric(m, "ray_mixrank_model_info", model_version=v1) == 2
    c = svc.http_client()
    for _ in range(4):
        assert c.rank(req)["model_version"] == v1
    status, health = c.health()
    assert status == 200 and health["model_version"] == v1
    assert "weights.pt" in (health["last_reload_error"] or "")


def test_separate_ingress_topology_answers_the_same(svc):
    """``args.ingress: separate`` puts a thin RankIngress deployment in front of the Ranker (the
    default serves HTTP/gRPC from the Ranker itself): same answers, same error handling."""
    from ray import serve

    from ranking.data.convert import batch_from_rows
    from ranking.export import load_artifact

    cfg = svc.configure(svc.a1)
    app = cfg["applications"][0]
    app["args"] = {"ingress": "separate"}
    app["deployments"].append(
        {"name": "RankIngress", "num_replicas": 1, "user_config": {"max_body_bytes": MAX_BODY}}
    )
    svc.config.redeploy(cfg)

    def ingress_running():
        deps = serve.status().applications["mixrank"].deployments
        return "RankIngress" in deps and deps["RankIngress"].status == "HEALTHY"

    wait_for(ingress_running, timeout=120, what="the RankIngress deployment")
    req = _request(24, seed=7)
    art = load_artifact(svc.a1)
    rows = [{**req["context"], **c} for c in req["candidates"]]
    want = art.predict(batch_from_rows(art.schema, rows))[:, 0].numpy()
    c = svc.http_client()
    got = wait_for(
        lambda: (r := c.rank(req))["model_version"] == art.model_version and r,
        what="answers from the new model through RankIngress",
    )
    np.testing.assert_allclose(got["scores"], want, rtol=0, atol=ATOL)
    g = svc.grpc_client().rank(req)
    np.testing.assert_allclose(g["scores"], want, rtol=0, atol=ATOL)
    status, body = c.rank_raw(b"x" * (MAX_BODY + 1))
    assert status == 413 and body["error"]["code"] == "body_too_large"
