"""Ray Serve's throughput-optimized mode (``direct_ingress``): every Ranker replica answers
HTTP and gRPC on its own ports, found through the Serve controller's target groups.

A real Ray Serve on localhost (deploy/serve.yaml, 2 Ranker replicas). Checks, at every
replica's own ports: the answers equal the model's in-process predictions of the same rows and
the answers through the proxy; bad requests get their status and field and the replica keeps
answering; the Prometheus counters count the requests sent there; the process environment is
left as it was.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request

import numpy as np
import pytest

from serving.client import free_port

pytestmark = pytest.mark.slow

ATOL = 1e-5  # see tests/test_serving_e2e.py
REPLICAS = 2


def _request(n: int, seed: int) -> dict:
    from ranking.features import load_schema
    from serving.loadtest import synthetic_request

    return synthetic_request(load_schema("frappe"), n, seed=seed)


@pytest.fixture(scope="module")
def direct(tmp_path_factory):
    from benchmarks.artifacts import make_artifact
    from serving import config

    artifact = make_artifact(tmp_path_factory.mktemp("direct") / "a0", seed=0)
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    cfg = config.load_config(
        artifact=artifact,
        http_port=ports["http"],
        grpc_port=ports["grpc"],
        host="127.0.0.1",
        deployments={"Ranker": {"num_replicas": REPLICAS}},
    )
    env_before = {k: os.environ.get(k) for k in config.THROUGHPUT_ENV}
    try:
        config.start(cfg, metrics_port=ports["metrics"], num_cpus=8, direct_ingress=True)
        targets = config.ingress_targets()
        deadline = time.monotonic() + 60
        while len(targets["http"]) < REPLICAS and time.monotonic() < deadline:
            time.sleep(0.5)
            targets = config.ingress_targets()
        yield {
            "artifact": artifact,
            "ports": ports,
            "targets": targets,
            "env_before": env_before,
        }
    finally:
        config.stop()


def _reference(artifact, req: dict) -> np.ndarray:
    """The model's own forward of the merged rows: no serving code involved."""
    from ranking.data.convert import batch_from_rows
    from ranking.export import load_artifact

    art = load_artifact(artifact)
    rows = [{**req["context"], **c} for c in req["candidates"]]
    return art.predict(batch_from_rows(art.schema, rows))[:, 0].numpy()


def test_every_replica_listens_and_answers_like_the_model(direct):
    from serving.client import GRPCClient, HTTPClient

    targets = direct["targets"]
    assert len(targets["http"]) == REPLICAS and len(targets["grpc"]) == REPLICAS
    proxy_ports = {direct["ports"]["http"], direct["ports"]["grpc"]}
    assert not proxy_ports & {p for _, p in targets["http"] + targets["grpc"]}

    req = _request(50, seed=2)
    want = _reference(direct["artifact"], req)
    version = json.loads((direct["artifact"] / "manifest.json").read_text())["model_version"]
    answers = [HTTPClient("127.0.0.1", direct["ports"]["http"]).rank(req)]  # through the proxy
    for (_, http_port), (_, grpc_port) in zip(targets["http"], targets["grpc"]):
        status, health = HTTPClient("127.0.0.1", http_port).health()
        assert status == 200 and health["model_version"] == version
        answers.append(HTTPClient("127.0.0.1", http_port).rank(req))
        answers.append(GRPCClient("127.0.0.1", grpc_port).rank(req))
    for got in answers:
        assert got["model_version"] == version and got["request_id"] == req["request_id"]
        np.testing.assert_allclose(got["scores"], want, rtol=0, atol=ATOL)
        assert got["ranking"] == sorted(range(50), key=lambda i: (-got["scores"][i], i))


def test_bad_requests_at_a_replica_port_and_the_counters(direct):
    from prometheus_client.parser import text_string_to_metric_families

    from serving.client import HTTPClient

    def count(code: str) -> float:
        url = f"http://127.0.0.1:{direct['ports']['metrics']}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        return sum(
            s.value
            for fam in text_string_to_metric_families(text)
            if fam.name == "ray_mixrank_requests"
            for s in fam.samples
            if s.name == "ray_mixrank_requests_total"
            and s.labels.get("route") == "/v1/rank"
            and s.labels.get("code") == code
        )

    def settled() -> tuple[float, float]:
        prev = (count("200"), count("400"))
        for _ in range(20):
            time.sleep(2.5)
            now = (count("200"), count("400"))
            if now == prev:
                return now
            prev = now
        raise AssertionError("metrics never settled")

    before = settled()
    _, port = direct["targets"]["http"][0]
    c = HTTPClient("127.0.0.1", port)
    good = _request(8, seed=5)
    n = 6
    for _ in range(n):
        status, body = c.rank_raw(b'{"candidates": [')
        assert status == 400 and body["error"]["code"] == "invalid_json"
        status, body = c.rank_raw(json.dumps({"candidates": [{"item": 1.5}]}).encode())
        assert (status, body["error"]["field"]) == (422, "candidates[0].item")
        assert c.rank(good)["scores"]  # the replica keeps answering
    deadline = time.monotonic() + 40
    while True:
        ok, bad = count("200") - before[0], count("400") - before[1]
        if (ok, bad) == (n, n) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert (ok, bad) == (n, n), f"counted (200, 400) = {(ok, bad)}, sent {(n, n)}"


def test_environment_is_left_as_it_was(direct):
    from serving import config

    assert {k: os.environ.get(k) for k in config.THROUGHPUT_ENV} == direct["env_before"]
