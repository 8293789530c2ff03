"""The wire protocols, shared by the two deployments that can be the application's ingress
(``Ranker``, ``RankIngress``): HTTP ``POST /v1/rank`` and ``GET /healthz``, gRPC
``mixrank.v1.RankingService/Rank`` through Serve's gRPC proxy; content type and body-size checks,
per-route request metrics, JSON or protobuf answers, never a stack trace."""

from __future__ import annotations

import json
import logging
import time

from serving import jsonio
from serving.errors import GRPC_CODES, RETRY_AFTER_S, RequestError, unavailable
from serving.settings import IngressSettings

log = logging.getLogger("ray.serve")

HTTP_ROUTES = ("/v1/rank", "/healthz")
GRPC_ROUTE = "grpc:/mixrank.v1.RankingService/Rank"


class Front:
    """HTTP and gRPC handling shared by the two ingress deployments. Subclasses provide
    ``_rank(body, fmt) -> (status, body dict)`` (``body``: bytes, or a decoded gRPC request)
    and ``_health() -> (status, body dict)``."""

    _max_body = IngressSettings.max_body_bytes

    def _front_init(self) -> None:
        from serving.metrics import IngressMetrics

        self._front_metrics = IngressMetrics()
        self._front_metrics.start_at_zero(("/v1/rank", GRPC_ROUTE))

    def _front_reconfigure(self, settings) -> None:
        """``settings``: ``serving.settings.IngressSettings``."""
        self._max_body = settings.max_body_bytes

    async def __call__(self, request):
        from starlette.responses import Response

        t0 = time.perf_counter()
        route = request.url.path.rstrip("/") or "/"
        try:
            status, body = await self._http(request, route)
        except Exception as e:  # a dead or overloaded replica: never a stack trace out
            log.warning("request failed: %s: %s", type(e).__name__, e)
            status, body = error_response(unavailable())
        route_tag = route if route in HTTP_ROUTES else "other"
        error = body["error"]["code"] if status >= 400 else None
        self._front_metrics.observe(route_tag, status, time.perf_counter() - t0, error)
        return Response(
            jsonio.dumps(body),
            status_code=status,
            media_type="application/json",
            headers={"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None,
        )

    async def _http(self, request, route: str) -> tuple[int, dict]:
        if route == "/healthz":
            return await self._health()
        if route != "/v1/rank":
            return error_response(
                RequestError(404, "not_found", f"no route {route[:64]!r}; try POST /v1/rank")
            )
        if request.method != "POST":
            return error_response(
                RequestError(405, "method_not_allowed", "use POST /v1/rank", None)
            )
        ctype = request.headers.get("content-type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            return error_response(
                RequestError(
                    400,
                    "unsupported_content_type",
                    f"expected application/json, got {ctype[:64]!r}",
                    "content-type",
                )
            )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_body:
            return error_response(self._too_large(int(declared)))
        body = await request.body()
        if len(body) > self._max_body:
            return error_response(self._too_large(len(body)))
        return await self._rank(body, "json")

    def _too_large(self, n: int) -> RequestError:
        return RequestError(
            413, "body_too_large", f"{n} bytes, the limit is {self._max_body}", "body"
        )

    async def Rank(self, request, grpc_context=None):
        """gRPC ``mixrank.v1.RankingService/Rank``; errors set the gRPC status and put the JSON
        error body, plus the HTTP-equivalent ``status``, in the details.

        ``request``: the serialized ``RankRequest`` as it came over the wire
        (``serving.grpc_service`` registers the method without a deserializer, so that
        malformed bytes get 400 ``invalid_proto`` here), or a decoded message (a server
        registered with the generated ``ranking_pb2_grpc`` function)."""
        from serving.proto import ranking_pb2

        t0 = time.perf_counter()
        try:
            if isinstance(request, bytes) and len(request) > self._max_body:
                status, body = error_response(self._too_large(len(request)))
            else:
                status, body = await self._rank(request, "proto")
        except Exception as e:
            log.warning("request failed: %s: %s", type(e).__name__, e)
            status, body = error_response(unavailable())
        error = body["error"]["code"] if status >= 400 else None
        self._front_metrics.observe(GRPC_ROUTE, status, time.perf_counter() - t0, error)
        if status != 200:
            if grpc_context is not None:
                grpc_context.set_code(GRPC_CODES.get(status, GRPC_CODES[500]))
                grpc_context.set_details(json.dumps({"status": status, **body}))
            return ranking_pb2.RankResponse()
        return to_proto(body)


def error_response(err: RequestError):
    return err.status, err.body()


def to_proto(body: dict):
    """A JSON answer -> ``mixrank.v1.RankResponse``."""
    from serving.proto import ranking_pb2

    resp = ranking_pb2.RankResponse(
        request_id=body["request_id"],
        model_version=body["model_version"],
        scores=body["scores"],
        ranking=body["ranking"],
    )
    for task, scores in body.get("task_scores", {}).items():
        resp.task_scores[task].scores.extend(scores)
    return resp
