"""Errors stay JSON under faults (issue #22).

Fast checks (no Ray): the servicer function of deploy/serve.yaml hands the servicer the bytes
as they came; ``Front`` answers a failed model call with a JSON 503 (``Retry-After`` over HTTP,
``UNAVAILABLE`` over gRPC) and a gRPC body over ``max_body_bytes`` with 413; ``RankIngress``
sends a request lost by a dead replica once more; both clients send a request once more when
the service lost it (Serve's plain-text 500, gRPC ``INTERNAL`` with non-JSON details,
``UNAVAILABLE``), and never a refused one.

On a real Ray Serve on localhost (deploy/serve.yaml, 2 Ranker replicas): a malformed protobuf
gets ``INVALID_ARGUMENT`` with the JSON error body in the details; SIGKILL of one Ranker
replica under HTTP and gRPC load leaves every request of ``serving.client`` answered and the
service answering afterwards; with the ``separate`` topology the service itself answers every
raw request with 200 or a JSON 503, never the proxy's non-JSON 500.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest

from serving.client import GRPCClient, HTTPClient, free_port
from serving.errors import RequestError

RANK = "/mixrank.v1.RankingService/Rank"
MAX_BODY = 1 << 20
REPLICAS = 2


def _request(n: int, seed: int = 0) -> dict:
    from ranking.features import load_schema
    from serving.loadtest import synthetic_request

    return synthetic_request(load_schema("frappe"), n, seed=seed)


# ----------------------------------------------------------------------------- no Ray
def test_servicer_function_hands_the_wire_bytes_to_the_servicer():
    """deploy/serve.yaml's servicer function registers Rank without a request deserializer:
    bytes protobuf cannot decode reach the servicer (Serve keeps the deserializer; the
    generated function's ``RankRequest.FromString`` failed them with UNKNOWN first)."""
    import yaml

    from serving import grpc_service
    from serving.config import DEFAULT_CONFIG
    from serving.proto import ranking_pb2

    listed = yaml.safe_load(DEFAULT_CONFIG.read_text())["grpc_options"]["grpc_servicer_functions"]
    assert listed == ["serving.grpc_service.add_RankingServiceServicer_to_server"]

    got = []

    class Servicer:
        def Rank(self, request, context):
            got.append(request)
            return ranking_pb2.RankResponse(request_id="seen")

    server = grpc.server(futures.ThreadPoolExecutor(2))
    grpc_service.add_RankingServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            raw = ch.unary_unary(RANK)
            good = ranking_pb2.RankRequest(request_id="r").SerializeToString()
            for body in (b"\xff\xff\xff\xff", good):
                answer = ranking_pb2.RankResponse.FromString(raw(body, timeout=10))
                assert answer.request_id == "seen"
    finally:
        server.stop(None)
    assert got == [b"\xff\xff\xff\xff", good]


class _Metrics:
    def __init__(self):
        self.seen = []

    def observe(self, route, status, seconds, error=None):
        self.seen.append((route, status, error))


class _Context:
    def __init__(self):
        self.code = self.details = None

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details


def _front(rank):
    """A ``Front`` whose model call is ``rank(body, fmt)``; no Ray metrics."""
    from serving.front import Front

    class Fake(Front):
        async def _rank(self, body, fmt):
            return await rank(body, fmt)

        async def _health(self):
            return 200, {"status": "ok"}

    f = Fake()
    f._front_metrics = _Metrics()
    return f


def _http_post(front, body: bytes):
    from starlette.requests import Request

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/rank",
        "raw_path": b"/v1/rank",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
    }

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    return asyncio.run(front(Request(scope, receive)))


def test_front_answers_a_failed_model_call_with_json_503_and_retry_after():
    from ray.exceptions import ActorDiedError

    from serving.errors import RETRY_AFTER_S

    async def dead(body, fmt):
        raise ActorDiedError()

    front = _front(dead)
    resp = _http_post(front, b"{}")
    assert resp.status_code == 503
    assert resp.headers["retry-after"] == str(RETRY_AFTER_S)
    assert resp.headers["content-type"] == "application/json"
    err = json.loads(resp.body)["error"]
    assert err["code"] == "unavailable" and "retry" in err["message"] and err["field"] is None
    assert "Traceback" not in err["message"] and "actor" not in err["message"].lower()

    ctx = _Context()
    asyncio.run(front.Rank(b"", ctx))
    assert ctx.code == grpc.StatusCode.UNAVAILABLE
    details = json.loads(ctx.details)
    assert details["status"] == 503 and details["error"]["code"] == "unavailable"


def test_front_refuses_a_grpc_body_over_max_body_bytes_before_parsing():
    calls = []

    async def rank(body, fmt):
        calls.append(body)
        return 200, {}

    front = _front(rank)
    front._max_body = 10
    ctx = _Context()
    asyncio.run(front.Rank(b"x" * 11, ctx))
    assert ctx.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = json.loads(ctx.details)
    assert (details["status"], details["error"]["code"], details["error"]["field"]) == (
        413,
        "body_too_large",
        "body",
    )
    assert calls == []


def test_rank_ingress_sends_a_request_lost_by_a_dead_replica_once_more():
    from ray.exceptions import ActorDiedError

    from serving.ingress import RankIngress

    class Method:
        def __init__(self, outcomes):
            self.outcomes, self.calls = list(outcomes), []

        def remote(self, body, fmt):
            self.calls.append((body, fmt))
            outcome = self.outcomes.pop(0)

            async def answer():
                if isinstance(outcome, BaseException):
                    raise outcome
                return outcome

            return answer()

    class Handle:
        def __init__(self, outcomes):
            self.rank = Method(outcomes)

    ingress = object.__new__(RankIngress.func_or_class)
    ingress._ranker = Handle([ActorDiedError(), (200, {"scores": [0.5]})])
    assert asyncio.run(ingress._rank(b"req", "json")) == (200, {"scores": [0.5]})
    assert ingress._ranker.rank.calls == [(b"req", "json")] * 2

    ingress._ranker = Handle([ActorDiedError(), ActorDiedError()])  # twice: Front's 503
    with pytest.raises(ActorDiedError):
        asyncio.run(ingress._rank(b"req", "json"))
    ingress._ranker = Handle([ValueError("a bug")])  # not a lost replica: no second send
    with pytest.raises(ValueError):
        asyncio.run(ingress._rank(b"req", "json"))
    assert len(ingress._ranker.rank.calls) == 1


class _Scripted(BaseHTTPRequestHandler):
    """Answers POSTs from ``server.script``: ``(status, content type, body)`` each."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        status, ctype, body = self.server.script.pop(0)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted_http():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_http_client_sends_a_lost_request_once_more_and_never_a_refused_one(scripted_http):
    ok = (200, "application/json", json.dumps({"scores": [0.5], "ranking": [0]}).encode())
    serve_500 = (500, "text/plain; charset=utf-8", b"Internal Server Error")
    refused = (422, "application/json", b'{"error": {"code": "c", "message": "m", "field": "f"}}')
    unavailable = (503, "application/json", b'{"error": {"code": "unavailable", "message": "m"}}')
    req = {"candidates": [{}]}
    c = HTTPClient("127.0.0.1", scripted_http.server_address[1])

    scripted_http.script = [serve_500, ok]  # Serve's answer for a replica killed mid-request
    assert c.rank(req)["scores"] == [0.5] and c.retries == 1
    scripted_http.script = [unavailable, ok]
    assert c.rank(req)["scores"] == [0.5] and c.retries == 2
    scripted_http.script = [refused]
    with pytest.raises(RequestError) as ei:
        c.rank(req)
    assert (ei.value.status, ei.value.code, ei.value.field, c.retries) == (422, "c", "f", 2)
    scripted_http.script = [serve_500, serve_500]  # lost twice: a clear error, not a ValueError
    with pytest.raises(RequestError) as ei:
        c.rank(req)
    assert (ei.value.status, ei.value.code, c.retries) == (500, "non_json_answer", 3)
    assert "Internal Server Error" in ei.value.message
    assert scripted_http.script == []
    c.close()


def test_grpc_client_sends_a_lost_request_once_more_and_never_a_refused_one():
    from serving.proto import ranking_pb2

    script = []

    def rank(request, context):
        code, details = script.pop(0)
        if code is not None:
            context.abort(code, details)
        return ranking_pb2.RankResponse(scores=[0.5], ranking=[0]).SerializeToString()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "mixrank.v1.RankingService",
                {"Rank": grpc.unary_unary_rpc_method_handler(rank)},
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ok = (None, None)
    died = (grpc.StatusCode.INTERNAL, "The actor died unexpectedly before finishing this task.")
    refused = (
        grpc.StatusCode.INVALID_ARGUMENT,
        json.dumps({"status": 400, "error": {"code": "invalid_proto", "message": "m"}}),
    )
    req = {"candidates": [{}]}
    c = GRPCClient("127.0.0.1", port, timeout=10)
    try:
        script[:] = [died, ok]  # Serve's answer for a replica killed mid-request
        assert c.rank(req)["scores"] == [0.5] and c.retries == 1
        script[:] = [(grpc.StatusCode.UNAVAILABLE, "no replica"), ok]
        assert c.rank(req)["scores"] == [0.5] and c.retries == 2
        script[:] = [refused]
        with pytest.raises(RequestError) as ei:
            c.rank(req)
        assert (ei.value.status, ei.value.code, c.retries) == (400, "invalid_proto", 2)
        script[:] = [died, died]
        with pytest.raises(grpc.RpcError) as ei:
            c.rank(req)
        assert ei.value.code() == grpc.StatusCode.INTERNAL and c.retries == 3
        assert script == []
    finally:
        c.close()
        server.stop(None)


# ----------------------------------------------------------------------------- real Serve
class Service:
    def __init__(self, tmp):
        from benchmarks.artifacts import make_artifact
        from serving import config

        self.config = config
        self.artifact = make_artifact(tmp / "a0", seed=0)
        self.http, self.grpc = free_port(), free_port()
        self.cfg = config.load_config(
            artifact=self.artifact,
            http_port=self.http,
            grpc_port=self.grpc,
            host="127.0.0.1",
            deployments={
                "Ranker": {"num_replicas": REPLICAS, "user_config": {"max_body_bytes": MAX_BODY}}
            },
        )
        config.start(self.cfg, num_cpus=8)

    def replica_pids(self) -> list[int]:
        """This test's Ranker replica processes: their titles name the deployment, and they
        descend from this process (through the raylet it started), so that a Ray started by
        anything else on the machine is never touched."""
        out = subprocess.run(
            ["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True, check=True
        ).stdout
        parent, title = {}, {}
        for line in out.splitlines():
            pid, ppid, *args = line.split(None, 2)
            parent[int(pid)], title[int(pid)] = int(ppid), (args or [""])[0]

        def ours(pid: int) -> bool:
            while pid > 1:
                if pid == os.getpid():
                    return True
                pid = parent.get(pid, 1)
            return False

        return sorted(p for p, t in title.items() if "ServeReplica:mixrank:Ranker" in t and ours(p))

    def wait_replicas(self, timeout: float = 90.0) -> list[int]:
        """Wait until the application is RUNNING with ``REPLICAS`` running Ranker replicas
        (and their processes) and every deployment healthy; their pids."""
        from ray import serve

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            app = serve.status().applications.get("mixrank")
            deps = app.deployments if app is not None else {}
            ranker = deps.get("Ranker")
            pids = self.replica_pids()
            if (
                app is not None
                and app.status == "RUNNING"
                and ranker is not None
                and ranker.replica_states.get("RUNNING", 0) == REPLICAS
                and len(pids) == REPLICAS
                and all(d.status == "HEALTHY" for d in deps.values())
            ):
                return pids
            time.sleep(0.5)
        raise AssertionError(f"not {REPLICAS} running Ranker replicas after {timeout} s")


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    try:
        yield Service(tmp_path_factory.mktemp("faults"))
    finally:
        from serving import config

        config.stop()


def _under_load(svc, send, workers: int, kill_after: float = 1.5, run_after: float = 3.0):
    """``send(worker index, stop event)`` in ``workers`` threads; SIGKILL one Ranker replica
    once they have run ``kill_after`` s; stop ``run_after`` s later. Returns the killed pid."""
    stop = threading.Event()
    threads = [threading.Thread(target=send, args=(i, stop)) for i in range(workers)]
    pids = svc.wait_replicas()
    for t in threads:
        t.start()
    try:
        time.sleep(kill_after)
        os.kill(pids[0], signal.SIGKILL)
        time.sleep(run_after)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    return pids[0]


@pytest.mark.slow
def test_malformed_protobuf_gets_invalid_argument_with_a_json_body(svc):
    with grpc.insecure_channel(f"127.0.0.1:{svc.grpc}") as ch:
        raw = ch.unary_unary(RANK)
        md = (("application", "mixrank"),)
        for body in (b"\xff\xff\xff\xff", b"garbage, not protobuf", b"\x0a\x05ab"):
            with pytest.raises(grpc.RpcError) as ei:
                raw(body, timeout=30, metadata=md)
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value.details()
            details = json.loads(ei.value.details())
            assert details["status"] == 400
            err = details["error"]
            assert err["code"] == "invalid_proto" and err["field"] is None
            assert "mixrank.v1.RankRequest" in err["message"]
            assert "Traceback" not in err["message"]
        with pytest.raises(grpc.RpcError) as ei:  # the body limit holds for gRPC too
            raw(b"\x0a" + b"x" * MAX_BODY, timeout=30, metadata=md)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert json.loads(ei.value.details())["error"]["code"] == "body_too_large"
    assert GRPCClient("127.0.0.1", svc.grpc).rank(_request(8))["scores"]  # still answering


@pytest.mark.slow
def test_replica_killed_under_load_leaves_every_client_request_answered(svc):
    """The default topology: Serve's proxy answers the requests the dead replica held with a
    plain-text 500 (HTTP) or INTERNAL (gRPC); ``serving.client`` sends them once more."""
    req = _request(64, seed=1)
    answered, failed, retries = [], [], []

    def send(i, stop):
        c = HTTPClient("127.0.0.1", svc.http) if i % 2 else GRPCClient("127.0.0.1", svc.grpc)
        try:
            while not stop.is_set():
                try:
                    answered.append(len(c.rank(req)["scores"]))
                except Exception as e:  # every failure is the finding
                    failed.append(f"{type(c).__name__}: {e!r}"[:300])
        finally:
            retries.append(c.retries)
            c.close()

    killed = _under_load(svc, send, workers=8)
    print(f"killed {killed}: {len(answered)} answered, {sum(retries)} sent twice")
    assert not failed, failed[:5]
    assert len(answered) > 50 and set(answered) == {64}
    c = HTTPClient("127.0.0.1", svc.http)
    for _ in range(5):  # the surviving replica answers, and Serve replaces the dead one
        assert len(c.rank(req)["scores"]) == 64
    assert killed not in svc.wait_replicas()


@pytest.mark.slow
def test_separate_topology_answers_json_when_a_ranker_replica_dies(svc):
    """``args.ingress: separate``: RankIngress sends the request a dead Ranker replica held
    once more, so raw clients (no retry of their own) get 200, or at worst a JSON 503 with
    Retry-After, and never the proxy's non-JSON 500."""
    import copy
    import http.client

    from ray import serve

    from serving.client import to_proto_request

    cfg = copy.deepcopy(svc.cfg)
    app = cfg["applications"][0]
    app["args"] = {"ingress": "separate"}
    app["deployments"].append(
        {"name": "RankIngress", "num_replicas": 1, "user_config": {"max_body_bytes": MAX_BODY}}
    )
    svc.config.redeploy(cfg)
    req = _request(64, seed=2)
    body, proto = json.dumps(req).encode(), to_proto_request(req).SerializeToString()
    c = HTTPClient("127.0.0.1", svc.http)
    deadline = time.monotonic() + 90
    while "RankIngress" not in serve.status().applications["mixrank"].deployments:
        assert time.monotonic() < deadline, "RankIngress never came up"
        time.sleep(0.5)
    svc.wait_replicas()
    assert len(c.rank(req)["scores"]) == 64
    ok, bad = [], []

    def send(i, stop):
        if i % 2:
            conn = http.client.HTTPConnection("127.0.0.1", svc.http, timeout=30)
            while not stop.is_set():
                conn.request("POST", "/v1/rank", body, {"Content-Type": "application/json"})
                r = conn.getresponse()
                data = r.read()
                if r.status == 200:
                    ok.append(1)
                    continue
                try:
                    err = json.loads(data)["error"]
                except (ValueError, KeyError, TypeError):
                    err = None
                if not (r.status == 503 and err and r.getheader("Retry-After")):
                    bad.append(("http", r.status, r.getheader("Content-Type"), data[:200]))
            conn.close()
            return
        with grpc.insecure_channel(f"127.0.0.1:{svc.grpc}") as ch:
            raw = ch.unary_unary(RANK)
            while not stop.is_set():
                try:
                    raw(proto, timeout=30, metadata=(("application", "mixrank"),))
                    ok.append(1)
                except grpc.RpcError as e:
                    try:
                        err = json.loads(e.details())["error"]
                    except (ValueError, KeyError, TypeError):
                        err = None
                    if not (e.code() == grpc.StatusCode.UNAVAILABLE and err):
                        bad.append(("grpc", e.code().name, (e.details() or "")[:200]))

    _under_load(svc, send, workers=8)
    assert not bad, bad[:5]
    assert len(ok) > 50
    for _ in range(5):
        assert len(c.rank(req)["scores"]) == 64
