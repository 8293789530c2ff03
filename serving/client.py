"""Minimal clients for the ranking service (HTTP with ``http.client``, gRPC with the stub).

Used by the demo, the tests, the load generator and the benchmark; loopback or any host.

Both clients send a ranking request a second time, at once, when the first answer says the
service lost it rather than refused it: over HTTP a 503 or a 5xx without the service's JSON
error body, over gRPC ``UNAVAILABLE`` or an ``INTERNAL`` / ``UNKNOWN`` status whose details are
not JSON. That is what Ray Serve's proxy answers when the replica holding a request dies
(HTTP 500 ``Internal Server Error`` as text/plain; gRPC ``INTERNAL`` "The actor died
unexpectedly ..."), and by then Serve routes new requests to the other replicas. Ranking is a
pure function of the request, so sending it twice is safe. ``retries`` counts the second sends
(docs/SERVING.md, "Faults").
"""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
from typing import Any

from serving.errors import RequestError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` and on all interfaces right now, for local services in tests,
    benchmarks and the demo.

    Drawn between Ray's worker ports (10002-19999 by default) and the kernel's ephemeral range
    (from ``/proc/sys/net/ipv4/ip_local_port_range``, 32768 by default). A port the kernel hands
    out for ``bind(0)`` comes from the ephemeral range, where every process Ray starts takes its
    own listening ports: such a port could be taken again between this call and the service
    binding it (seen once: Serve's gRPC proxy failed to bind ``[::]:46439``)."""
    low = 32768
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    rng = random.Random(int.from_bytes(os.urandom(8), "little"))
    if low > 20000 + 100:
        for _ in range(200):
            port = rng.randrange(20000, low)
            if port not in _GIVEN and _bindable(host, port) and _bindable("", port):
                _GIVEN.add(port)  # never the same port twice in one process
                return port
    with socket.socket() as s:  # fallback: whatever the kernel hands out
        s.bind((host, 0))
        return s.getsockname()[1]


_GIVEN: set[int] = set()


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _json(data) -> Any:
    """``data`` decoded as JSON, or None where it is not JSON."""
    try:
        return json.loads(data)
    except (TypeError, ValueError):  # UnicodeDecodeError is a ValueError
        return None


def _is_error_body(obj) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("error"), dict) and "code" in obj["error"]


def lost_http(status: int, body) -> bool:
    """Whether an HTTP answer says the service lost the request (retry it), rather than
    answered or refused it: a 503, or a 5xx without the service's JSON error body."""
    return status == 503 or (status >= 500 and not _is_error_body(body))


def lost_grpc(code, details) -> bool:
    """The same for a gRPC status: ``UNAVAILABLE``, or ``INTERNAL`` / ``UNKNOWN`` whose details
    are not the service's JSON error body."""
    import grpc

    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    return code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) and not _is_error_body(
        _json(details)
    )


class HTTPClient:
    """A keep-alive HTTP/1.1 connection to the service (not thread-safe: one per thread).
    ``retries``: ranking requests sent a second time (see the module docstring)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8000, timeout: float = 30.0):
        self.host, self.port, self.timeout = host, port, timeout
        self._conn: http.client.HTTPConnection | None = None
        self.retries = 0

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict | None = None
    ) -> tuple[int, bytes]:
        """One request; reconnects once if the kept-alive connection was closed."""
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self._conn.request(method, path, body=body, headers=headers or {})
                resp = self._conn.getresponse()
                return resp.status, resp.read()
            except (ConnectionError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def rank_raw(self, body: bytes) -> tuple[int, dict]:
        """POST /v1/rank with ``body``, sent once more if the service lost it; ``(status,
        decoded JSON)``. An answer that is still not JSON comes back as an error body with
        code ``non_json_answer`` (made here, not by the service)."""
        headers = {"Content-Type": "application/json"}
        status, data = self.request("POST", "/v1/rank", body, headers)
        obj = _json(data)
        if lost_http(status, obj):
            self.retries += 1
            status, data = self.request("POST", "/v1/rank", body, headers)
            obj = _json(data)
        if obj is None:
            obj = RequestError(
                status,
                "non_json_answer",
                f"HTTP {status} with a body that is not JSON: {data[:200]!r}",
            ).body()
        return status, obj

    def rank(self, request: dict[str, Any]) -> dict:
        """POST /v1/rank; returns the answer or raises ``RequestError`` with the error body."""
        status, body = self.rank_raw(json.dumps(request).encode())
        if status != 200:
            raise RequestError.from_body(status, body)
        return body

    def health(self) -> tuple[int, dict]:
        status, data = self.request("GET", "/healthz")
        return status, json.loads(data)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def to_proto_request(request: dict[str, Any]):
    """The JSON request shape -> ``mixrank.v1.RankRequest``."""
    from serving.proto import ranking_pb2

    msg = ranking_pb2.RankRequest(
        request_id=request.get("request_id") or "", top_k=request.get("top_k") or 0
    )
    for k, v in (request.get("context") or {}).items():
        _set_value(msg.context[k], v)
    for cand in request["candidates"]:
        c = msg.candidates.add()
        for k, v in cand.items():
            _set_value(c.features[k], v)
    return msg


def _set_value(fv, v) -> None:
    if v is None:
        fv.Clear()
    elif isinstance(v, str):
        fv.string_value = v
    elif isinstance(v, bool):
        raise TypeError(f"booleans are not feature values: {v!r}")
    elif isinstance(v, int):
        fv.int_value = v
    elif isinstance(v, float):
        fv.float_value = v
    elif isinstance(v, list | tuple):
        fv.list_value.SetInParent()
        for x in v:
            _set_value(fv.list_value.values.add(), x)
    else:
        raise TypeError(f"not a feature value: {v!r}")


def from_proto_response(resp) -> dict:
    """``mixrank.v1.RankResponse`` -> the JSON answer shape."""
    out = {
        "request_id": resp.request_id,
        "model_version": resp.model_version,
        "scores": list(resp.scores),
        "ranking": list(resp.ranking),
    }
    if resp.task_scores:
        out["task_scores"] = {k: list(v.scores) for k, v in resp.task_scores.items()}
    return out


class GRPCClient:
    """A channel and stub for ``mixrank.v1.RankingService``."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9000,
        timeout: float = 30.0,
        application: str = "mixrank",
    ):
        import grpc

        from serving.proto import ranking_pb2_grpc

        self.timeout = timeout
        self.retries = 0
        # Serve's gRPC proxy needs the application's name when several are deployed.
        self.metadata = (("application", application),)
        self._channel = grpc.insecure_channel(f"{host}:{port}")
        self._stub = ranking_pb2_grpc.RankingServiceStub(self._channel)

    def rank(self, request: dict[str, Any]) -> dict:
        """Rank, sending the request once more if the service lost it; a refused request
        raises ``RequestError`` decoded from the gRPC details, any other failure gRPC's
        ``RpcError``."""
        import grpc

        msg = to_proto_request(request)
        for attempt in (0, 1):
            try:
                resp = self._stub.Rank(msg, timeout=self.timeout, metadata=self.metadata)
            except grpc.RpcError as e:
                if attempt == 0 and lost_grpc(e.code(), e.details()):
                    self.retries += 1
                    continue
                body = _json(e.details())
                if not _is_error_body(body):
                    raise e from None
                raise RequestError.from_body(int(body.get("status", 422)), body) from None
            return from_proto_response(resp)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._channel.close()
