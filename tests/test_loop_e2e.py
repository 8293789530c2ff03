"""The loop on a real Ray Serve on localhost (2 Ranker replicas, request logging on, the Ray
dashboard for Serve's REST API): what HTTP and gRPC traffic logs, the consistency check of those
logs, and rollouts (refused by the check and the gate, shadow, canary, promotion, rollback)
under continuous load with no failed request.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pytest

from serving.client import free_port

pytestmark = pytest.mark.slow

N_CAND = 12


def _request(schema, i: int, tag: str) -> dict:
    from serving.loadtest import synthetic_request

    body = synthetic_request(schema, N_CAND, seed=i)
    body["request_id"] = f"{tag}-{i}"
    return body


class Loop:
    def __init__(self, tmp):
        from benchmarks.artifacts import make_artifact
        from serving import config

        self.tmp = tmp
        self.a0 = make_artifact(tmp / "a0", seed=0)
        self.a1 = make_artifact(tmp / "a1", seed=1)
        self.corrupt = tmp / "corrupt"
        make_artifact(self.corrupt, seed=2)
        w = self.corrupt / "weights.pt"
        w.write_bytes(w.read_bytes()[:1000])
        self.logs = tmp / "logs"
        self.http, self.grpc, self.metrics, self.dash = (free_port() for _ in range(4))
        cfg = config.load_config(
            artifact=self.a0,
            http_port=self.http,
            grpc_port=self.grpc,
            host="127.0.0.1",
            deployments={
                "Ranker": {
                    "num_replicas": 2,
                    "user_config": {"log_dir": str(self.logs), "log_flush_seconds": 0.5},
                }
            },
        )
        config.start(cfg, metrics_port=self.metrics, num_cpus=8, dashboard_port=self.dash)
        from ranking.features import load_schema
        from serving.rollout import ServeAdmin

        self.schema = load_schema("frappe")
        self.admin = ServeAdmin(f"http://127.0.0.1:{self.dash}")
        self.url = f"http://127.0.0.1:{self.http}"

    def http_client(self):
        from serving.client import HTTPClient

        return HTTPClient("127.0.0.1", self.http)

    def grpc_client(self):
        from serving.client import GRPCClient

        return GRPCClient("127.0.0.1", self.grpc)


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    from serving import config

    try:
        yield Loop(tmp_path_factory.mktemp("loop"))
    finally:
        config.stop()


def _logged(loop, ids: set[str], timeout: float = 30.0):
    """The log rows of ``ids``, once every one of them is on disk."""
    from ranking.data.servedlog import read_logs

    deadline = time.monotonic() + timeout
    while True:
        t = read_logs(str(loop.logs)).to_table()
        got = set(t["request_id"].to_pylist()) if t.num_columns else set()
        if ids <= got or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert ids <= got, f"{len(ids - got)} answered requests never logged"
    mask = pa.compute.is_in(t["request_id"], pa.array(sorted(ids)))
    return t.filter(mask)


def test_http_and_grpc_traffic_is_logged_once_and_rescored_exactly(loop):
    bodies = [_request(loop.schema, i, "http") for i in range(24)]
    bodies += [_request(loop.schema, 100 + i, "grpc") for i in range(16)]
    answers = {}

    def send(b):
        c = loop.http_client() if b["request_id"].startswith("http") else loop.grpc_client()
        answers[b["request_id"]] = c.rank(b)
        c.close()

    with ThreadPoolExecutor(6) as ex:
        list(ex.map(send, bodies))
    t = _logged(loop, set(answers))
    # exactly once: one row per (request, candidate), the candidates as sent
    keys = list(zip(t["request_id"].to_pylist(), t["candidate"].to_pylist()))
    assert len(keys) == len(set(keys)) == len(bodies) * N_CAND
    by_id = {b["request_id"]: b for b in bodies}
    for r in t.to_pylist():
        a = answers[r["request_id"]]
        assert r["model_version"] == a["model_version"]
        assert abs(r["score_click"] - a["scores"][r["candidate"]]) < 1e-6
        sent = by_id[r["request_id"]]["candidates"][r["candidate"]]
        assert r["item"] == str(sent["item"])
    # the train/serve skew check on the logs: the training path gives the served scores
    from ranking.consistency import check_consistency

    rep = check_consistency(str(loop.a0), str(loop.logs), quiet=True)
    assert rep["ok"] and rep["rows"] >= len(bodies) * N_CAND
    assert rep["tasks"]["click"]["max_abs"] <= 1e-5


def test_an_unusable_log_dir_is_reported_and_requests_are_still_answered(loop):
    from serving.rollout import health

    blocker = loop.tmp / "a-file"
    blocker.write_text("not a directory")
    loop.admin.update_ranker({"log_dir": str(blocker / "logs")})
    try:
        for _ in range(4):  # both replicas
            h = health(loop.url)
            assert "user_config.log_dir" in h.get("request_log_error", ""), h
        assert loop.http_client().rank(_request(loop.schema, 1, "nolog"))["scores"]
    finally:
        loop.admin.update_ranker({"log_dir": str(loop.logs)})
    assert "request_log_error" not in health(loop.url)


class Load:
    """Closed-loop HTTP load in threads; every answer must be a 200 with a JSON body."""

    def __init__(self, loop, threads: int = 3):
        self.loop, self.stop = loop, threading.Event()
        self.answers: list[tuple[float, str, str, float]] = []  # (t, id, version, seconds)
        self.failures: list[str] = []
        self.threads = [
            threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(threads)
        ]

    def _run(self, k: int) -> None:
        from serving.client import HTTPClient

        c = HTTPClient("127.0.0.1", self.loop.http)
        i = 0
        while not self.stop.is_set():
            body = _request(self.loop.schema, 10000 * (k + 1) + i, f"load{k}")
            i += 1
            t0 = time.perf_counter()
            try:
                a = c.rank(body)
                self.answers.append(
                    (time.time(), body["request_id"], a["model_version"], time.perf_counter() - t0)
                )
            except Exception as e:
                self.failures.append(f"{type(e).__name__}: {e}")

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(30)


def _gate_data(loop) -> str:
    from test_loop import gate_rows

    from ranking.export import load_artifact

    return gate_rows(load_artifact(loop.a0), loop.tmp / "gate.parquet", seed=700)


def test_rollouts_under_load(loop, capsys):
    from ranking.cli import main
    from ranking.export import read_manifest
    from serving.reqlog import sampled
    from serving.rollout import RolloutRefused, rollback, rollout

    v0 = read_manifest(loop.a0)["model_version"]
    v1 = read_manifest(loop.a1)["model_version"]
    metrics = [f"http://127.0.0.1:{loop.metrics}/metrics"]
    common = ["--address", loop.admin.address, "--url", loop.url]
    with Load(loop) as load:
        time.sleep(2)
        # a corrupt artifact is refused before the service is touched
        assert main(["rollout", "--artifact", str(loop.corrupt), *common]) == 3
        assert "check refused" in capsys.readouterr().err
        # the gate refuses a worse model
        gate = _gate_data(loop)
        with pytest.raises(RolloutRefused, match="gate refused"):
            rollout(loop.admin, str(loop.a1), url=loop.url, gate_data=gate, max_auc_drop=0.01)
        assert loop.admin.ranker_user_config()["artifact"] == str(loop.a0)
        # shadow, then a canary (not promoted): the split follows the hash of request_id
        t_canary = None
        rep = rollout(
            loop.admin,
            str(loop.a1),
            url=loop.url,
            shadow_seconds=3,
            canary=0.5,
            canary_seconds=3,
            metrics_urls=metrics,
            promote=False,
        )
        sh = rep["shadow"]
        assert sh["requests"]["scored"] >= 1
        assert sh["candidates"] == N_CAND * sh["requests"]["scored"]
        assert -1 <= sh["correlation"] <= 1
        assert rep["canary"]["new"]["requests"] >= 1
        uc = loop.admin.ranker_user_config()
        assert uc["artifact"] == str(loop.a0) and not uc["canary_artifact"]
        # a canary left on: every answer's version is the hash rule's
        loop.admin.update_ranker({"canary_artifact": str(loop.a1), "canary_fraction": 0.5})
        t_canary = time.time()
        http = loop.http_client()
        for i in range(30):
            b = _request(loop.schema, 900 + i, "canary")
            want = v1 if sampled(b["request_id"], 0.5) else v0
            assert http.rank(b)["model_version"] == want
        # promote, then roll back, under the same load
        rep = rollout(loop.admin, str(loop.a1), url=loop.url, metrics_urls=metrics)
        assert rep["promoted"] and loop.admin.ranker_user_config()["previous_artifact"] == str(
            loop.a0
        )
        for i in range(6):
            assert http.rank(_request(loop.schema, 950 + i, "after"))["model_version"] == v1
        out = rollback(loop.admin, url=loop.url)
        assert out["model_version"] == v0
        time.sleep(1)
    assert t_canary is not None
    assert load.failures == [], load.failures[:3]
    assert len(load.answers) > 50
    versions = {a[2] for a in load.answers}
    assert versions == {v0, v1}
    lat = np.array([a[3] for a in load.answers])
    print(json.dumps({"answers": len(lat), "p50_ms": 1000 * float(np.percentile(lat, 50)),
                      "p99_ms": 1000 * float(np.percentile(lat, 99))}))  # fmt: skip
